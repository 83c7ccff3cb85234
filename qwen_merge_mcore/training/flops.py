"""FLOPs of one training step of Qwen-Merge (ViT, projector, decoder, logits), for TFLOP/s and MFU.

The count uses the real sample lengths of packed batches (attention is quadratic per sample, not
per packed row), the real image grids (window attention within 8x8-patch windows, full attention
over a whole image in `fullatt_block_indexes`), and what the stage trains: a frozen ViT runs
forward only (1x), a trained part forward + backward (3x), and a frozen LLM in front of nothing
trained still carries gradients back to the projector (2x: no weight gradients).
# TODO(plan): use `qwen_merge_mcore.perf.flops` once the planner's count lands (issue #9).
"""

from __future__ import annotations

import torch

from ..batch import Batch
from ..config import ModelConfig


def _decoder_forward(m: ModelConfig, tokens: int, sum_sq_len: float) -> float:
    lm = m.language
    q, kv = lm.num_attention_heads * lm.head_dim, lm.num_query_groups * lm.head_dim
    dense = 2 * lm.hidden_size * (q + 2 * kv) + 2 * q * lm.hidden_size + 6 * lm.hidden_size * lm.ffn_hidden_size
    attention = 4 * q * sum_sq_len / 2  # QK^T and AV under a causal mask
    return lm.num_layers * (dense * tokens + attention) + 2 * lm.hidden_size * lm.vocab_size * tokens


def _vision_forward(m: ModelConfig, grid_thw: torch.Tensor) -> tuple[float, float]:
    """-> (ViT FLOPs, projector FLOPs) for the images of a batch."""
    v, h = m.vision, m.vision.hidden_size
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    window = (v.window_size // v.patch_size) ** 2
    vit = proj = 0.0
    merged_in = h * v.spatial_merge_size ** 2
    for t, gh, gw in grid_thw.tolist():
        n = t * gh * gw
        dense = 2 * h * 3 * h + 2 * h * h + 6 * h * v.intermediate_size
        full = len(v.fullatt_block_indexes)
        attn = 4 * h * n * (full * n + (v.depth - full) * min(window, n))
        vit += 2 * patch_dim * h * n + v.depth * dense * n + attn
        merged = n / v.spatial_merge_size ** 2
        out = m.projector.merger_out_size
        proj += merged * (2 * merged_in * merged_in + 2 * merged_in * out
                          + (2 * out * m.language.hidden_size if m.projector.extra_layer else 0))
    return vit, proj


def step_flops(m: ModelConfig, batches: list[Batch], frozen: list[str]) -> float:
    """Model FLOPs of forward + backward over the given micro-batches."""
    total = 0.0
    mult = {part: (1.0 if part == "vision" else 2.0) if part in frozen else 3.0
            for part in ("vision", "projector", "language")}
    for b in batches:
        if b.cu_seqlens is not None:
            lengths = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).double()
            tokens, sum_sq = int(b.tokens.numel()), float((lengths ** 2).sum())
        else:
            tokens, sum_sq = int(b.tokens.numel()), float(b.tokens.shape[0] * b.tokens.shape[1] ** 2)
        total += mult["language"] * _decoder_forward(m, tokens, sum_sq)
        for vis in (b.images, b.videos):
            if vis is not None:
                vit, proj = _vision_forward(m, vis.grid_thw)
                total += mult["vision"] * vit + mult["projector"] * proj
    return total
