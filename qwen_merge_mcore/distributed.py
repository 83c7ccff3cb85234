"""Process groups and Megatron-Core's parallel state: set up from torchrun or Slurm variables
(`initialize`), or for N ranks spawned on this machine (`run_distributed`, what the converters and
`qmm compare` use when not launched by torchrun/srun, and the tests' harness).

    results = run_distributed(check_fn, world_size=2, tp=2, args=(tmp_path,))

`fn(*args)` runs on every rank after `initialize`; its return values come back as a list indexed
by rank. An exception on any rank fails the call with that rank's traceback, or, when it is a user
error (one the CLI prints as one line), with a RankError holding that line. `fn` must be
importable (a module-level function), as with any spawned process.

The ranks are forked from this process where that is safe (`start_method`): a spawned rank
re-imports torch and Megatron, 2 to 3 s on a small machine, more than a 3 GB conversion's writes.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import socket
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .config import ParallelConfig


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int


def launched() -> bool:
    """Started by torchrun or srun (one process per rank), rather than as one plain process."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_info_from_env() -> RankInfo:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; `srun` sets SLURM_PROCID/NTASKS/LOCALID."""
    env = os.environ
    if "RANK" in env:
        return RankInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env:
        return RankInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return RankInfo(0, 1, 0)


def initialize(parallel: ParallelConfig, seed: int = 1234, backend: str | None = None,
               timeout_minutes: int = 30) -> RankInfo:
    """Start the default process group (NCCL on GPUs, gloo on CPU) and Megatron-Core's groups."""
    from megatron.core import parallel_state, tensor_parallel

    info = rank_info_from_env()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # A single plain process rendezvouses with itself: any free port, so that two runs on one
    # machine do not collide on a fixed one. Launched ranks must agree: torchrun and
    # slurm/common.sh set MASTER_PORT; 29500 is torchrun's default.
    os.environ.setdefault("MASTER_PORT", "29500" if launched() else str(free_port()))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), rank=info.rank,
                                world_size=info.world_size, timeout=datetime.timedelta(minutes=timeout_minutes))
    model_parallel = parallel.model_parallel_size
    if info.world_size % model_parallel:
        raise ValueError(f"world size {info.world_size} is not divisible by TP x PP x CP = {model_parallel}: start "
                         f"a multiple of {model_parallel} processes (torchrun --nproc-per-node, srun -n)")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        # Megatron's default tracker forks CUDA RNG state; the inference tracker works on CPU.
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    return info


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _worker(rank: int, world_size: int, port: int, parallel: ParallelConfig, collective_timeout_minutes: int,
            backend: str, forked: bool, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # N ranks share the machine's cores
    try:
        initialize(parallel, backend=backend, timeout_minutes=collective_timeout_minutes)
        # Plain pickle copies tensor data; the queue's own pickler would pass tensors as shared
        # file descriptors, which break when this rank exits before the parent reads them.
        result = pickle.dumps(fn(*args))
        if forked and dist.is_initialized():
            dist.barrier()  # every rank is past its last collective: closing the sockets loses nothing
        queue.put((rank, True, result))
        if forked:
            # A forked rank ends with os._exit (multiprocessing's way), without Python's teardown,
            # and its process groups go with it. Destroying them first waited a gloo loop tick per
            # connection, 0.1 to 0.2 s, a fifth of a small conversion.
            return
    except BaseException as err:
        from .cli import error_line, is_user_error

        queue.put((rank, False, (traceback.format_exc(), error_line(err) if is_user_error(err) else None)))
    try:
        destroy()
    except Exception:
        pass


def _gloo_threads_alive() -> bool:
    """Whether this process holds gloo's native threads: process groups alive, even destroyed ones
    whose objects something still references (Megatron's parallel state, a loader's one-process
    group). True where /proc cannot tell."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return True
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                if "gloo" in f.read():
                    return True
        except OSError:
            continue
    return False


def start_method(backend: str) -> str:
    """"fork" where a forked rank inherits nothing it cannot use, else "spawn".

    Not on CUDA machines (a forked child cannot use CUDA once its parent has touched the driver,
    and asking whether there is a GPU touches it; NCCL ranks take a GPU each anyway), not with
    other Python threads running (a lock one of them holds would stay held in the child forever)
    and not with any process group alive here (`_gloo_threads_alive`): the child would share its
    sockets, and freeing it there runs its destructor, which joins threads the child does not
    have and never returns (seen: a rank hung in `initialize_model_parallel`)."""
    import threading

    if (backend != "gloo" or threading.active_count() > 1 or dist.is_initialized() or _gloo_threads_alive()
            or "fork" not in mp.get_all_start_methods() or torch.cuda.is_available()):
        return "spawn"
    # What every rank imports in `initialize`, imported once here for all of them to inherit.
    import megatron.core.parallel_state  # noqa: F401
    import megatron.core.tensor_parallel  # noqa: F401
    return "fork"


def run_distributed(fn: Callable, world_size: int = 2, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                    args: tuple = (), timeout: float = 600, collective_timeout_minutes: int = 5,
                    backend: str = "gloo") -> list[Any]:
    """`fn(*args)` on `world_size` CPU processes (gloo; forked where `start_method` allows) with
    Megatron's parallel state;
    `backend="nccl"` runs the ranks on GPUs (one each), for the GPU engine's tests.

    `timeout`: seconds to wait for all results. `collective_timeout_minutes`: how long a rank waits
    in one collective for the others; a converter's ranks meet at the end of writing their shards,
    so for a 72B model it must cover the slowest rank's whole write (`qmm hf2mcore
    --timeout-minutes`)."""
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp)
    method = start_method(backend)
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, parallel, collective_timeout_minutes, backend,
                                               method == "fork", fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failed = None
    try:
        for _ in procs:
            rank, ok, payload = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                failed = (rank, *payload)
                break  # the other ranks may be stuck in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if failed else 30)
            if p.is_alive():
                p.kill()
    if failed:
        rank, trace, line = failed
        if line is not None:  # an error that says what is wrong: one line, the traceback as its cause
            raise RankError(f"rank {rank}: {line}") from RankTraceback(trace)
        raise RuntimeError(f"rank {rank} failed:\n{trace}")
    return [results[r] for r in range(world_size)]


class RankError(RuntimeError):
    """A rank stopped on a user error (bad input, a damaged checkpoint): its one-line message,
    which the CLI prints as it is (qwen_merge_mcore/cli.py)."""


class RankTraceback(Exception):
    """The failed rank's traceback, as text (shown by a test's report, not by the CLI)."""
