"""Fixtures of the HF/vLLM integration tests: tiny exported Qwen-Merge folders and prompts."""

from __future__ import annotations

import numpy as np
import pytest
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
    """A 84x112 noise image saved as PNG (6x8 patches -> 12 image tokens)."""
    path = tmp_path_factory.mktemp("img") / "noise.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((84, 112, 3)) * 255).astype("uint8")).save(path)
    return path
