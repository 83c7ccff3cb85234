"""`model.vision.parallel: replicated` against the sharded ViT (CPU, gloo, float32).

One checkpoint, saved by a sharded model at TP=1, is loaded by both placements at TP 1, 2 and 4
(4 ranks, DP = 4 / TP) and by the replicated ViT at TP 8 (8 ranks; the ViT MLP width 172, like
3420, is not divisible by 8, so only the replicated ViT runs there). A checkpoint saved by the
replicated ViT at TP 2 loads back into the sharded ViT at TP 4.

Tolerances: at the same TP both placements run the same LLM and projector; the ViT differs in
float32 summation order (split vs whole GEMMs, one image at a time vs packed), ~1e-7 on logits
of magnitude ~1, so 1e-5. Across TP the LLM's partial sums differ too; 1e-4 as in test_qwen_merge.
"""

from __future__ import annotations

import pytest
import torch

from tests.model.references import gather_vocab, multimodal_inputs

SAME_TP = 1e-5
ACROSS_TP = 1e-4


def _config(tp: int, parallel: str):
    from qwen_merge_mcore.config import config_from_dict

    # The tiny preset with head counts that split 8 ways; the ViT's widths are the tiny preset's.
    return config_from_dict({
        "model": {"preset": "tiny", "backend": "local", "vision": {"num_heads": 8, "parallel": parallel},
                  "language": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8,
                               "num_query_groups": 8, "head_dim": 16, "ffn_hidden_size": 128,
                               "mrope_section": [2, 3, 3]}},
        "parallel": {"tensor_model_parallel_size": tp},
        "precision": {"params_dtype": "fp32"},
        "train": {"train_iters": 1, "freeze": ["vision"]},
    }, check_runtime=False)


def _set_tp(tp: int) -> None:
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() != tp:
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


def _build(tp: int, parallel: str, ckpt=None):
    from qwen_merge_mcore.checkpoint.common import load_model
    from qwen_merge_mcore.models.qwen_merge import build_model

    _set_tp(tp)
    model = build_model(_config(tp, parallel))
    if ckpt is not None:
        load_model([model], ckpt)
    return model.eval()


@torch.no_grad()
def _outputs(model) -> dict:
    x = multimodal_inputs()
    return {"logits": gather_vocab(model(x["tokens"], x["position_ids"], images=x["images"])),
            "loss": model(x["tokens"], x["position_ids"], images=x["images"], labels=x["labels"])}


def _save(model, ckpt) -> None:
    from qwen_merge_mcore.checkpoint.common import model_state
    from qwen_merge_mcore.checkpoint.cpu_compat import save_dist_checkpoint

    save_dist_checkpoint(model_state([model]), ckpt)


def _four_ranks(ckpt, ckpt_replicated) -> dict:
    from qwen_merge_mcore.training.model_provider import parameter_report

    torch.manual_seed(0)
    model = _build(1, "sharded")
    _save(model, ckpt)
    out = {"report": parameter_report([model])}
    for tp in (1, 2, 4):
        for parallel in ("sharded", "replicated"):
            model = _build(tp, parallel, ckpt)
            out[(tp, parallel)] = _outputs(model)
            if (tp, parallel) == (2, "replicated"):
                _save(model, ckpt_replicated)
    out["sharded_tp4_from_replicated"] = _outputs(_build(4, "sharded", ckpt_replicated))
    return out


def _eight_ranks(ckpt) -> dict:
    from qwen_merge_mcore.training.model_provider import parameter_report

    model = _build(8, "replicated", ckpt)
    return {**_outputs(model), "report": parameter_report([model])}


@pytest.fixture(scope="module")
def runs(distributed, tmp_path_factory):
    root = tmp_path_factory.mktemp("replicated_vit")
    for name in ("sharded_tp1", "replicated_tp2"):
        (root / name).mkdir()
    four = distributed(_four_ranks, world_size=4, tp=1, args=(root / "sharded_tp1", root / "replicated_tp2"))
    eight = distributed(_eight_ranks, world_size=8, tp=8, args=(root / "sharded_tp1",))
    return {"four": four, "eight": eight}


def _diff(a: dict, b: dict) -> float:
    vocab = 1000  # the padded columns are -inf on both sides
    return max((a["logits"][..., :vocab] - b["logits"][..., :vocab]).abs().max().item(),
               (a["loss"] - b["loss"]).abs().max().item())


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_replicated_vit_equals_sharded(runs, tp):
    for rank, out in enumerate(runs["four"]):
        diff = _diff(out[(tp, "replicated")], out[(tp, "sharded")])
        print(f"TP={tp} rank {rank}: max |replicated - sharded| over logits and loss = {diff:.2e}")
        assert diff < SAME_TP, (tp, rank, diff)
        assert _diff(out[(tp, "sharded")], out[(1, "sharded")]) < ACROSS_TP


def test_replicated_checkpoint_loads_sharded(runs):
    for out in runs["four"]:
        assert _diff(out["sharded_tp4_from_replicated"], out[(1, "sharded")]) < ACROSS_TP


def test_replicated_vit_runs_at_tp8(runs):
    reference = runs["four"][0][(1, "sharded")]
    for rank, out in enumerate(runs["eight"]):
        diff = _diff(out, reference)
        print(f"TP=8 rank {rank}: max |replicated TP8 - sharded TP1| = {diff:.2e}")
        assert diff < ACROSS_TP, (rank, diff)
    # Every TP rank holds the whole ViT; the report counts it once.
    assert runs["eight"][0]["report"] == runs["four"][0]["report"]


def test_replicated_needs_a_frozen_vit():
    from qwen_merge_mcore.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="model.vision.parallel.*frozen"):
        config_from_dict({"model": {"preset": "tiny", "vision": {"parallel": "replicated"}},
                          "train": {"train_iters": 1, "freeze": []}}, check_runtime=False)
    with pytest.raises(ConfigError, match="ViT MLP width"):
        _config(8, "sharded")
    assert _config(8, "replicated").parallel.tensor_model_parallel_size == 8
