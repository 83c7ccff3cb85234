"""Per-rank bodies of the GPU-path tests (module-level, so spawned ranks can import them):
CPU cases of the engine seam, and the GPU engine's cases on one GPU (no Transformer Engine)."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import torch

from qwen_merge_mcore.batch import Batch
from qwen_merge_mcore.models.qwen_merge import build_model, freeze
from qwen_merge_mcore.training.model_provider import ModelBuilder

from .helpers import synthetic, tiny_config

BUILDER = ModelBuilder(build_model, freeze)


def text_only(batch: Batch, model_cfg) -> Batch:
    """The same micro-batch without its image: vision tokens become text, positions 1D."""
    m = model_cfg
    vision = torch.tensor([m.vision_start_token_id, m.image_token_id, m.vision_end_token_id])
    tokens = batch.tokens.masked_fill(torch.isin(batch.tokens, vision), 20)
    positions = torch.arange(tokens.shape[1]).expand(3, tokens.shape[0], -1).contiguous()
    return dataclasses.replace(batch, tokens=tokens, position_ids=positions, images=None)


class TextOnlyLast:
    """Every `every`-th micro-batch without media: with `every` = micro-batches per step, the last
    micro-batch of each step is text-only while the projector trains."""

    def __init__(self, source, model_cfg, every: int, stop_after: int | None = None):
        self.source, self.model_cfg, self.every, self.stop_after = source, model_cfg, every, stop_after
        self.served = 0

    def __iter__(self):
        return self

    def next_step(self) -> int:
        return self.source.next_step()

    def __next__(self) -> Batch:
        batch = next(self.source)
        self.served += 1
        if self.served == self.stop_after:  # what Slurm's --signal=B:USR1 does before the time limit
            os.kill(os.getpid(), signal.SIGUSR1)
        return text_only(batch, self.model_cfg) if self.served % self.every == 0 else batch

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.served = state["served"]


def text_only_last_data(cfg, rank, size, stop_after=None):
    per_step = cfg.train.global_batch_samples // cfg.train.micro_batch_size // size
    return TextOnlyLast(synthetic(cfg, rank, size), cfg.model, per_step, stop_after)


def _cpu_engine(**train):
    from qwen_merge_mcore.training.cpu_engine import CPUEngine
    from qwen_merge_mcore.training.loop import seed_everything
    from qwen_merge_mcore.training.model_provider import build_chunks

    cfg = tiny_config(train={"global_batch_samples": 2, **train})
    seed_everything(cfg.train.seed)
    return cfg, CPUEngine(cfg, build_chunks(cfg, BUILDER))


# --- CPU ---------------------------------------------------------------------------------------
def ddp_invariant_case() -> dict:
    """A step whose last micro-batch has no image while the projector trains (ViT frozen): the
    model joins the projector with weight zero, so the CPU engine's DDP check passes; without
    that, the engine refuses the step (it used to zero-fill the missing gradients)."""
    from qwen_merge_mcore.models.qwen_merge import QwenMergeModel

    cfg, engine = _cpu_engine()
    data = text_only_last_data(cfg, 0, 1)
    result = engine.train_step(data, 2)
    out = {"loss": result.loss, "skipped": result.skipped,
           "projector_grads": all(p.grad is not None for p in engine.model.projector.parameters())}
    joined = QwenMergeModel._join_unused_encoder
    QwenMergeModel._join_unused_encoder = lambda self, embeddings: embeddings
    try:
        engine.train_step(data, 2)
        out["refused"] = None
    except RuntimeError as err:
        out["refused"] = str(err)
    finally:
        QwenMergeModel._join_unused_encoder = joined
    return out


def save_order_case(root: str) -> list[str]:
    """What a save does, in order: the engine's param sync must come before the state is read."""
    from qwen_merge_mcore.training import checkpointing
    from qwen_merge_mcore.training.checkpointing import Checkpointer, TrainState
    from qwen_merge_mcore.training.optim import build_scheduler

    cfg, engine = _cpu_engine()
    events: list[str] = []
    sync, unwrapped, write = engine.sync_params, engine.unwrapped, checkpointing.save_dist_checkpoint
    engine.sync_params = lambda: (events.append("sync params"), sync())[1]
    engine.unwrapped = lambda: (events.append("read weights"), unwrapped())[1]
    checkpointing.save_dist_checkpoint = lambda *a, **kw: (events.append("write"), write(*a, **kw))[1]
    try:
        Checkpointer(root, keep_last=1).save(1, engine, build_scheduler(engine.optimizer, cfg.train, 1),
                                             {"index": 0}, TrainState(iteration=1))
    finally:
        checkpointing.save_dist_checkpoint = write
    return events


def packed_rope_case() -> dict:
    """Packed (THD) forwards of the ViT and the decoder never take Megatron's per-segment THD
    rope (a host sync per segment), and give what the unpacked (SBHD) ViT gives."""
    from megatron.core.models.common.embeddings import rope_utils

    from qwen_merge_mcore.batch import VisionInput

    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    v = cfg.model.vision
    grid = torch.tensor([[1, 8, 12], [1, 4, 4]])
    pixels = torch.randn(int(grid.prod(-1).sum()), v.in_channels * v.temporal_patch_size * v.patch_size ** 2)
    calls = []
    per_segment = rope_utils._apply_rotary_pos_emb_thd
    rope_utils._apply_rotary_pos_emb_thd = lambda *a, **kw: (calls.append(1), per_segment(*a, **kw))[1]
    try:
        with torch.no_grad():
            sbhd = model.vision_model(pixels, grid)
            model.vision_model.qkv_format = "thd"
            thd = model.vision_model(pixels, grid)
            batch = next(synthetic(cfg, 0, 1))
            cu = torch.tensor([0, 20, batch.tokens.shape[1]], dtype=torch.int32)
            model(batch.tokens, batch.position_ids, images=batch.images, cu_seqlens=cu, labels=batch.labels)
    finally:
        rope_utils._apply_rotary_pos_emb_thd = per_segment
    return {"thd_vs_sbhd": (thd - sbhd).abs().max().item(), "per_segment_calls": len(calls),
            "images": isinstance(batch.images, VisionInput)}


def cpu_cases(root: str) -> dict:
    return {"ddp": ddp_invariant_case(), "save_order": save_order_case(f"{root}/save"),
            "rope": packed_rope_case()}


# --- one GPU -------------------------------------------------------------------------------------
def _deterministic() -> None:
    """Bit-identical reruns on a GPU: deterministic kernels, fp32 matmuls without TF32, SDPA's
    math path (its fused kernels' backward may accumulate in a varying order)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)


def _step_batches(cfg) -> list[Batch]:
    data = text_only_last_data(cfg, 0, 1)
    return [next(data) for _ in range(3)]


ONE_STEP = {"global_batch_samples": 3, "lr": 1e-3, "clip_grad": 0.5, "weight_decay": 0.0}


def gpu_engine_step(root: str) -> dict:
    """One step of the GPU engine (fp32, to compare with the CPU engine); its initial weights go
    to `root` for the CPU twin. Also the schedule hooks it set."""
    from qwen_merge_mcore.training.gpu_engine import GPUEngine
    from qwen_merge_mcore.training.loop import seed_everything
    from qwen_merge_mcore.training.model_provider import build_chunks

    _deterministic()
    cfg = tiny_config(train={**ONE_STEP, "engine": "gpu"})
    seed_everything(cfg.train.seed)
    chunks = build_chunks(cfg, BUILDER)
    torch.save({k: v.detach().cpu() for k, v in chunks[0].state_dict().items() if isinstance(v, torch.Tensor)},
               Path(root) / "init.pt")
    engine = GPUEngine(cfg, chunks)
    config = chunks[0].config
    hooks = {"param_sync_func": config.param_sync_func,
             "align_param_gather": engine.models[0].ddp_config.align_param_gather,
             "grad_scale_func": config.grad_scale_func == engine.optimizer.scale_loss}
    result = engine.train_step(iter(_step_batches(cfg)), 3)
    engine.sync_params()
    return {"result": dataclasses.asdict(result), "hooks": hooks,
            "params": {n: p.detach().float().cpu() for n, p in engine.unwrapped()[0].named_parameters()}}


def cpu_twin_step(root: str) -> dict:
    """The same step with the CPU engine on the GPU engine's initial weights."""
    cfg, engine = _cpu_engine(**ONE_STEP)
    engine.model.load_state_dict(torch.load(Path(root) / "init.pt"))
    result = engine.train_step(iter(_step_batches(cfg)), 3)
    return {"result": dataclasses.asdict(result),
            "params": {n: p.detach().clone() for n, p in engine.model.named_parameters()}}


def gpu_resume_case(root: str) -> dict:
    """bf16 on the GPU engine, the last micro-batch of every step text-only: an uninterrupted run,
    and one stopped by SIGUSR1 after 2 steps (async save) then resumed."""
    from functools import partial

    from qwen_merge_mcore.training.loop import run_training

    _deterministic()
    ckpt = {"save_interval": 100, "keep_last": 2}

    def cfg(name: str, **extra):
        return tiny_config(precision={"params_dtype": "bf16"}, train={"engine": "gpu", "train_iters": 4},
                           checkpoint={"save": f"{root}/{name}", **ckpt, **extra})

    full = run_training(cfg("full"), BUILDER, text_only_last_data)
    part = cfg("part", async_save=True)
    stopped = run_training(part, BUILDER, partial(text_only_last_data, stop_after=2 * 2))
    resumed = run_training(part, BUILDER, text_only_last_data)
    return {"full": full.losses, "stopped": stopped.losses, "interrupted": stopped.interrupted,
            "resumed": resumed.losses, "resumed_from": resumed.first_iteration}


def gpu_cases(root: str) -> dict:
    return {"step": gpu_engine_step(root), "resume": gpu_resume_case(root)}


def kept_samples_case() -> list:
    """The first pipeline stage's per-bin drops reach the later stage (PP=2 on gloo)."""
    from megatron.core import parallel_state

    from qwen_merge_mcore.training.pipeline_media import PipelineKeptSamples

    channel = PipelineKeptSamples()
    bins = [[None, "bad_image", None], [None], ["bad_video", None]]
    if parallel_state.is_pipeline_first_stage():
        for dropped in bins:
            channel.publish(dropped)
        torch.distributed.barrier()
        return bins
    received = [channel.receive(len(dropped)) for dropped in bins]
    torch.distributed.barrier()
    return received
