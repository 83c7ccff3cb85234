"""Run a function on N CPU processes with a gloo process group and Megatron-Core's parallel state.

    results = run_distributed(check_fn, world_size=2, tp=2, args=(tmp_path,))

`fn(*args)` runs on every rank after `qwen_merge_mcore.distributed.initialize`; its return values
come back as a list indexed by rank. An exception on any rank fails the call with that rank's
traceback. `fn` must be importable (a module-level function), as with any spawned process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback
from typing import Any, Callable

from ..config import ParallelConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, parallel: ParallelConfig, fn: Callable, args: tuple,
            queue, backend: str) -> None:
    import torch

    from .. import distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # N ranks share the machine's cores
    try:
        distributed.initialize(parallel, backend=backend, timeout_minutes=5)
        # Plain pickle copies tensor data; the queue's own pickler would pass tensors as shared
        # file descriptors, which break when this rank exits before the parent reads them.
        queue.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            distributed.destroy()
        except Exception:
            pass


def run_distributed(fn: Callable, world_size: int = 2, tp: int = 1, pp: int = 1, vpp: int | None = None,
                    args: tuple = (), timeout: float = 600, backend: str = "gloo") -> list[Any]:
    """`backend="nccl"` runs the ranks on GPUs (one each), for the GPU engine's tests."""
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, parallel, fn, args, queue, backend))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in procs:
            rank, ok, payload = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break  # the other ranks may be stuck in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
