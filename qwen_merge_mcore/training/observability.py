"""What a run tells its user: a log line per step, TensorBoard, optional Weights & Biases, a
progress bar on interactive runs, and a JSON summary at the end. Rank 0 reports; the numbers it
reports (loss, grad norm, token counts, FLOPs) are already reduced over all ranks."""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..config import ExperimentConfig
from ..utils.atomic import atomic_write_text

def peak_tflops(cfg: ExperimentConfig, device_name: Optional[str], fp8_model: bool) -> Optional[float]:
    """The MFU denominator: logging.peak_tflops, else the dense peak of a known GPU, in FP8 when
    the decoder actually runs FP8 (`precision.fp8` may have been turned off for its widths)."""
    from ..perf.hardware import gpu_spec_for_device

    if cfg.logging.peak_tflops is not None:
        return cfg.logging.peak_tflops
    spec = gpu_spec_for_device(device_name) if device_name else None
    return spec.peak_flops(fp8_model) / 1e12 if spec else None


def memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


WANDB_RUN_ID = "wandb_run_id.txt"


def wandb_resume(save: Optional[str]) -> dict:
    """`wandb.init`'s id and resume arguments: one Weights & Biases run per run folder, its id
    stored there on the first start, so that a resumed or requeued job continues that run."""
    if not save:
        return {}
    path = Path(save) / WANDB_RUN_ID
    if path.is_file():
        run_id = path.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:8]  # the form of wandb's own ids
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, run_id + "\n")
    return {"id": run_id, "resume": "allow"}


@dataclass
class StepRecord:
    iteration: int
    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    seconds: float
    tokens_per_s: float  # all tokens (prompt, answer, padding) of the global batch per second
    tflops_per_gpu: float
    mfu: Optional[float]
    memory_gib: float


@dataclass
class Summary:
    stage: str
    first_iteration: int  # where this process started (0, or the iteration it resumed from)
    last_iteration: int
    train_iters: int
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    nan_steps: int = 0
    interrupted: bool = False
    checkpoint: Optional[str] = None
    mean_tokens_per_s: Optional[float] = None
    mean_tflops_per_gpu: Optional[float] = None
    mean_mfu: Optional[float] = None
    wall_seconds: float = 0.0
    # Every step's loss from iteration 1, the steps before a resume included (from the checkpoint).
    losses: list = field(default_factory=list)


class StepLogger:
    def __init__(self, cfg: ExperimentConfig, rank: int, world_size: int, start: int, train_iters: int, *,
                 fp8_model: bool):
        self.cfg, self.active, self.world = cfg, rank == 0, world_size
        self.peak = peak_tflops(cfg, torch.cuda.get_device_name() if torch.cuda.is_available() else None, fp8_model)
        self.records: list[StepRecord] = []
        self.t0 = time.perf_counter()
        self.summary = Summary(cfg.train.stage, start, start, train_iters)
        self.tb = self.wandb = self.bar = None
        if not self.active:
            return
        log = cfg.logging
        if log.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("logging.tensorboard_dir needs tensorboard: "
                                  "pip install 'qwen_merge_mcore[tensorboard]'") from None
            self.tb = SummaryWriter(log.tensorboard_dir)
        if log.wandb_project:
            import wandb  # the `wandb` extra

            self.wandb = wandb.init(project=log.wandb_project, name=log.wandb_run_name, config=asdict(cfg),
                                    **wandb_resume(cfg.checkpoint.save))
        interactive = log.progress_bar if log.progress_bar is not None else sys.stdout.isatty()
        if interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=train_iters, initial=start, desc=cfg.train.stage, dynamic_ncols=True)

    def info(self, text: str) -> None:
        if self.active:
            (self.bar.write if self.bar else print)(text)
            sys.stdout.flush()

    def step(self, iteration: int, result, lr: float, seconds: float, tokens: float, flops: float) -> StepRecord:
        tflops = flops / seconds / self.world / 1e12
        rec = StepRecord(iteration, result.loss, result.grad_norm, lr, result.skipped, seconds, tokens / seconds,
                         tflops, tflops / self.peak if self.peak else None, memory_gib())
        self.records.append(rec)
        if not self.active:
            return rec
        s = self.summary
        s.last_iteration, s.last_loss = iteration, rec.loss
        if iteration % self.cfg.logging.log_interval == 0 or result.skipped:
            mfu = f" | MFU {rec.mfu:6.2%}" if rec.mfu is not None else ""
            skip = " | SKIPPED (non-finite)" if result.skipped else ""
            self.info(f"[{self.cfg.train.stage}] iter {iteration:7d}/{s.train_iters} | loss {rec.loss:.6f} | "
                      f"grad norm {rec.grad_norm:.4f} | lr {lr:.3e} | {seconds * 1e3:7.1f} ms | "
                      f"{rec.tokens_per_s:,.0f} tok/s | {tflops:.2f} TFLOP/s/GPU{mfu} | mem {rec.memory_gib:.2f} GiB"
                      f"{skip}")
        if self.tb:
            for key in ("loss", "grad_norm", "lr", "tokens_per_s", "tflops_per_gpu", "memory_gib"):
                value = getattr(rec, key)
                if math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, iteration)
            if rec.mfu is not None:
                self.tb.add_scalar("train/mfu", rec.mfu, iteration)
        if self.wandb:
            self.wandb.log({k: v for k, v in asdict(rec).items() if v is not None}, step=iteration)
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec.loss:.4f}")
        return rec

    def finish(self, nan_steps: int, interrupted: bool, checkpoint: Optional[str], losses: list) -> Summary:
        s = self.summary
        s.nan_steps, s.interrupted, s.checkpoint = nan_steps, interrupted, checkpoint
        s.losses = list(losses)
        s.first_loss = losses[0] if losses else None
        s.wall_seconds = time.perf_counter() - self.t0
        timed = self.records[1:] or self.records  # the first step includes warm-up work
        if timed:
            s.mean_tokens_per_s = sum(r.tokens_per_s for r in timed) / len(timed)
            s.mean_tflops_per_gpu = sum(r.tflops_per_gpu for r in timed) / len(timed)
            if self.peak:
                s.mean_mfu = s.mean_tflops_per_gpu / self.peak
        if self.active:
            if self.bar:
                self.bar.close()
            text = json.dumps(asdict(s), indent=1)
            self.info(f"[{s.stage}] summary {json.dumps({k: v for k, v in asdict(s).items() if k != 'losses'})}")
            if self.cfg.logging.summary_json:
                Path(self.cfg.logging.summary_json).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.cfg.logging.summary_json, text)
            if self.tb:
                self.tb.close()
            if self.wandb:
                self.wandb.finish()
        return s
