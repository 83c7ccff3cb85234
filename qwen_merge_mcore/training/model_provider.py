"""Build this rank's model chunks (one per virtual pipeline stage), freeze parts, report counts.

The builder is the model package's `build_model(exp_cfg, pre_process, post_process, vp_stage)`
with `freeze(model, parts)`; tests may pass another builder with the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..checkpoint.common import model_chunks
from ..config import ExperimentConfig
from ..config.schema import PARTS
from .engine import select_engine


@dataclass
class ModelBuilder:
    build: Callable  # (exp_cfg, pre_process, post_process, vp_stage) -> model chunk
    freeze: Callable  # (model, parts) -> None


def default_builder() -> ModelBuilder:
    from ..models.qwen_merge import build_model, freeze

    return ModelBuilder(build_model, freeze)


def build_chunks(cfg: ExperimentConfig, builder: Optional[ModelBuilder] = None) -> list[torch.nn.Module]:
    builder = builder or default_builder()
    # The chunks are built for the engine that will train them (GPU: DDP's main_grad buffers).
    cfg = replace(cfg, train=replace(cfg.train, engine=select_engine(cfg)))
    chunks = model_chunks(cfg, builder.build)
    for model in chunks:
        builder.freeze(model, list(cfg.train.freeze))
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
    return chunks  # params already in precision.params_dtype (the builder's config)


def parameter_report(chunks: list[torch.nn.Module], this_rank: bool = False) -> dict[str, dict[str, int]]:
    """Trainable and frozen parameter counts per part: of the whole model, summed over every
    model-parallel rank with TP-replicated tensors (norms, the ViT patch embedding) counted once
    per TP group; or, `this_rank`, of what this rank holds (its stage, its TP shards)."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    from ..models.qwen_merge import part_modules

    counts = torch.zeros(len(PARTS), 2, dtype=torch.float64)
    for chunk in chunks:
        for i, module in enumerate(part_modules(chunk).values()):
            for p in module.parameters() if module is not None else ():
                if this_rank or param_is_not_tensor_parallel_duplicate(p):
                    counts[i, 0 if p.requires_grad else 1] += p.numel()
        outside = sum(p.numel() for p in chunk.parameters()) - sum(
            p.numel() for m in part_modules(chunk).values() if m is not None for p in m.parameters())
        if outside:
            raise ValueError(f"{outside:,} parameters of the model belong to no part ({', '.join(PARTS)})")
    if dist.is_initialized() and not this_rank:
        counts = counts.to("cuda") if torch.cuda.is_available() else counts
        dist.all_reduce(counts, group=parallel_state.get_model_parallel_group())
    return {n: {"trainable": int(counts[i, 0]), "frozen": int(counts[i, 1])} for i, n in enumerate(PARTS)}


def format_report(report: dict[str, dict[str, int]]) -> str:
    lines = [f"{'part':<10} {'trainable':>15} {'frozen':>15}"]
    for part, c in report.items():
        lines.append(f"{part:<10} {c['trainable']:>15,} {c['frozen']:>15,}")
    return "\n".join(lines)


def check_freeze(report: dict[str, dict[str, int]], frozen_parts: list[str]) -> None:
    """Refuse to train when freezing did not do what the config says (the original's defect)."""
    for part, c in report.items():
        if part in frozen_parts and c["trainable"]:
            raise RuntimeError(f"part {part!r} should be frozen but has {c['trainable']:,} trainable parameters")
        if part not in frozen_parts and c["frozen"]:
            raise RuntimeError(f"part {part!r} should train but has {c['frozen']:,} frozen parameters")
    if not any(c["trainable"] for c in report.values()):
        raise RuntimeError("no trainable parameters")
