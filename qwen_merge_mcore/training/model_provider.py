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

from ..config import ExperimentConfig
from .engine import select_engine

PARTS = {"vision": "vision_model.", "projector": "projector.", "language": "language_model."}


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
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        chunk_vp = vp_stage if vpp > 1 else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=chunk_vp)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=chunk_vp)
        model = builder.build(cfg, pre_process=pre, post_process=post, vp_stage=chunk_vp)
        builder.freeze(model, list(cfg.train.freeze))
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)  # params already in precision.params_dtype (the builder's config)
    return chunks


def parameter_report(chunks: list[torch.nn.Module]) -> dict[str, dict[str, int]]:
    """Trainable and frozen parameter counts per part, summed over every model-parallel rank.

    TP-replicated tensors (norms, the ViT patch embedding) are counted once per TP group.
    """
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    counts = torch.zeros(len(PARTS), 2, dtype=torch.float64)
    names = list(PARTS)
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if not param_is_not_tensor_parallel_duplicate(p):
                continue
            name = name.removeprefix("module.")
            part = next((i for i, n in enumerate(names) if name.startswith(PARTS[n])), None)
            if part is None:
                raise ValueError(f"parameter {name} belongs to no part ({', '.join(PARTS.values())})")
            counts[part, 0 if p.requires_grad else 1] += p.numel()
    if dist.is_initialized():
        counts = counts.to("cuda") if torch.cuda.is_available() else counts
        dist.all_reduce(counts, group=parallel_state.get_model_parallel_group())
    return {n: {"trainable": int(counts[i, 0]), "frozen": int(counts[i, 1])} for i, n in enumerate(names)}


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
