"""Optimizer parameter groups and the LR schedule (Megatron-Core's OptimizerParamScheduler)."""

from __future__ import annotations

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from ..config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters; no weight decay on biases and norms (1-D tensors), as Megatron does."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
    return [g for g in groups if g["params"]]


def warmup_steps(train: TrainConfig, train_iters: int) -> int:
    return int(round(train.lr_warmup_fraction * train_iters))


# What a resume compares with its checkpoint's schedule (the config's values win).
SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style")


def build_scheduler(optimizer, train: TrainConfig, train_iters: int) -> OptimizerParamScheduler:
    """Linear warmup over `lr_warmup_fraction` of the steps, then `lr_decay_style` down to min_lr.
    On a resume the step count comes from the checkpoint and the shape from this config
    (Megatron's --override-opt_param-scheduler): a run resumed with a longer train.train_iters
    decays over the new length instead of training on at min_lr."""
    warmup = warmup_steps(train, train_iters)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=train.lr, min_lr=train.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(train_iters, warmup + 1), lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay, end_wd=train.weight_decay, wd_incr_steps=train_iters,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True)
