"""A merged Qwen-Merge checkpoint survives `qmm hf2mcore` and `qmm mcore2hf` bit for bit."""

import subprocess
import sys

import torch

from qwen_merge_mcore.checkpoint.safetensors_io import SafetensorsFolder


def qmm(*args):
    """`qmm` in-process for build and merge; the converters in their own process, as users run them."""
    from qwen_merge_mcore.cli import main

    args = [str(a) for a in args]
    if args[0] in ("build", "merge"):
        assert main(args) == 0, f"qmm {' '.join(args)} failed"
        return
    out = subprocess.run([sys.executable, "-m", "qwen_merge_mcore", *args], capture_output=True, text=True)
    assert out.returncode == 0, f"qmm {' '.join(args)} failed:\n{out.stderr[-3000:]}"


def test_merged_qwen_merge_round_trips_through_megatron(tiny, tiny_pair, tmp_path):
    built = []
    for i, parts in enumerate(tiny_pair):
        qmm("build", "--vlm", parts["qwen2_5_vl"], "--llm", parts["qwen3"], "--out", tmp_path / f"qm{i}")
        built.append(tmp_path / f"qm{i}")
    merged = tmp_path / "merged"
    # The realistic case: two Qwen-Merge models, task vectors against the plain Qwen3 they started from.
    qmm("merge", "--method", "ties", "--model", built[0], "--model", built[1], "--base", tiny["qwen3"],
        "--density", "0.5", "--out", merged, "--no-progress")
    qmm("hf2mcore", "--hf", merged, "--out", tmp_path / "mcore", "--tp", 1, "--pp", 1)
    qmm("mcore2hf", "--mcore", tmp_path / "mcore", "--out", tmp_path / "back")
    want, got = SafetensorsFolder(merged), SafetensorsFolder(tmp_path / "back")
    assert sorted(got.names()) == sorted(want.names())
    for name in want.names():
        a, b = want.get(name), got.get(name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    first = SafetensorsFolder(built[0])
    assert torch.equal(first.get("visual.merger.mlp.4.weight"), want.get("visual.merger.mlp.4.weight"))
