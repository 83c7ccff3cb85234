"""The GPU engine: Megatron-Core DDP (contiguous grad buffers, overlapped bucketed grad
reduce-scatter), the distributed optimizer (overlapped param all-gather) and Megatron-Core's
forward-backward schedules (no pipelining, 1F1B, interleaved 1F1B with virtual stages).

Loss normalisation follows Megatron's `calculate_per_token_loss`: each micro-batch's loss is a
sum over its assistant tokens, and `finalize_model_grads` divides the reduced gradients by the
token count of the whole global batch, all DP ranks.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..batch import Batch
from ..config import ExperimentConfig
from ..dtypes import torch_dtype
from .engine import StepResult, finite
from .loss import forward_step

# Distributed-optimizer state sharded in model space: reloads at another DP, TP or PP.
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class GPUEngine:
    def __init__(self, cfg: ExperimentConfig, models: list[torch.nn.Module]):
        self.cfg = cfg
        t, p = cfg.train, cfg.precision
        config = models[0].config  # the TransformerConfig the model was built with
        for chunk in models:
            chunk.config.calculate_per_token_loss = True  # DDP reads it: no 1/DP pre-scaling
            chunk.config.variable_seq_lengths = True  # packed batches: shapes may vary per step
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=True, overlap_param_gather=True,
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
        # Hooks the schedules use to overlap communication with compute.
        config.no_sync_func = [m.no_sync for m in self.models]
        config.grad_sync_func = [m.start_grad_sync for m in self.models]
        config.param_sync_func = [m.start_param_sync for m in self.models]
        if len(self.models) == 1:
            config.no_sync_func = config.no_sync_func[0]
            config.grad_sync_func = config.grad_sync_func[0]
            config.param_sync_func = config.param_sync_func[0]
        config.finalize_model_grads_func = finalize_model_grads
        self.forward_backward = get_forward_backward_func()

    def unwrapped(self) -> list[torch.nn.Module]:
        return [m.module for m in self.models]

    def train_step(self, data: Iterator[Batch], num_microbatches: int) -> StepResult:
        for chunk in self.models:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        # One iterator per virtual stage; all chunks of a rank see the same micro-batches.
        iterators = data if len(self.models) == 1 else [data] * len(self.models)
        reported = self.forward_backward(
            forward_step_func=forward_step, data_iterator=iterators, model=self.models,
            num_microbatches=num_microbatches, seq_length=self.cfg.data.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size, forward_only=False)
        totals = torch.zeros(2, dtype=torch.float64, device="cuda")
        for item in reported:  # empty except on the last pipeline stage
            totals += item["lm loss"].double()
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
        loss_sum, tokens = totals.tolist()
        loss = loss_sum / max(tokens, 1.0)
        # The optimizer's own step would apply a non-finite update; check the norm first.
        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        if not finite(loss, grad_norm):
            self.optimizer.zero_grad()
            return StepResult(loss, int(tokens), grad_norm, skipped=True)
        ok, grad_norm, _ = self.optimizer.step()
        return StepResult(loss, int(tokens), float(grad_norm), skipped=not ok)

    def optimizer_sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool) -> dict:
        return self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading,
                                                 metadata=OPTIM_METADATA)

    def load_optimizer_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)
