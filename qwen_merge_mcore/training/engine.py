"""The engine seam: everything that differs between the GPU and the CPU training step.

An engine owns the wrapped model chunks and the optimizer. `train_step` runs forward and
backward over the micro-batches of one global batch, averages the loss over the assistant
tokens of all micro-batches and data-parallel ranks, clips and applies the update, or skips it
when the loss or the gradient norm is not finite. The rest of the system (model, data, loss,
stages, checkpoints, logging, signals) is shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from ..batch import Batch
from ..config import ExperimentConfig


@dataclass
class StepResult:
    loss: float  # mean per-token loss over the assistant tokens of the global batch
    num_tokens: int  # assistant (loss) tokens in the global batch, all DP ranks
    grad_norm: float  # before clipping; nan/inf when the step was skipped for it
    skipped: bool  # the loss or the gradient norm was not finite: no update was applied


class Engine(Protocol):
    models: list[torch.nn.Module]  # model chunks, wrapped as the engine needs (DDP on GPU)
    optimizer: object  # has .param_groups for the LR scheduler

    def train_step(self, data: Iterator[Batch], num_microbatches: int) -> StepResult: ...

    def unwrapped(self) -> list[torch.nn.Module]: ...

    def optimizer_sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool) -> dict: ...

    def load_optimizer_state_dict(self, state_dict: dict) -> None: ...


def finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def select_engine(cfg: ExperimentConfig) -> str:
    """`auto` -> `gpu` where CUDA is present; the GPU engine refuses to run without it."""
    name = cfg.train.engine
    cuda = torch.cuda.is_available()
    if name == "auto":
        return "gpu" if cuda else "cpu"
    if name == "gpu" and not cuda:
        raise ValueError("train.engine=gpu needs CUDA (Megatron-Core DDP, distributed optimizer and "
                         "schedules allocate on the GPU); use train.engine=cpu or auto on this machine")
    return name


def build_engine(cfg: ExperimentConfig, models: list[torch.nn.Module]) -> Engine:
    if select_engine(cfg) == "gpu":
        from .gpu_engine import GPUEngine

        return GPUEngine(cfg, models)
    from .cpu_engine import CPUEngine

    return CPUEngine(cfg, models)
