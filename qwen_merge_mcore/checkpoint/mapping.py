"""The one table of Hugging Face <-> Megatron-Core parameter names, with their transforms.

Each `ParamMapping` names one Megatron checkpoint tensor (its torch_dist key with the global layer
index: `...layers.<i>.<param>`; the te spec's names, which the local spec writes too), the HF
tensors it is made of, and a `Transform` between the two layouts. Tensor parallelism is not the
table's business: Megatron's own `sharded_state_dict()` says which slice of each TP-free tensor a
rank holds, and `hf_source.py` reads just that slice. Import (`qmm hf2mcore`, weights-only starts
from an HF folder, tests), export (`qmm mcore2hf`, `checkpoint.save_hf`) and `qmm compare` all read
this table; nothing else knows the layouts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from .safetensors_io import CheckpointError, SafetensorsFolder


# ---------------------------------------------------------------------------------------------
# Layer indices in names
# ---------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^(?P<head>.*?\.layers\.)(?:(?P<index>\d+)\.)?(?P<rest>.+)$")


@dataclass(frozen=True)
class LayerName:
    """`<head>layers.<index>.<rest>`, or a layer-stacked key `<head>layers.<rest>` (index None)."""

    head: str  # up to and including "layers."
    index: int | None
    rest: str

    def at(self, index: int) -> str:
        return f"{self.head}{index}.{self.rest}"

    @property
    def stacked(self) -> str:
        return f"{self.head}{self.rest}"

    @property
    def layer(self) -> str:
        """The layer itself, `<head>layers.<index>` (one load unit of an export)."""
        return f"{self.head}{self.index}"


def split_layer(name: str) -> LayerName | None:
    """The parts of a transformer-layer parameter name; None for names outside the layers."""
    match = _LAYER.match(name)
    if match is None:
        return None
    index = match["index"]
    return LayerName(match["head"], None if index is None else int(index), match["rest"])


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------

class Transform:
    """The HF tensors of one entry <-> the TP-free Megatron tensor (the layout torch_dist stores)."""

    def merge(self, hf: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def unmerge(self, full: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def megatron_slice(self, folder: SafetensorsFolder, hf: tuple[str, ...],
                       index: tuple[slice, ...]) -> torch.Tensor:
        """`merge(...)[index]` read from `folder`. Subclasses whose slices are row ranges of one HF
        tensor read only those rows, so a rank holds its shard, not the whole tensor."""
        return self.merge([folder.get(h) for h in hf])[index]


class Same(Transform):
    """One HF tensor in the Megatron layout: norms, linear weights and biases."""

    def merge(self, hf):
        (tensor,) = hf
        return tensor

    def unmerge(self, full):
        return [full]

    def megatron_slice(self, folder, hf, index):
        (name,) = hf
        return folder.get(name, rows=index[0])[(slice(None), *index[1:])]


@dataclass
class ConvAsLinear(Transform):
    """Qwen2.5-VL's Conv3d patch embedding (kernel = stride = patch) is a linear over the
    flattened (C, T, P, P) patch."""

    conv_shape: tuple[int, ...]

    def merge(self, hf):
        return hf[0].reshape(hf[0].shape[0], -1)

    def unmerge(self, full):
        return [full.reshape(self.conv_shape)]


@dataclass
class VocabPadded(Transform):
    """Embedding / output rows padded to the TP-divisible vocabulary with zero rows, dropped on
    export."""

    vocab_size: int
    padded_size: int

    def merge(self, hf):
        (w,) = hf
        self._check(w.shape[0])
        pad = w.new_zeros((self.padded_size - w.shape[0], *w.shape[1:]))
        return torch.cat([w, pad])

    def unmerge(self, full):
        return [full[: self.vocab_size]]

    def megatron_slice(self, folder, hf, index):
        (name,) = hf
        spec = folder.spec(name)
        self._check(spec.shape[0])
        start, stop, _ = index[0].indices(self.padded_size)
        if stop <= self.vocab_size:  # no padding rows in this shard: a plain row range
            return folder.get(name, rows=slice(start, stop))[(slice(None), *index[1:])]
        # Only the padding rows are zeroed: zero-filling the whole buffer first (a 1.2 GB
        # embedding) took as long as reading it.
        out = folder.buffer((stop - start, *spec.shape[1:]), spec.dtype)
        real = max(0, min(stop, self.vocab_size) - start)
        out[real:].zero_()
        if real:  # read straight into the padded buffer: one copy of the rows in memory
            folder.get(name, rows=slice(start, start + real), out=out[:real])
        return out[(slice(None), *index[1:])]

    def _check(self, rows: int) -> None:
        if rows != self.vocab_size:
            raise CheckpointError(f"vocabulary has {rows} rows, config says {self.vocab_size}")


@dataclass
class GroupedQKV(Transform):
    """HF q, k, v projections (weights or biases) -> Megatron's fused linear_qkv, laid out per
    query group as [q heads of the group, k, v], so that Megatron's split along dim 0 gives each
    TP rank whole groups. Covers GQA (Qwen3) and, with groups == heads, multi-head attention."""

    num_heads: int
    num_groups: int
    head_dim: int

    def merge(self, hf):
        q, k, v = hf
        per = self.num_heads // self.num_groups
        rest = q.shape[1:]
        q = q.reshape(self.num_groups, per * self.head_dim, *rest)
        k = k.reshape(self.num_groups, self.head_dim, *rest)
        v = v.reshape(self.num_groups, self.head_dim, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def unmerge(self, full):
        per = self.num_heads // self.num_groups
        rest = full.shape[1:]
        grouped = full.reshape(self.num_groups, (per + 2) * self.head_dim, *rest)
        q, k, v = grouped.split([per * self.head_dim, self.head_dim, self.head_dim], dim=1)
        return [x.reshape(-1, *rest) for x in (q, k, v)]


@dataclass
class FusedQKV(GroupedQKV):
    """Qwen2.5-VL's vision `attn.qkv` (rows [q all heads; k; v]) -> per-head interleaved."""

    def merge(self, hf):
        return super().merge(list(hf[0].chunk(3, dim=0)))

    def unmerge(self, full):
        return [torch.cat(super().unmerge(full), dim=0)]


class GatedMLP(Transform):
    """gate_proj and up_proj -> linear_fc1 = [gate; up]. Megatron's SwiGLU factory stores the two
    halves as TP chunks of this tensor, so each rank's slice lies within gate or within up."""

    def merge(self, hf):
        return torch.cat(hf)

    def unmerge(self, full):
        return list(full.chunk(2))

    def megatron_slice(self, folder, hf, index):
        gate, up = hf
        n = folder.spec(gate).shape[0]
        start, stop, _ = index[0].indices(2 * n)
        for name, base in ((gate, 0), (up, n)):
            if base <= start and stop <= base + n:
                return folder.get(name, rows=slice(start - base, stop - base))[(slice(None), *index[1:])]
        raise CheckpointError(f"rows {start}:{stop} of {gate} + {up} straddle gate and up; Megatron's SwiGLU "
                              "sharding never asks for that")


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamMapping:
    megatron: str
    hf: tuple[str, ...]
    transform: Transform


# Where the pre-norms of a layer live (Transformer Engine fuses them into the next linear).
INPUT_NORM = "self_attention.linear_qkv.layer_norm_weight"
PRE_MLP_NORM = "mlp.linear_fc1.layer_norm_weight"


def param_mappings(cfg: ModelConfig, tp_size: int = 1) -> list[ParamMapping]:
    """Every Megatron checkpoint tensor of `cfg` (global layer indices); the vocabulary is padded
    for `tp_size`."""
    table = _language(cfg, tp_size)
    if cfg.has_vision:
        table = _vision(cfg) + _projector(cfg) + table
    return table


def _language(cfg: ModelConfig, tp_size: int) -> list[ParamMapping]:
    lang = cfg.language
    vocab = VocabPadded(lang.vocab_size, lang.padded_vocab_size(tp_size))
    qkv = GroupedQKV(lang.num_attention_heads, lang.num_query_groups, lang.head_dim)
    same = Same()
    m = "language_model."
    table = [ParamMapping(m + "embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab)]
    for i in range(lang.num_layers):
        L, H = f"{m}decoder.layers.{i}.", f"model.layers.{i}."
        attn = H + "self_attn."
        table += [
            ParamMapping(L + INPUT_NORM, (H + "input_layernorm.weight",), same),
            ParamMapping(L + "self_attention.linear_qkv.weight",
                         tuple(f"{attn}{p}_proj.weight" for p in "qkv"), qkv),
            ParamMapping(L + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), same),
            ParamMapping(L + PRE_MLP_NORM, (H + "post_attention_layernorm.weight",), same),
            ParamMapping(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"),
                         GatedMLP()),
            ParamMapping(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), same),
        ]
        if lang.add_qkv_bias:
            table.append(ParamMapping(L + "self_attention.linear_qkv.bias",
                                      tuple(f"{attn}{p}_proj.bias" for p in "qkv"), qkv))
        if lang.qk_layernorm:
            table += [
                ParamMapping(L + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",), same),
                ParamMapping(L + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",), same),
            ]
    table.append(ParamMapping(m + "decoder.final_layernorm.weight", ("model.norm.weight",), same))
    if not lang.tie_word_embeddings:
        table.append(ParamMapping(m + "output_layer.weight", ("lm_head.weight",), vocab))
    return table


def _vision(cfg: ModelConfig) -> list[ParamMapping]:
    v = cfg.vision
    conv = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    qkv = FusedQKV(v.num_heads, v.num_heads, v.head_dim)
    same = Same()
    table = [ParamMapping("vision_model.patch_embed.proj.weight", ("visual.patch_embed.proj.weight",),
                          ConvAsLinear(conv))]
    for i in range(v.depth):
        L, H = f"vision_model.decoder.layers.{i}.", f"visual.blocks.{i}."
        table += [
            ParamMapping(L + INPUT_NORM, (H + "norm1.weight",), same),
            ParamMapping(L + "self_attention.linear_qkv.weight", (H + "attn.qkv.weight",), qkv),
            ParamMapping(L + "self_attention.linear_qkv.bias", (H + "attn.qkv.bias",), qkv),
            ParamMapping(L + "self_attention.linear_proj.weight", (H + "attn.proj.weight",), same),
            ParamMapping(L + "self_attention.linear_proj.bias", (H + "attn.proj.bias",), same),
            ParamMapping(L + PRE_MLP_NORM, (H + "norm2.weight",), same),
            ParamMapping(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"),
                         GatedMLP()),
            ParamMapping(L + "mlp.linear_fc1.bias", (H + "mlp.gate_proj.bias", H + "mlp.up_proj.bias"),
                         GatedMLP()),
            ParamMapping(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), same),
            ParamMapping(L + "mlp.linear_fc2.bias", (H + "mlp.down_proj.bias",), same),
        ]
    return table


def _projector(cfg: ModelConfig) -> list[ParamMapping]:
    P, H = "projector.", "visual.merger."
    layers = [("ln_q.weight", "ln_q.weight"), ("linear_fc1.weight", "mlp.0.weight"), ("linear_fc1.bias", "mlp.0.bias"),
              ("linear_fc2.weight", "mlp.2.weight"), ("linear_fc2.bias", "mlp.2.bias")]
    if cfg.projector.extra_layer:
        layers += [("linear_fc3.weight", "mlp.4.weight"), ("linear_fc3.bias", "mlp.4.bias")]
    return [ParamMapping(P + megatron, (H + hf,), Same()) for megatron, hf in layers]
