"""FLOP accounting of a Qwen-Merge (or text-only) training step, shared by the planner and the
training logs.

One function per part, each returning *forward* matmul FLOPs (2*m*n*k per GEMM; norms,
activations and rotary embeddings are not counted, as in Megatron's own formula):

- `vision_flops`: the Qwen2.5-VL ViT. Window blocks attend within their windows (window_size
  pixels square, counted in 2x2-merged units, edge windows smaller), full-attention blocks
  within each image frame; bidirectional attention.
- `projector_flops`: ln_q + mlp.0/mlp.2 (+ the new mlp.4) on the 2x2-merged tokens.
- `decoder_flops`: the LLM decoder (GQA q/k/v, o_proj, SwiGLU MLP) with causal attention
  computed per sample of a packed sequence (half of each sample's s x s score matrix).
- `logits_flops`: the output layer over the padded vocabulary.

Training FLOPs = forward + backward; the backward costs 2x forward for a part whose weights
train (input and weight gradients) and 1x for a frozen part that still passes gradients back
to a trainable part before it; a frozen part with nothing trainable before it (the frozen ViT)
costs forward only. With no part frozen this is the usual 3x forward. Recomputation adds a
forward of what it recomputes. MFU and "model TFLOP/s" use `step_flops(..., recompute=None)`.

For the training loop: `step_flops(model_cfg, BatchStats.from_batch(batch), freeze=cfg.train.freeze)`
gives the FLOPs of one micro-batch; sum them over the micro-batches (and data-parallel ranks) of
a step, divide by the step time and the GPU count for TFLOP/s per GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from ..config import LanguageConfig, ModelConfig, VisionConfig
from ..config.schema import PARTS

Grid = tuple[int, int, int]  # (t, h, w) in patches, before the 2x2 merge


@dataclass(frozen=True)
class BatchStats:
    """What the FLOP count needs to know about a batch.

    tokens: LLM tokens processed (all rows, padding included: the model computes on them).
    sample_lengths: the attention segments (one per packed sample, or one per row); they
        must sum to `tokens`.
    image_grids: (t, h, w) patch grids of every image and video in the batch.
    """

    tokens: int
    sample_lengths: tuple[int, ...]
    image_grids: tuple[Grid, ...] = ()

    def __post_init__(self):
        if sum(self.sample_lengths) != self.tokens:
            raise ValueError(f"sample lengths sum to {sum(self.sample_lengths)}, not to tokens={self.tokens}")
        if any(n <= 0 for n in self.sample_lengths):
            raise ValueError("sample lengths must be > 0")

    @classmethod
    def from_batch(cls, batch) -> "BatchStats":
        """From a `qwen_merge_mcore.batch.Batch` (packed when `cu_seqlens` is set)."""
        rows, seq = batch.tokens.shape
        if batch.cu_seqlens is not None:
            cu = batch.cu_seqlens.tolist()
            lengths = tuple(b - a for a, b in zip(cu[:-1], cu[1:]) if b > a)
        else:
            lengths = (seq,) * rows
        grids: list[Grid] = []
        for vis in (batch.images, batch.videos):
            if vis is not None:
                grids.extend(tuple(int(x) for x in g) for g in vis.grid_thw.tolist())
        return cls(tokens=rows * seq, sample_lengths=lengths, image_grids=tuple(grids))

    @classmethod
    def packed(cls, seq_length: int, sample_length: int, image_grids_per_sample: Sequence[Grid] = ()) -> "BatchStats":
        """One packed row of `seq_length` tokens cut into samples of `sample_length` (the last
        one shorter), each sample carrying `image_grids_per_sample`."""
        full, rest = divmod(seq_length, sample_length)
        lengths = (sample_length,) * full + ((rest,) if rest else ())
        return cls(tokens=seq_length, sample_lengths=lengths,
                   image_grids=tuple(image_grids_per_sample) * len(lengths))


@dataclass(frozen=True)
class FlopBreakdown:
    """Forward FLOPs per part; attention score/value products kept apart (they run in bf16
    even under FP8 and are not weight GEMMs)."""

    vision_linear: float = 0.0
    vision_attention: float = 0.0
    projector: float = 0.0
    decoder_linear: float = 0.0
    decoder_attention: float = 0.0
    logits: float = 0.0

    @property
    def vision(self) -> float:
        return self.vision_linear + self.vision_attention

    @property
    def language(self) -> float:
        return self.decoder_linear + self.decoder_attention + self.logits

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.language

    def part(self, name: str) -> float:
        return {"vision": self.vision, "projector": self.projector, "language": self.language}[name]


def window_lengths(grid: Grid, vision: VisionConfig) -> list[int]:
    """Patch counts of the non-empty attention windows of one image/video (all frames)."""
    t, h, w = grid
    merge = vision.spatial_merge_size
    unit = vision.window_size // merge // vision.patch_size  # window side in merged tokens
    gh, gw = h // merge, w // merge
    rows = [min(unit, gh - r) for r in range(0, gh, unit)]
    cols = [min(unit, gw - c) for c in range(0, gw, unit)]
    return [r * c * merge * merge for r in rows for c in cols] * t


def vision_flops(vision: VisionConfig, grids: Iterable[Grid]) -> tuple[float, float]:
    """(linear, attention) forward FLOPs of the ViT over these images."""
    grids = list(grids)
    patches = sum(t * h * w for t, h, w in grids)
    hid, inter = vision.hidden_size, vision.intermediate_size
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    per_patch_block = 2 * (3 * hid * hid + hid * hid + 3 * hid * inter)  # qkv, proj, SwiGLU gate/up/down
    linear = 2 * patches * patch_dim * hid + vision.depth * patches * per_patch_block
    # Q K^T and softmax(.) V: 2 GEMMs of 2*n*n*hid each per segment, bidirectional.
    window_sq = sum(n * n for g in grids for n in window_lengths(g, vision))
    frame_sq = sum(t * (h * w) ** 2 for t, h, w in grids)
    full = sum(1 for i in range(vision.depth) if i in vision.fullatt_block_indexes)
    attention = 4 * hid * (full * frame_sq + (vision.depth - full) * window_sq)
    return float(linear), float(attention)


def projector_flops(model: ModelConfig, merged_tokens: int) -> float:
    vis = model.vision
    merged_in = vis.hidden_size * vis.spatial_merge_size ** 2
    out = model.projector.merger_out_size
    per_token = merged_in * merged_in + merged_in * out
    if model.projector.extra_layer:
        per_token += out * model.language.hidden_size
    return float(2 * merged_tokens * per_token)


def decoder_flops(lang: LanguageConfig, tokens: int, sample_lengths: Iterable[int],
                  causal: bool = True) -> tuple[float, float]:
    """(linear, attention) forward FLOPs of all decoder layers. `causal=False` counts the full
    s x s score matrix (the convention of some published tables)."""
    q = lang.num_attention_heads * lang.head_dim
    kv = lang.num_query_groups * lang.head_dim
    h, f = lang.hidden_size, lang.ffn_hidden_size
    per_token = 2 * (h * (q + 2 * kv) + q * h + 3 * h * f)
    score_pairs = sum(s * s for s in sample_lengths) * (0.5 if causal else 1.0)
    attention = 4 * q * score_pairs  # QK^T and AV
    return float(lang.num_layers * tokens * per_token), float(lang.num_layers * attention)


def logits_flops(lang: LanguageConfig, tokens: int, tensor_parallel_size: int = 1) -> float:
    return float(2 * tokens * lang.hidden_size * lang.padded_vocab_size(tensor_parallel_size))


def forward_flops(model: ModelConfig, batch: BatchStats, tensor_parallel_size: int = 1,
                  causal: bool = True) -> FlopBreakdown:
    """Forward FLOPs of one batch, per part."""
    vis_lin, vis_att = vision_flops(model.vision, batch.image_grids) if batch.image_grids else (0.0, 0.0)
    merged = sum(t * h * w for t, h, w in batch.image_grids) // model.vision.spatial_merge_size ** 2
    dec_lin, dec_att = decoder_flops(model.language, batch.tokens, batch.sample_lengths, causal)
    return FlopBreakdown(
        vision_linear=vis_lin, vision_attention=vis_att, projector=projector_flops(model, merged),
        decoder_linear=dec_lin, decoder_attention=dec_att,
        logits=logits_flops(model.language, batch.tokens, tensor_parallel_size))


def backward_multipliers(freeze: Iterable[str] = ()) -> dict[str, int]:
    """Backward cost of each part in units of its forward (order vision -> projector -> language):
    2 when it trains (weight and input gradients; the input gradients of its first GEMM, not
    needed for the ViT's patch embedding, are counted too, as Megatron's formula does), 1 when
    frozen behind a trainable part (input gradients only), 0 when frozen with nothing trainable
    before it."""
    frozen = set(freeze)
    unknown = frozen - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts to freeze: {sorted(unknown)}; known: {PARTS}")
    out, upstream_trains = {}, False
    for part in PARTS:
        trains = part not in frozen
        out[part] = 2 if trains else int(upstream_trains)
        upstream_trains = upstream_trains or trains
    return out


def step_flops(model: ModelConfig, batch: BatchStats, freeze: Iterable[str] = (),
               recompute: Optional[str] = None, tensor_parallel_size: int = 1,
               causal: bool = True) -> float:
    """Training FLOPs (forward + backward [+ recompute]) of one batch.

    recompute: None, "selective" (core attention recomputed: + decoder attention forward) or
    "full" (every decoder layer recomputed: + decoder forward, logits excluded).
    """
    fwd = forward_flops(model, batch, tensor_parallel_size, causal)
    back = backward_multipliers(freeze)
    total = sum(fwd.part(p) * (1 + back[p]) for p in PARTS)
    if recompute == "selective":
        total += fwd.decoder_attention
    elif recompute == "full":
        total += fwd.decoder_linear + fwd.decoder_attention
    elif recompute is not None:
        raise ValueError(f"recompute must be None, 'selective' or 'full', got {recompute!r}")
    return float(total)


__all__ = ["BatchStats", "FlopBreakdown", "Grid", "backward_multipliers", "decoder_flops", "forward_flops",
           "logits_flops", "projector_flops", "step_flops", "vision_flops", "window_lengths"]
