"""Shared fixtures: the tiny checkpoints, the CPU multi-process harness, the `gpu` marker."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _gpu_skip_reason() -> str | None:
    from qwen_merge_mcore.utils.runtime import cuda_available, te_available

    if not cuda_available():
        return "needs a CUDA GPU (none on this machine)"
    if not te_available():
        return "needs Transformer Engine (install the `gpu` extra)"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    reason = _gpu_skip_reason()
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of `qmm make-tiny` output (bf16 weights, as real checkpoints ship)."""
    from qwen_merge_mcore.fixtures import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "models")


@pytest.fixture(scope="session")
def distributed():
    """`run_distributed(fn, world_size, tp, pp, vpp, args)` on CPU processes over gloo."""
    from qwen_merge_mcore.testing import run_distributed

    return run_distributed
