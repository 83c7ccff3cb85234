"""Fixtures of the HF/vLLM integration tests: tiny exported Qwen-Merge folders, broken copies of
them, an image, the fp32 model loaded through the Auto classes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def merge_dirs(tiny, tmp_path_factory):
    """{"untied": folder, "tied": folder}: exported tiny Qwen-Merge models (bf16 on disk)."""
    from qwen_merge_mcore.hf.tiny import make_tiny_qwen_merge

    root = tmp_path_factory.mktemp("qwen_merge")
    return {"untied": make_tiny_qwen_merge(root / "untied", tiny),
            "tied": make_tiny_qwen_merge(root / "tied", tiny, tied=True)}


@pytest.fixture(scope="session")
def image(tmp_path_factory):
    """An 84x112 noise image saved as PNG (6x8 patches -> 12 image tokens)."""
    path = tmp_path_factory.mktemp("img") / "noise.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((84, 112, 3)) * 255).astype("uint8")).save(path)
    return path


@pytest.fixture(scope="session")
def loaded(merge_dirs):
    """The untied export loaded through the Auto classes the package registers, in fp32."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(merge_dirs["untied"], dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(merge_dirs["untied"])


@pytest.fixture(scope="session")
def bad_folders(loaded, merge_dirs, tiny, tmp_path_factory):
    """Broken exports -> (folder, regex of the error this project must raise for it)."""
    from qwen_merge_mcore.hf import write_remote_code

    root = tmp_path_factory.mktemp("bad")
    model, _ = loaded
    bad = {}

    folder = root / "missing_shard"
    model.save_pretrained(folder, max_shard_size="300KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "processor_config.json"):
        shutil.copy(merge_dirs["untied"] / name, folder / name)
    write_remote_code(folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    bad["missing_shard"] = (folder, rf"weight shards listed in model.safetensors.index.json are missing "
                                    rf"\({shards[1].name}\): the export is incomplete")

    # A Qwen-Merge config.json of another size (wider LLM) over these weights.
    folder = root / "other_size"
    shutil.copytree(merge_dirs["untied"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_size"] = config["vision_config"]["out_hidden_size2"] = 256
    (folder / "config.json").write_text(json.dumps(config))
    bad["other_size"] = (folder, r"tensors with another shape than config.json implies \(first: lm_head.weight is "
                                 r"\[1000, 128\] in the checkpoint, config.json expects \[1000, 256\]\).*"
                                 r"config.json does not describe these weights")

    # Plain Qwen2.5-VL weights (no mlp.4) under a Qwen-Merge config.json.
    folder = root / "plain_vlm"
    shutil.copytree(tiny["qwen2_5_vl"], folder)
    shutil.copy(merge_dirs["untied"] / "config.json", folder / "config.json")
    bad["plain_vlm"] = (folder, "look like plain Qwen2.5-VL weights")

    # config.json of the plain Qwen3 LLM over Qwen-Merge weights.
    folder = root / "qwen3_config"
    shutil.copytree(merge_dirs["untied"], folder)
    shutil.copy(tiny["qwen3"] / "config.json", folder / "config.json")
    bad["qwen3_config"] = (folder, "model_type 'qwen3', not 'qwen2_5_vl_merge'.*not a Qwen-Merge export")
    return bad
