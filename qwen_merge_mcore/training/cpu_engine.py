"""The CPU engine: PP=1 forward-backward with gradient accumulation, a gloo all-reduce of the
gradients across data-parallel ranks, and torch AdamW.

Megatron-Core's DDP grad buffers, distributed optimizer and forward-backward schedules
allocate on CUDA, so this small engine stands in on CPU. It computes exactly what the GPU
engine computes: gradients of the summed token loss, all-reduced over DP, divided by the
assistant-token count of the whole global batch; the gradient norm over all model-parallel
shards, counting TP-replicated parameters once. It also holds Megatron-Core DDP's invariant
(with overlap_grad_reduce): every trainable parameter receives a gradient in the last
micro-batch of every step, or the GPU run stops at the bucket's grad sync; here the step fails
with the parameters named, instead of training on.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                        optim_state_to_sharding_state)
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..batch import Batch
from ..config import ExperimentConfig
from .loss import forward_step
from .optim import param_groups
from .step import StepResult, finite


class CPUEngine:
    def __init__(self, cfg: ExperimentConfig, models: list[torch.nn.Module]):
        (self.model,) = models  # PP=1, fp32: checked by engine.select_engine
        self.cfg = cfg
        self.models = models
        self.names = {p: name for name, p in self.model.named_parameters() if p.requires_grad}
        self.params = list(self.names)
        # DDP's grad-ready hook fires per parameter on each backward; count it on the last one.
        self._ready: Optional[set] = None
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)
        self.tp_sum, self.tp_avg = _tp_replicated_with_local_grads(self.model)
        t = cfg.train
        self.optimizer = torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr,
                                           betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                           weight_decay=t.weight_decay)

    def train_step(self, data: Iterator[Batch], num_microbatches: int) -> StepResult:
        self.model.train()
        for p in self.params:
            p.grad = None
        totals = torch.zeros(2, dtype=torch.float64)  # loss sum, tokens
        for i in range(num_microbatches):
            output, loss_fn = forward_step(data, self.model)
            loss_sum, _, reported = loss_fn(output)
            self._ready = set() if i == num_microbatches - 1 else None
            loss_sum.backward()
            totals += reported["lm loss"].double()
        self._check_every_param_got_a_grad()
        dp_group = parallel_state.get_data_parallel_group()
        dist.all_reduce(totals, group=dp_group)
        loss_sum, tokens = totals.tolist()
        loss = loss_sum / max(tokens, 1.0)
        self._sync_tp_replicated_grads()
        self._reduce_grads(dp_group, scale=1.0 / max(tokens, 1.0))
        grad_norm = self._grad_norm()
        if not finite(loss, grad_norm):
            return StepResult(loss, int(tokens), grad_norm, skipped=True)
        if self.cfg.train.clip_grad > 0:
            clip = self.cfg.train.clip_grad / (grad_norm + 1e-6)
            if clip < 1.0:
                for p in self.params:
                    p.grad.mul_(clip)
        self.optimizer.step()
        return StepResult(loss, int(tokens), grad_norm, skipped=False)

    def unwrapped(self) -> list[torch.nn.Module]:
        return self.models

    def sync_params(self) -> None:
        """Every rank updated its whole copy of the weights in place: nothing to gather."""

    def _grad_ready(self, param: torch.Tensor) -> None:
        if self._ready is not None:
            self._ready.add(param)

    def _check_every_param_got_a_grad(self) -> None:
        missing = [self.names[p] for p in self.params if p not in self._ready]
        self._ready = None
        if missing:
            names = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
            raise RuntimeError(
                f"{len(missing)} trainable parameters got no gradient in the last micro-batch of the step ({names}): "
                "Megatron-Core DDP (overlap_grad_reduce) stops on this ('Communication call has not been issued'); "
                "every trainable part must take part in every forward")

    def _sync_tp_replicated_grads(self) -> None:
        """As Megatron's finalize_model_grads: TP-replicated weights that see only this rank's
        heads (q/k layernorm) sum their gradients over TP, so the replicas stay identical."""
        group = parallel_state.get_tensor_model_parallel_group()
        if dist.get_world_size(group) == 1:
            return
        for params, avg in ((self.tp_sum, False), (self.tp_avg, True)):
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=group)
                    if avg:
                        p.grad.div_(dist.get_world_size(group))

    def _reduce_grads(self, group, scale: float) -> None:
        grads = [p.grad for p in self.params]
        flat = _flatten_dense_tensors(grads)
        if dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        flat.mul_(scale)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    def _grad_norm(self) -> float:
        sq = torch.zeros(1, dtype=torch.float64)
        for p in self.params:
            if param_is_not_tensor_parallel_duplicate(p):
                sq += p.grad.double().pow(2).sum()
        dist.all_reduce(sq, group=parallel_state.get_model_parallel_group())
        return float(sq.sqrt())

    def optimizer_sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool) -> dict:
        if is_loading:
            self._init_state()
        state = self.optimizer.state_dict()
        steps = {float(s["step"]) for s in state["state"].values() if "step" in s}
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self._optimizer_params())
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        return {"torch_adamw": state, "step": steps.pop() if steps else 0.0}

    def load_optimizer_state_dict(self, state_dict: dict) -> None:
        state = state_dict["torch_adamw"]
        for param_state in state["state"].values():
            param_state["step"] = torch.tensor(state_dict["step"], dtype=torch.float32)
        current = self.optimizer.state_dict()
        for group, saved in zip(current["param_groups"], state["param_groups"]):
            saved["params"] = group["params"]
        self.optimizer.load_state_dict(state)

    def _optimizer_params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _init_state(self) -> None:
        """Create AdamW's moment tensors so a checkpoint can be loaded into them."""
        for p in self._optimizer_params():
            s = self.optimizer.state[p]
            if not s:
                s["step"] = torch.tensor(0.0)
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _tp_replicated_with_local_grads(model: torch.nn.Module) -> tuple[list, list]:
    """(sum over TP, average over TP) parameter lists, by Megatron's finalize_model_grads rules."""
    config = model.config
    summed, averaged = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "average_gradients_across_tp_domain", False):
            averaged.append(p)
        elif (config.sequence_parallel and getattr(p, "sequence_parallel", False)) or (
                config.qk_layernorm and ("q_layernorm" in name or "k_layernorm" in name)):
            summed.append(p)
    return summed, averaged
