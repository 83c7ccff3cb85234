"""The training loop, the same on GPU and CPU; the engine (engine.py) does the step itself."""

from __future__ import annotations

import functools
import random
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..config import ExperimentConfig
from ..data.vision_cache import open_for_training
from ..perf.flops import BatchStats, step_flops
from . import checkpointing, data_source
from .checkpointing import Checkpointer, TrainState
from .engine import build_engine
from .errors import NonFiniteError
from .model_provider import ModelBuilder, build_chunks, check_freeze, format_report, parameter_report
from .observability import StepLogger, Summary
from .optim import build_scheduler
from .signals import ExitSignals


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _flops(cfg: ExperimentConfig, batches) -> float:
    """Model FLOPs of this rank's micro-batches (the planner's count, ViT included; no recompute)."""
    return sum(step_flops(cfg.model, BatchStats.from_batch(b), freeze=cfg.train.freeze,
                          tensor_parallel_size=cfg.parallel.tensor_model_parallel_size) for b in batches)


def seed_everything(seed: int) -> None:
    """Megatron's rule: one seed per pipeline stage (CPU-initialised weights are split across TP
    after being drawn whole, so TP ranks share it)."""
    from megatron.core import tensor_parallel

    seed += 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def run_training(cfg: ExperimentConfig, builder: Optional[ModelBuilder] = None,
                 make_data: Optional[Callable] = None) -> Summary:
    """Train one stage on an initialised process group (see `qwen_merge_mcore.distributed`)."""
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg.data_parallel_size(world)  # refuses a world the batch cannot use (as `qmm config --world-size`)
    ckpt = Checkpointer(cfg.checkpoint.save, cfg.checkpoint.keep_last, cfg.checkpoint.async_save,
                        checkpointing.find_hf_meta(cfg.checkpoint.pretrained, cfg.checkpoint.save),
                        save_hf=cfg.model if cfg.checkpoint.save_hf else None)
    resuming = cfg.checkpoint.save is not None and checkpointing.latest_iteration(cfg.checkpoint.save) is not None

    seed_everything(cfg.train.seed)
    chunks = build_chunks(cfg, builder)
    report = parameter_report(chunks)
    check_freeze(report, list(cfg.train.freeze))
    if cfg.checkpoint.pretrained and not resuming:  # before the engine copies params (fp32 main params)
        source = checkpointing.load_weights(cfg.checkpoint.pretrained, chunks, cfg.model)
    engine = build_engine(cfg, chunks)
    vision_cache = open_for_training(cfg, chunks)  # after the weights: it is keyed by their hash
    data = (make_data or functools.partial(data_source.build_data, vision_cache=vision_cache))(cfg, dp_rank, dp)
    total = data_source.train_iters(cfg, data)
    scheduler = build_scheduler(engine.optimizer, cfg.train, total)
    state = ckpt.resume(engine, scheduler, data) if resuming else None
    log = StepLogger(cfg, rank, world, state.iteration if state else 0, total,
                     fp8_model=chunks[0].config.fp8 is not None)
    log.info(f"[{cfg.train.stage}] world {world} (TP {cfg.parallel.tensor_model_parallel_size}, PP "
             f"{cfg.parallel.pipeline_model_parallel_size}, DP {dp}), engine {type(engine).__name__}, "
             f"{cfg.train.global_batch_samples} samples/step in {dp} x M micro-batches ({cfg.data.packing}), {total} steps; frozen: {', '.join(cfg.train.freeze) or 'none'}\n"
             + format_report(report))
    if state:
        log.info(f"[{cfg.train.stage}] resumed from {cfg.checkpoint.save} at iteration {state.iteration}")
    elif cfg.checkpoint.pretrained:
        log.info(f"[{cfg.train.stage}] weights loaded from {source}")
    state = state or TrainState()

    signals, interrupted, saved = ExitSignals(), False, None
    try:
        while state.iteration < total:
            # ---- one step -----------------------------------------------------------------
            start, lr = time.perf_counter(), engine.optimizer.param_groups[0]["lr"]
            microbatches = data.next_step()  # M, the same on every rank
            batches = data_source.Recorder(data)
            result = engine.train_step(batches, microbatches)
            state.iteration += 1
            state.losses.append(result.loss)
            if result.skipped:
                state.nan_steps += 1
                if state.nan_steps > cfg.train.max_nan_steps:
                    raise NonFiniteError(f"{state.nan_steps} steps had a non-finite loss or gradient norm "
                                             f"(limit train.max_nan_steps={cfg.train.max_nan_steps}); last at "
                                             f"iteration {state.iteration}: loss {result.loss}, "
                                             f"grad norm {result.grad_norm}")
            else:
                scheduler.step(1)
            work = torch.tensor([sum(b.tokens.numel() for b in batches.batches), _flops(cfg, batches.batches)],
                                dtype=torch.float64, device=_device())
            dist.all_reduce(work, group=parallel_state.get_data_parallel_group())
            log.step(state.iteration, result, lr, time.perf_counter() - start,
                     float(work[0]), float(work[1]))
            # ---- checkpoints and signals ----------------------------------------------------
            ckpt.poll()
            interrupted = signals.any_rank_received()
            if interrupted or state.iteration % cfg.checkpoint.save_interval == 0 or state.iteration == total:
                saved = ckpt.save(state.iteration, engine, scheduler, data.state_dict(), state) or saved
            if interrupted:
                log.info(f"[{cfg.train.stage}] stopping on signal at iteration {state.iteration}; "
                         f"checkpoint {saved}")
                break
        ckpt.wait()
        if vision_cache is not None:
            vision_cache.close()  # the last partial shard
    finally:
        signals.restore()
    return log.finish(state.nan_steps, interrupted, str(saved) if saved else None, state.losses)
