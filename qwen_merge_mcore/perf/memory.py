"""Memory accounting: parameter counts per part, model-state bytes (weights, gradients,
optimizer) and activation bytes per GPU.

Parameter counts are analytic in the `ModelConfig` and follow Megatron-Core's tensor-
parallel layers: column-parallel weights and biases split over TP, row-parallel weights split
and their biases replicated, norms and the ViT patch embedding replicated, the vocabulary
padded to `make_vocab_size_divisible_by * TP` (the HF model keeps the unpadded vocabulary).

Activation bytes follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"), written out for GQA, SwiGLU and fused (flash) attention, which keeps no
s x s score matrix: per layer and micro-batch it stores the norm inputs/outputs, q/k/v, the
attention output, the SwiGLU input (gate and up) and output; sequence parallelism divides
all of it by TP, context parallelism divides the sequence by CP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from ..config import LanguageConfig, ModelConfig, ParallelConfig, VisionConfig

BF16 = 2


@dataclass(frozen=True)
class ParamCounts:
    """Parameters per part (per TP rank when built with tensor_parallel_size > 1)."""

    vision: int  # patch embed + blocks (no final norm in the ViT)
    projector: int  # ln_q + mlp.0 + mlp.2 (+ the new mlp.4)
    embedding: int
    decoder_layer: int  # one decoder layer
    num_layers: int
    final_norm: int
    output_layer: int  # 0 when tied to the embedding

    @property
    def decoder(self) -> int:
        return self.decoder_layer * self.num_layers

    @property
    def language(self) -> int:
        return self.embedding + self.decoder + self.final_norm + self.output_layer

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.language

    def part(self, name: str) -> int:
        return {"vision": self.vision, "projector": self.projector, "language": self.language}[name]


def vision_parameters(vis: VisionConfig, tp: int = 1) -> tuple[int, int]:
    """(patch embed, one block) per TP rank."""
    h, i = vis.hidden_size, vis.intermediate_size
    patch = vis.in_channels * vis.temporal_patch_size * vis.patch_size ** 2 * h  # Conv3d, no bias
    block = (h  # norm1
             + (3 * h * h + 3 * h) // tp  # qkv, column parallel with bias
             + h * h // tp + h  # proj, row parallel, bias replicated
             + h  # norm2
             + (2 * i * h + 2 * i) // tp  # gate+up, column parallel with bias
             + h * i // tp + h)  # down, row parallel
    return patch, block


def projector_parameters(model: ModelConfig, tp: int = 1) -> int:
    vis = model.vision
    merged = vis.hidden_size * vis.spatial_merge_size ** 2
    out = model.projector.merger_out_size
    count = vis.hidden_size + (merged * merged + merged) // tp + merged * out // tp + out
    if model.projector.extra_layer:
        count += out * model.language.hidden_size // tp + model.language.hidden_size
    return count


def decoder_layer_parameters(lang: LanguageConfig, tp: int = 1) -> int:
    h, f, d = lang.hidden_size, lang.ffn_hidden_size, lang.head_dim
    q, kv = lang.num_attention_heads * d, lang.num_query_groups * d
    count = h + h * (q + 2 * kv) // tp + q * h // tp + h + 3 * h * f // tp
    if lang.add_qkv_bias:
        count += (q + 2 * kv) // tp
    if lang.qk_layernorm:
        count += 2 * d
    return count


def parameter_counts(model: ModelConfig, tensor_parallel_size: int = 1, padded: bool = True,
                     text_only: bool = False) -> ParamCounts:
    """Per-TP-rank parameter counts (a replicated ViT counts whole); at TP=1 with `padded` the
    Megatron model's totals, with `padded=False` the HF model's (unpadded vocabulary)."""
    tp = tensor_parallel_size
    lang = model.language
    vocab = lang.padded_vocab_size(tp) if padded else lang.vocab_size
    if text_only:
        vision = projector = 0
    else:
        # A replicated ViT is whole on every TP rank (model.vision.parallel).
        patch, block = vision_parameters(model.vision, 1 if model.vision.parallel == "replicated" else tp)
        vision, projector = patch + model.vision.depth * block, projector_parameters(model, tp)
    table = vocab * lang.hidden_size // tp
    return ParamCounts(vision=vision, projector=projector, embedding=table,
                       decoder_layer=decoder_layer_parameters(lang, tp), num_layers=lang.num_layers,
                       final_norm=lang.hidden_size, output_layer=0 if lang.tie_word_embeddings else table)


@dataclass(frozen=True)
class RankParams:
    """Parameters held by one GPU of a pipeline rank, per part."""

    vision: int
    projector: int
    language: int
    decoder_layers: int  # decoder layers on this rank (all virtual chunks)
    fp8_linear: int  # decoder linear weights (the ones FP8 casts)

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.language

    def trainable(self, freeze: Iterable[str]) -> int:
        frozen = set(freeze)
        return sum(getattr(self, p) for p in ("vision", "projector", "language") if p not in frozen)


def rank_layer_counts(num_layers: int, parallel: ParallelConfig) -> list[int]:
    """Decoder layers per pipeline rank (virtual chunks summed)."""
    return parallel.stage_layer_counts(num_layers)


def rank_parameters(model: ModelConfig, parallel: ParallelConfig, text_only: bool = False) -> list[RankParams]:
    """What each pipeline rank holds (per TP rank). The first rank holds the ViT, projector and
    embedding; the last the final norm and the output layer, which with tied embeddings and
    PP > 1 is a second copy of the embedding kept in sync (Megatron's shared embedding)."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    counts = parameter_counts(model, tp, padded=True, text_only=text_only)
    lang = model.language
    q, kv = lang.num_attention_heads * lang.head_dim, lang.num_query_groups * lang.head_dim
    linear_per_layer = lang.hidden_size * (q + 2 * kv + q + 3 * lang.ffn_hidden_size) // tp
    out = []
    for rank, layers in enumerate(rank_layer_counts(lang.num_layers, parallel)):
        language = layers * counts.decoder_layer
        if rank == 0:
            language += counts.embedding
        if rank == pp - 1:
            language += counts.final_norm + counts.output_layer
            if lang.tie_word_embeddings and pp > 1:
                language += counts.embedding
        first = rank == 0
        out.append(RankParams(vision=counts.vision if first else 0, projector=counts.projector if first else 0,
                              language=language, decoder_layers=layers, fp8_linear=layers * linear_per_layer))
    return out


@dataclass(frozen=True)
class StatePolicy:
    """Bytes per parameter of the model state.

    Megatron-Core with bf16 and the distributed optimizer (the default here): bf16 weights,
    fp32 main gradients (grad buffer, full size on every rank), fp32 master weights + Adam m, v
    (12 bytes) sharded over the data-parallel x context-parallel group. Frozen parameters keep
    their weights only.
    """

    param_bytes: int = 2
    grad_bytes: int = 4
    optimizer_bytes: int = 12
    distributed_optimizer: bool = True


MEGATRON_BF16 = StatePolicy()
# The CPU engine: fp32 weights and gradients, torch AdamW's exp_avg and exp_avg_sq, no sharding.
TORCH_FP32_ADAMW = StatePolicy(param_bytes=4, grad_bytes=4, optimizer_bytes=8, distributed_optimizer=False)


@dataclass(frozen=True)
class StateBytes:
    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def state_bytes(params: int, trainable: int, policy: StatePolicy = MEGATRON_BF16, data_parallel: int = 1) -> StateBytes:
    """Model-state bytes for `params` parameters of which `trainable` train. With the
    distributed optimizer the optimizer bytes are this rank's shard (ceil over the group)."""
    optimizer = trainable * policy.optimizer_bytes
    if policy.distributed_optimizer:
        optimizer = -(-optimizer // data_parallel)
    return StateBytes(params=params * policy.param_bytes, grads=trainable * policy.grad_bytes, optimizer=optimizer)


def decoder_layer_activation_bytes(lang: LanguageConfig, tokens: int, tp: int, recompute: Optional[str],
                                   fp8: bool = False) -> float:
    """Stored activations of one decoder layer for `tokens` tokens on this CP rank, sequence
    parallel over TP (Megatron-Core enables it with TP > 1).

    Kept in bf16: both norm inputs (residual stream), q/k/v and the attention output (what
    fused attention saves), the SwiGLU input (gate and up). Kept by the linears for their
    weight gradients, in FP8 under FP8: both norm outputs, the attention output (o_proj input,
    the same tensor as above in bf16) and the SwiGLU output (down_proj input).
    """
    h, f = lang.hidden_size, lang.ffn_hidden_size
    q, kv = lang.num_attention_heads * lang.head_dim, lang.num_query_groups * lang.head_dim
    if recompute == "full":
        return BF16 * tokens * h / tp  # the layer input only
    bf16_kept = 2 * h + (q + 2 * kv) + q + 2 * f
    linear_inputs = 2 * h + f + (q if fp8 else 0)
    # "selective" recomputes the core attention; fused attention stores nothing beyond its
    # inputs and output (counted above), so it saves no memory here.
    return tokens * (BF16 * bf16_kept + (1 if fp8 else BF16) * linear_inputs) / tp


def vision_activation_bytes(vis: VisionConfig, patches: int, tp: int, trainable: bool) -> float:
    """ViT activations of one micro-batch's images. A frozen ViT with nothing trainable before
    it runs without autograd history: only one block's working set is alive."""
    h, i = vis.hidden_size, vis.intermediate_size
    per_block = BF16 * patches * (2 * h + (3 * h + h) / tp + 2 * h + 3 * i / tp)
    return per_block * (vis.depth if trainable else 1)


def projector_activation_bytes(model: ModelConfig, patches: int) -> float:
    vis = model.vision
    merged = patches // vis.spatial_merge_size ** 2
    wide = vis.hidden_size * vis.spatial_merge_size ** 2
    out = model.projector.merger_out_size
    return BF16 * (2 * patches * vis.hidden_size + 3 * merged * wide + 2 * merged * out
                   + merged * model.language.hidden_size)


def logits_activation_bytes(lang: LanguageConfig, tokens: int, tp: int) -> float:
    """bf16 logits plus the fp32 copy Megatron's vocab-parallel cross entropy keeps."""
    return (BF16 + 4) * tokens * lang.padded_vocab_size(tp) / tp


__all__ = ["MEGATRON_BF16", "TORCH_FP32_ADAMW", "ParamCounts", "RankParams", "StateBytes", "StatePolicy",
           "decoder_layer_activation_bytes", "decoder_layer_parameters", "logits_activation_bytes",
           "parameter_counts", "projector_activation_bytes", "projector_parameters", "rank_layer_counts",
           "rank_parameters", "state_bytes", "vision_activation_bytes", "vision_parameters"]
