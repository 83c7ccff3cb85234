"""The GPU engine: Megatron-Core DDP (contiguous grad buffers, overlapped bucketed grad
reduce-scatter), the distributed optimizer (overlapped param all-gather) and Megatron-Core's
forward-backward schedules (no pipelining, 1F1B, interleaved 1F1B with virtual stages).

Loss normalisation follows Megatron's `calculate_per_token_loss`: each micro-batch's loss is a
sum over its assistant tokens, and `finalize_model_grads` divides the reduced gradients by the
token count of the whole global batch, all DP ranks. The hooks and the step follow Megatron-LM's
`train()` / `train_step()` at core_v0.16.1.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..batch import Batch
from ..config import ExperimentConfig
from ..dtypes import torch_dtype
from .loss import forward_step
from .step import StepResult, finite

# Distributed-optimizer state sharded in model space: reloads at another DP, TP or PP. The
# memory-efficient exchange gathers each shard's fp32 state on DP rank 0 only (over gloo), not on
# every DP rank.
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                  "distrib_optim_fully_reshardable_mem_efficient": True}


def chunk_iterators(data: Iterator[Batch], num_chunks: int) -> Iterator[Batch] | list[Iterator[Batch]]:
    """The schedule's `data_iterator`: one iterator per virtual pipeline stage over the same
    stream. The interleaved schedule calls `next()` on chunk k's iterator once per forward of
    chunk k, so each chunk must see micro-batches 0..M-1 in order, while the stream advances M
    per step (Megatron-LM builds one data iterator per virtual stage for the same reason)."""
    if num_chunks == 1:
        return data
    return list(itertools.tee(data, num_chunks))


def _per_chunk(funcs: list):
    return funcs[0] if len(funcs) == 1 else funcs


class GPUEngine:
    def __init__(self, cfg: ExperimentConfig, models: list[torch.nn.Module]):
        self.cfg = cfg
        t, p = cfg.train, cfg.precision
        config = models[0].config  # the schedules read the hooks from the first chunk's config
        interleaved = len(models) > 1
        for chunk in models:
            chunk.config.calculate_per_token_loss = True  # DDP reads it: no 1/DP pre-scaling
            chunk.config.variable_seq_lengths = True  # packed batches: shapes may vary per step
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=True, overlap_param_gather=True,
            # Megatron-LM aligns param all-gathers across pipeline stages (dispatched by the
            # schedule through param_sync_func) for the interleaved schedule only.
            align_param_gather=interleaved,
            use_distributed_optimizer=True, check_for_nan_in_grad=False, average_in_collective=False)
        self.models = [DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                               disable_bucketing=i > 0)
                       for i, chunk in enumerate(models)]
        for chunk in self.models:
            chunk.broadcast_params()  # identical replicas before the first step
        opt_config = OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad, bf16=p.params_dtype == "bf16",
            fp16=p.params_dtype == "fp16", params_dtype=torch_dtype(p.params_dtype), use_distributed_optimizer=True,
            overlap_param_gather=True)
        self.optimizer = get_megatron_optimizer(opt_config, self.models)
        # As Megatron-LM sets it: the schedules scale each micro-batch's loss before backward
        # (x1 in bf16/fp32; the dynamic loss scale in fp16, unscaled again by prepare_grads).
        config.grad_scale_func = self.optimizer.scale_loss
        # Hooks the schedules use to overlap communication with compute.
        config.no_sync_func = _per_chunk([m.no_sync for m in self.models])
        config.grad_sync_func = _per_chunk([m.start_grad_sync for m in self.models])
        if interleaved:
            config.param_sync_func = [m.start_param_sync for m in self.models]
        config.finalize_model_grads_func = finalize_model_grads
        self.forward_backward = get_forward_backward_func()

    def unwrapped(self) -> list[torch.nn.Module]:
        return [m.module for m in self.models]

    def sync_params(self) -> None:
        """With overlap_param_gather the optimizer updates only this rank's shard of the weights
        and the all-gather waits for the next forward; a save reads them now (Megatron-LM forces
        the same sync before every save)."""
        for chunk in self.models:
            chunk.start_param_sync(force_sync=True)

    def train_step(self, data: Iterator[Batch], num_microbatches: int) -> StepResult:
        for chunk in self.models:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reported = self.forward_backward(
            forward_step_func=forward_step, data_iterator=chunk_iterators(data, len(self.models)),
            model=self.models, num_microbatches=num_microbatches, seq_length=self.cfg.data.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size, forward_only=False)
        totals = torch.zeros(2, dtype=torch.float64, device="cuda")
        for item in reported:  # empty except on the last pipeline stage
            totals += item["lm loss"].double()
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
        loss_sum, tokens = totals.tolist()
        loss = loss_sum / max(tokens, 1.0)
        # Megatron-LM's step, with the non-finite check between its halves: main gradients
        # prepared once (copied from the DDP buffers; unscaled under a loss scaler), one norm,
        # clipping by it, then the update.
        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        if found_inf or not finite(loss, grad_norm):
            self.optimizer.zero_grad()
            return StepResult(loss, int(tokens), grad_norm, skipped=True)
        if self.cfg.train.clip_grad > 0:
            self._clip(grad_norm)
        ok = self.optimizer.step_with_ready_grads()
        return StepResult(loss, int(tokens), grad_norm, skipped=not ok)

    def _clip(self, grad_norm: float) -> None:
        """ChainedOptimizer.step's clipping, with the norm already computed."""
        for opt in self.optimizer.chained_optimizers:
            params = opt.get_parameters()
            if getattr(opt, "is_stub_optimizer", False) or not params:
                continue
            clip_grad_by_total_norm_fp32(params, max_norm=self.cfg.train.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)

    def optimizer_sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool) -> dict:
        return self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading,
                                                 metadata=OPTIM_METADATA)

    def load_optimizer_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)
