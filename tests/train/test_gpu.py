"""The GPU engine (Megatron-Core DDP, distributed optimizer, forward-backward schedules):
the 4B preset's shapes at reduced depth under FP8 log TFLOP/s per GPU and MFU; on 2 GPUs the
tiny model trains with 1F1B (PP=2) and interleaved (PP=2 x VPP=2) pipelines."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_merge_mcore.fixtures.tiny_data import make_tiny_data
from qwen_merge_mcore.quickstart import stage_config

REPO = Path(__file__).resolve().parents[2]


def _train(tmp_path: Path, nproc: int, overrides: list[str]) -> str:
    make_tiny_data(tmp_path / "data", samples=32, size=224)
    config = tmp_path / "stage3.yaml"
    config.write_text(stage_config("stage3", tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                           f"--master-port={port}", "-m", "qwen_merge_mcore", "train", "--config", str(config),
                           *overrides], cwd=REPO, capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    return log


@pytest.mark.gpu
@pytest.mark.te
def test_4b_shapes_fp8_log_tflops_and_mfu(tiny, tmp_path):
    # The tiny tokenizer's special-token ids, so that its placeholders are the model's.
    overrides = [
        "model.preset=qwen-merge-72bvit-4b", "model.backend=te", "model.language.num_layers=4",
        "model.vision.depth=4", "model.vision.fullatt_block_indexes=[1,3]", "model.image_token_id=6",
        "model.video_token_id=7", "model.vision_start_token_id=3", "model.vision_end_token_id=4",
        "parallel.tensor_model_parallel_size=1", "precision.params_dtype=bf16", "precision.fp8=hybrid",
        "precision.num_layers_at_start_in_bf16=0", "precision.num_layers_at_end_in_bf16=0",
        "train.engine=gpu", "train.train_iters=6", "train.global_batch_samples=2", "data.seq_length=2048",
        "data.max_pixels=50176", "checkpoint.pretrained=", f"data.tokenizer={tiny['qwen3']}",
        f"checkpoint.save={tmp_path / 'run'}", "checkpoint.save_interval=6",
    ]
    log = _train(tmp_path, 1, overrides)
    rates = re.findall(r"([0-9.]+) TFLOP/s/GPU \| MFU\s+([0-9.]+)%", log)
    assert len(rates) == 6, log[-5000:]
    tflops, mfu = map(float, rates[-1])
    assert tflops > 0 and 0 < mfu < 100, rates
    print(f"4B shapes, 4 layers, FP8: {tflops:.1f} TFLOP/s/GPU, MFU {mfu:.1f}%")


@pytest.mark.gpu
@pytest.mark.parametrize("vpp", [None, 2], ids=["1f1b", "interleaved"])
def test_pipeline_schedules_train(tiny, tmp_path, vpp):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (pipeline parallelism)")
    overrides = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2",
                 "precision.params_dtype=bf16", "model.backend=auto", "train.engine=gpu", "train.train_iters=8",
                 "checkpoint.pretrained=", f"data.tokenizer={tiny['qwen3']}", f"checkpoint.save={tmp_path / 'run'}"]
    if vpp:
        overrides.append(f"parallel.virtual_pipeline_model_parallel_size={vpp}")
    losses = [float(v) for v in re.findall(r"iter\s+\d+/8 \| loss ([0-9.]+)", _train(tmp_path, 2, overrides))]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
