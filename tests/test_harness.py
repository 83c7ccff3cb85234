"""The CPU multi-process harness sets up gloo and Megatron-Core's parallel state."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _report_state():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    return {
        "tp_size": ps.get_tensor_model_parallel_world_size(), "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_size": ps.get_pipeline_model_parallel_world_size(), "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_size": ps.get_data_parallel_world_size(), "tp_sum": t.item(),
    }


def _column_parallel_output():
    """A Megatron-Core ColumnParallelLinear shard gives its slice of the full output at any TP."""
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    torch.manual_seed(0)
    full = torch.randn(8, 6)
    config = ModelParallelConfig(tensor_model_parallel_size=torch.distributed.get_world_size(),
                                 use_cpu_initialization=True, params_dtype=torch.float32)
    layer = ColumnParallelLinear(6, 8, config=config, init_method=lambda w: None, bias=False,
                                 gather_output=False)
    from megatron.core import parallel_state as ps
    rows = 8 // ps.get_tensor_model_parallel_world_size()
    rank = ps.get_tensor_model_parallel_rank()
    layer.weight.data.copy_(full[rank * rows:(rank + 1) * rows])
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    out, _ = layer(x)
    return (out - x @ full[rank * rows:(rank + 1) * rows].t()).abs().max().item()


def test_tp2_pp2_layout(distributed):
    states = distributed(_report_state, world_size=4, tp=2, pp=2)
    assert [s["tp_size"] for s in states] == [2] * 4 and [s["pp_size"] for s in states] == [2] * 4
    assert sorted((s["pp_rank"], s["tp_rank"]) for s in states) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(s["dp_size"] == 1 for s in states)
    assert [s["tp_sum"] for s in states] == [1.0, 1.0, 5.0, 5.0]  # ranks {0,1} and {2,3}


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_layer_runs_on_cpu(distributed, tp):
    assert max(distributed(_column_parallel_output, world_size=tp, tp=tp)) < 1e-6


def _fail():
    raise ValueError("boom on purpose")


def test_errors_carry_the_rank_traceback(distributed):
    with pytest.raises(RuntimeError, match="boom on purpose"):
        distributed(_fail, world_size=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="ranks are spawned on CUDA machines")
def test_ranks_are_forked_where_safe_and_spawned_otherwise(distributed):
    """Forked ranks skip re-importing torch and Megatron (the converters' start-up); a thread
    running here, process groups left here, or the NCCL backend make the harness spawn them."""
    import threading

    from qwen_merge_mcore.distributed import start_method

    assert threading.active_count() == 1, [t.name for t in threading.enumerate()]
    assert start_method("gloo") == "fork" and start_method("nccl") == "spawn"
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        assert start_method("gloo") == "spawn"
    finally:
        stop.set()
        worker.join()
    assert distributed(_report_state, world_size=2, tp=2)[1]["tp_sum"] == 1.0  # forked ranks still work
    # Groups that in-process work created, even destroyed (a loader's one-process group under
    # Megatron's parallel state), leave gloo threads behind: a forked rank freeing such a group ran
    # its destructor, which waited forever for threads the fork does not copy. (In a child
    # process: this one's later tests should still fork.)
    script = ("from megatron.core import parallel_state\n"
              "from qwen_merge_mcore.checkpoint.common import single_process_group\n"
              "from qwen_merge_mcore.distributed import run_distributed, start_method\n"
              "from tests.test_harness import _report_state\n"
              "with single_process_group():\n"
              "    parallel_state.initialize_model_parallel()\n"
              "parallel_state.destroy_model_parallel()\n"
              "print(start_method('gloo'), run_distributed(_report_state, world_size=2, tp=2)[1]['tp_sum'])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["spawn", "1.0"], done.stdout


@pytest.mark.gpu
def test_gpu_marker_runs_only_with_cuda():
    assert torch.cuda.is_available()
