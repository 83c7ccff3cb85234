"""Process-group and Megatron-Core parallel-state setup from torchrun or Slurm variables."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

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
