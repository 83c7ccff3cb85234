"""ViT feature cache (`data.vision_cache`): same per-step losses with and without it, a second run
reads every image from it, a cache built for other weights or settings is refused.

Stage 1 on the tiny model (CPU, gloo, fp32, TP=2 so the ViT's TP ranks must agree on hits), 3
steps of one pass each over 8 generated images, unshuffled: every image meets the ViT in the same
packed sequence on every pass, so its cached features are bit for bit what the ViT would compute
again, and the losses are compared for equality.
"""

from __future__ import annotations

import pytest
import torch

from qwen_merge_mcore.fixtures.tiny_data import make_tiny_data


def _config(tokenizer, data, cache=None, seed=1234, max_pixels=12544):
    from qwen_merge_mcore.config import config_from_dict

    return config_from_dict({
        "model": {"preset": "tiny", "backend": "local"},
        "parallel": {"tensor_model_parallel_size": 2},
        "precision": {"params_dtype": "fp32"},
        "train": {"stage": "stage1", "freeze": ["vision", "language"], "lr": 5e-3, "global_batch_samples": 8,
                  "train_iters": 3, "seed": seed},
        "data": {"template": "pretrain", "seq_length": 256, "max_pixels": max_pixels, "num_workers": 0,
                 "shuffle": False, "tokenizer": str(tokenizer), "vision_cache": cache,
                 "datasets": [{"path": str(data), "name": "captions"}]},
    }, check_runtime=False)


def _counting(run):
    """(losses, images decoded, ViT forwards) of one training run on this rank."""
    from qwen_merge_mcore.data.vision import ImageProcessor
    from qwen_merge_mcore.models.vision import QwenVisionModel

    counts = {"decoded": 0, "vit": 0}
    decode, forward = ImageProcessor.__call__, QwenVisionModel.forward

    def counted_decode(self, images):
        counts["decoded"] += len(images)
        return decode(self, images)

    def counted_forward(self, *args):
        counts["vit"] += 1
        return forward(self, *args)

    ImageProcessor.__call__, QwenVisionModel.forward = counted_decode, counted_forward
    try:
        summary = run()
    finally:
        ImageProcessor.__call__, QwenVisionModel.forward = decode, forward
    return {"losses": summary.losses, **counts}


def _runs(tokenizer, data, cache) -> dict:
    from qwen_merge_mcore.training.loop import run_training

    out = {}
    for name, folder in (("plain", None), ("filling", cache), ("reading", cache)):
        out[name] = _counting(lambda: run_training(_config(tokenizer, data, folder)))
    # Another seed initialises other ViT weights; another pixel budget changes the preprocessing.
    for name, changed in (("other_weights", {"seed": 7}), ("other_settings", {"max_pixels": 50176})):
        try:
            run_training(_config(tokenizer, data, cache, **changed))
            out[name] = "no error"
        except ValueError as err:
            out[name] = str(err)
    return out


@pytest.fixture(scope="module")
def runs(tiny, distributed, tmp_path_factory):
    root = tmp_path_factory.mktemp("vision_cache")
    data = make_tiny_data(root / "data", samples=8)["captions"]
    # The generator draws from few colours and shapes: some images are the same file content.
    distinct = len({p.read_bytes() for p in (root / "data" / "images").iterdir()})
    ranks = distributed(_runs, world_size=2, tp=2, args=(tiny["qwen2_5_vl"], data, str(root / "cache")))
    return {"ranks": ranks, "distinct": distinct}


def test_cache_gives_the_same_losses(runs):
    logged = runs["ranks"][0]  # rank 0 logs the losses
    print({name: (logged[name]["losses"], logged[name]["decoded"], logged[name]["vit"])
           for name in ("plain", "filling", "reading")})
    assert len(logged["plain"]["losses"]) == 3
    assert logged["filling"]["losses"] == logged["plain"]["losses"]  # bit-identical floats
    assert logged["reading"]["losses"] == logged["plain"]["losses"]


def test_later_passes_and_runs_read_the_cache(runs):
    for rank in runs["ranks"]:  # both TP ranks take the same hits
        plain, filling, reading = rank["plain"], rank["filling"], rank["reading"]
        passes = plain["decoded"] // 8
        assert passes >= 2 and plain["decoded"] == passes * 8  # every image on every pass
        assert filling["decoded"] == runs["distinct"]  # each distinct image once, on the first pass
        assert filling["vit"] < plain["vit"]
        assert reading["decoded"] == 0 and reading["vit"] == 0


def test_training_refuses_a_cache_of_other_weights_or_settings(runs):
    for rank in runs["ranks"]:
        assert rank["other_weights"].startswith("data.vision_cache ") and \
            "built for other ViT weights" in rank["other_weights"], rank["other_weights"]
        assert "built with other preprocessing settings (max_pixels differ)" in rank["other_settings"], \
            rank["other_settings"]
        assert "\n" not in rank["other_weights"] + rank["other_settings"]


def test_cache_for_other_weights_or_settings_is_refused(tmp_path):
    from qwen_merge_mcore.data.vision import VisionSpec
    from qwen_merge_mcore.data.vision_cache import (CacheIdentity, VisionCacheError, VisionFeatureCache,
                                                    image_key, preprocessing_settings)

    settings = preprocessing_settings(VisionSpec(max_pixels=12544), torch.float32)
    cache = VisionFeatureCache(tmp_path, CacheIdentity(settings, "a" * 64), shard_images=2)
    cache.put(image_key(b"x"), torch.ones(4, 3))
    cache.close()
    assert torch.equal(VisionFeatureCache(tmp_path, CacheIdentity(settings, "a" * 64)).get(image_key(b"x")),
                       torch.ones(4, 3))
    with pytest.raises(VisionCacheError, match=r"^data.vision_cache .*: built for other ViT weights"):
        VisionFeatureCache(tmp_path, CacheIdentity(settings, "b" * 64))
    other = preprocessing_settings(VisionSpec(max_pixels=50176), torch.float32)
    with pytest.raises(VisionCacheError, match=r"other preprocessing settings \(max_pixels differ\)"):
        VisionFeatureCache(tmp_path, CacheIdentity(other, "a" * 64))
    bf16 = preprocessing_settings(VisionSpec(max_pixels=12544), torch.bfloat16)
    with pytest.raises(VisionCacheError, match=r"\(dtype differ\)"):
        VisionFeatureCache(tmp_path, CacheIdentity(bf16, "a" * 64))
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


def test_cache_needs_a_frozen_vit(tiny, tmp_path):
    from qwen_merge_mcore.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="data.vision_cache.*frozen ViT"):
        config_from_dict({"model": {"preset": "tiny"}, "train": {"train_iters": 1, "freeze": ["language"]},
                          "data": {"vision_cache": str(tmp_path)}}, check_runtime=False)
