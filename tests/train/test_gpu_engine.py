"""The GPU engine on one GPU without Transformer Engine: the local spec, Megatron-Core DDP
(overlapped grad reduce and param gather), the distributed optimizer, the no-pipelining schedule.

One spawned GPU rank runs every case (one step to compare with the CPU engine, then save and
resume); the CPU engine's twin of that step runs in a CPU-only rank. Assertions are here.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from . import gpu_path_cases as cases

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def _environ(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def runs(distributed, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gpu_engine"))
    # cuBLAS reads it when it creates its handle: deterministic workspaces for the resume case.
    with _environ(CUBLAS_WORKSPACE_CONFIG=":4096:8"):
        (gpu,) = distributed(cases.gpu_cases, world_size=1, backend="nccl", args=(root,))
    with _environ(CUDA_VISIBLE_DEVICES=""):  # the CPU engine as it runs on CPU machines
        (cpu,) = distributed(cases.cpu_twin_step, world_size=1, args=(root,))
    return {"gpu": gpu, "cpu": cpu}


def test_gpu_engine_step_equals_cpu_engine_step(runs):
    gpu, cpu = runs["gpu"]["step"]["result"], runs["cpu"]["result"]
    assert not gpu["skipped"] and not cpu["skipped"]
    assert gpu["num_tokens"] == cpu["num_tokens"]
    # Both float32 on the same weights and micro-batches (the last one text-only); only the
    # kernels' summation order differs (cuBLAS and SDPA on the GPU, CPU BLAS), about 1e-6
    # relative on a 4-layer model. A wrong normalisation, a scaled loss or a missed gradient
    # moves these by orders of magnitude more.
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-5)
    assert gpu["grad_norm"] == pytest.approx(cpu["grad_norm"], rel=1e-4)
    # The update: Adam's first step moves each weight by about lr = 1e-3 (clipped gradients);
    # the two engines agree to 1 % of that.
    params_gpu, params_cpu = runs["gpu"]["step"]["params"], runs["cpu"]["params"]
    assert params_gpu.keys() == params_cpu.keys()
    worst = max((params_gpu[n] - params_cpu[n]).abs().max().item() for n in params_cpu)
    assert worst < 1e-5, worst


def test_gpu_engine_sets_the_schedule_hooks_as_megatron_lm(runs):
    hooks = runs["gpu"]["step"]["hooks"]
    # No interleaving: no aligned param all-gather, so no param_sync_func (it would dispatch the
    # buckets a second time); the loss-scale hook always.
    assert hooks == {"param_sync_func": None, "align_param_gather": False, "grad_scale_func": True}


def test_gpu_resume_with_async_save_is_bit_identical(runs):
    r = runs["gpu"]["resume"]
    assert r["interrupted"] and len(r["stopped"]) == 2 and r["resumed_from"] == 2, r
    # Exact: same data order, optimizer state (the distributed optimizer's fully reshardable
    # checkpoint), LR step and RNG, deterministic kernels; the last micro-batch of every step
    # was text-only (DDP's gradient invariant on the real DDP).
    # The resumed run's summary holds the whole curve, the steps before the stop included.
    assert r["stopped"] == r["full"][:2] and r["resumed"] == r["full"]
