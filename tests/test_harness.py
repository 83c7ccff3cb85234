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


# Run in a fresh interpreter: this test process may hold groups earlier tests left (then it spawns).
_START_METHODS = """
import threading
from megatron.core import parallel_state
from qwen_merge_mcore.checkpoint.common import single_process_group
from qwen_merge_mcore.distributed import run_distributed, start_method
from tests.test_harness import _report_state

seen = [start_method("gloo"), start_method("nccl")]
stop = threading.Event()
worker = threading.Thread(target=stop.wait)
worker.start()
seen.append(start_method("gloo"))
stop.set()
worker.join()
seen.append(run_distributed(_report_state, world_size=2, tp=2)[1]["tp_sum"])
with single_process_group():
    parallel_state.initialize_model_parallel()
parallel_state.destroy_model_parallel()
seen += [start_method("gloo"), run_distributed(_report_state, world_size=2, tp=2)[1]["tp_sum"]]
print(*seen)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="ranks are spawned on CUDA machines")
def test_ranks_are_forked_where_safe_and_spawned_otherwise():
    """Forked ranks skip re-importing torch and Megatron (the converters' start-up). A Python
    thread running, or the NCCL backend, makes the harness spawn them; so do groups created here
    before, even destroyed ones (a loader's one-process group under Megatron's parallel state):
    they leave gloo threads behind, and a forked rank freeing such a group ran its destructor,
    which waited forever for threads the fork does not copy. Ranks work either way."""
    done = subprocess.run([sys.executable, "-c", _START_METHODS], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-6:] == ["fork", "spawn", "spawn", "1.0", "spawn", "1.0"], done.stdout


@pytest.mark.gpu
def test_gpu_marker_runs_only_with_cuda():
    assert torch.cuda.is_available()
