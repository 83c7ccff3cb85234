"""What both training engines share: the step's result and the engine protocol.

An engine owns the wrapped model chunks and the optimizer. `train_step` runs forward and
backward over the micro-batches of one global batch, averages the loss over the assistant
tokens of all micro-batches and data-parallel ranks, clips and applies the update, or skips it
when the loss or the gradient norm is not finite. The rest of the system (model, data, loss,
stages, checkpoints, logging, signals) is shared. `engine.py` picks and builds one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from ..batch import Batch


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

    def sync_params(self) -> None:
        """Make every rank's model weights those of the last update (called before a save)."""

    def optimizer_sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool) -> dict: ...

    def load_optimizer_state_dict(self, state_dict: dict) -> None: ...


def finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)
