"""The one table of Hugging Face <-> Megatron-Core parameter names, with their transforms.

Each `ParamMapping` names one Megatron parameter (global layer index, `local` spec naming), the
HF tensors it is made of, and a `Transform` that turns HF tensors into one tensor-parallel
rank's shard (`to_megatron`) and all ranks' shards back into HF tensors (`to_hf`). Import,
export, tests and `qmm compare` all read this table; nothing else knows the layouts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from .safetensors_io import CheckpointError, SafetensorsFolder


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------

class Transform:
    """HF tensors <-> one TP rank's Megatron shard. `split_dim`: None (replicated), 0 or 1."""

    split_dim: int | None = None

    def to_megatron(self, hf: list[torch.Tensor], tp_rank: int, tp_size: int) -> torch.Tensor:
        full = self.merge(hf)
        if self.split_dim is None:
            return full
        return full.chunk(tp_size, dim=self.split_dim)[tp_rank]

    def to_hf(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        full = shards[0] if self.split_dim is None else torch.cat(shards, dim=self.split_dim)
        return self.unmerge(full)

    # The TP-free Megatron layout of the HF tensors, and back.
    def merge(self, hf: list[torch.Tensor]) -> torch.Tensor:
        (tensor,) = hf
        return tensor

    def unmerge(self, full: torch.Tensor) -> list[torch.Tensor]:
        return [full]

    def megatron_slice(self, folder: SafetensorsFolder, hf: tuple[str, ...],
                       index: tuple[slice, ...]) -> torch.Tensor:
        """The part `index` of the TP-free Megatron tensor (the layout torch_dist stores) read from
        `folder`. Subclasses whose slices are row ranges of one HF tensor read only those rows, so
        a converter holds one shard, not the whole tensor."""
        return self.merge([folder.get(h) for h in hf])[index]


class Replicated(Transform):
    """Same tensor on every TP rank: norms, row-parallel biases, the patch embedding."""


class ColumnSplit(Transform):
    split_dim = 0


class RowSplit(Transform):
    split_dim = 1


@dataclass
class ConvAsLinear(Transform):
    """Qwen2.5-VL's Conv3d patch embedding (kernel = stride = patch) is a linear over the
    flattened (C, T, P, P) patch; replicated across TP."""

    conv_shape: tuple[int, ...]

    def merge(self, hf):
        return hf[0].reshape(hf[0].shape[0], -1)

    def unmerge(self, full):
        return [full.reshape(self.conv_shape)]


@dataclass
class VocabSplit(Transform):
    """Embedding / output rows padded to the TP-divisible vocabulary, split across TP; the pad
    rows are zero and dropped on export."""

    vocab_size: int
    padded_size: int
    split_dim = 0

    def merge(self, hf):
        (w,) = hf
        if w.shape[0] != self.vocab_size:
            raise CheckpointError(f"vocabulary has {w.shape[0]} rows, config says {self.vocab_size}")
        pad = w.new_zeros((self.padded_size - w.shape[0], *w.shape[1:]))
        return torch.cat([w, pad])

    def unmerge(self, full):
        return [full[: self.vocab_size]]

    def megatron_slice(self, folder, hf, index):
        (name,) = hf
        spec = folder.spec(name)
        if spec.shape[0] != self.vocab_size:
            raise CheckpointError(f"vocabulary has {spec.shape[0]} rows, config says {self.vocab_size}")
        start, stop, _ = index[0].indices(self.padded_size)
        out = torch.zeros((stop - start, *spec.shape[1:]), dtype=spec.dtype)
        real = max(0, min(stop, self.vocab_size) - start)
        if real:  # read straight into the padded buffer: one copy of the rows in memory
            folder.get(name, rows=slice(start, start + real), out=out[:real])
        return out[(slice(None), *index[1:])]


@dataclass
class GroupedQKV(Transform):
    """HF q, k, v projections (weights or biases) -> Megatron's fused linear_qkv, laid out per
    query group as [q heads of the group, k, v], so a split along dim 0 gives each TP rank whole
    groups. Covers GQA (Qwen3) and, with groups == heads, multi-head attention."""

    num_heads: int
    num_groups: int
    head_dim: int
    split_dim = 0

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
    """gate_proj and up_proj -> linear_fc1; each TP rank holds [its gate rows; its up rows]."""

    split_dim = 0

    def to_megatron(self, hf, tp_rank, tp_size):
        gate, up = hf
        return torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])

    def to_hf(self, shards):
        halves = [s.chunk(2) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]

    def merge(self, hf):
        return torch.cat(hf)

    def unmerge(self, full):
        return list(full.chunk(2))

    def megatron_slice(self, folder, hf, index):
        gate, up = hf
        n = folder.spec(gate).shape[0]
        start, stop, _ = index[0].indices(2 * n)
        for name, base in ((gate, 0), (up, n)):  # Megatron's SwiGLU shards lie within gate or up
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


# Transformer Engine fuses the input norms into the following linear layer.
TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def to_backend_name(local_name: str, backend: str) -> str:
    if backend == "te":
        for local, te in TE_RENAMES.items():
            if local_name.endswith("." + local):
                return local_name[: -len(local)] + te
    return local_name


def to_local_name(name: str) -> str:
    for local, te in TE_RENAMES.items():
        if name.endswith("." + te):
            return name[: -len(te)] + local
    return name


def param_mappings(cfg: ModelConfig, tp_size: int = 1) -> list[ParamMapping]:
    """Every Megatron parameter of `cfg` (global layer indices, local spec names)."""
    table = _language(cfg, tp_size)
    if cfg.has_vision:
        table = _vision(cfg) + _projector(cfg) + table
    return table


def _language(cfg: ModelConfig, tp_size: int) -> list[ParamMapping]:
    lang = cfg.language
    vocab = VocabSplit(lang.vocab_size, lang.padded_vocab_size(tp_size))
    qkv = GroupedQKV(lang.num_attention_heads, lang.num_query_groups, lang.head_dim)
    m = "language_model."
    table = [ParamMapping(m + "embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab)]
    for i in range(lang.num_layers):
        L, H = f"{m}decoder.layers.{i}.", f"model.layers.{i}."
        attn = H + "self_attn."
        table += [
            ParamMapping(L + "input_layernorm.weight", (H + "input_layernorm.weight",), Replicated()),
            ParamMapping(L + "self_attention.linear_qkv.weight",
                         tuple(f"{attn}{p}_proj.weight" for p in "qkv"), qkv),
            ParamMapping(L + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), RowSplit()),
            ParamMapping(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",), Replicated()),
            ParamMapping(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"),
                         GatedMLP()),
            ParamMapping(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), RowSplit()),
        ]
        if lang.add_qkv_bias:
            table.append(ParamMapping(L + "self_attention.linear_qkv.bias",
                                      tuple(f"{attn}{p}_proj.bias" for p in "qkv"), qkv))
        if lang.qk_layernorm:
            table += [
                ParamMapping(L + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",), Replicated()),
                ParamMapping(L + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",), Replicated()),
            ]
    table.append(ParamMapping(m + "decoder.final_layernorm.weight", ("model.norm.weight",), Replicated()))
    if not lang.tie_word_embeddings:
        table.append(ParamMapping(m + "output_layer.weight", ("lm_head.weight",), vocab))
    return table


def _vision(cfg: ModelConfig) -> list[ParamMapping]:
    v = cfg.vision
    conv = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    qkv = FusedQKV(v.num_heads, v.num_heads, v.head_dim)
    table = [ParamMapping("vision_model.patch_embed.proj.weight", ("visual.patch_embed.proj.weight",),
                          ConvAsLinear(conv))]
    for i in range(v.depth):
        L, H = f"vision_model.decoder.layers.{i}.", f"visual.blocks.{i}."
        table += [
            ParamMapping(L + "input_layernorm.weight", (H + "norm1.weight",), Replicated()),
            ParamMapping(L + "self_attention.linear_qkv.weight", (H + "attn.qkv.weight",), qkv),
            ParamMapping(L + "self_attention.linear_qkv.bias", (H + "attn.qkv.bias",), qkv),
            ParamMapping(L + "self_attention.linear_proj.weight", (H + "attn.proj.weight",), RowSplit()),
            ParamMapping(L + "self_attention.linear_proj.bias", (H + "attn.proj.bias",), Replicated()),
            ParamMapping(L + "pre_mlp_layernorm.weight", (H + "norm2.weight",), Replicated()),
            ParamMapping(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"),
                         GatedMLP()),
            ParamMapping(L + "mlp.linear_fc1.bias", (H + "mlp.gate_proj.bias", H + "mlp.up_proj.bias"),
                         GatedMLP()),
            ParamMapping(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), RowSplit()),
            ParamMapping(L + "mlp.linear_fc2.bias", (H + "mlp.down_proj.bias",), Replicated()),
        ]
    return table


def _projector(cfg: ModelConfig) -> list[ParamMapping]:
    P, H = "projector.", "visual.merger."
    table = [
        ParamMapping(P + "ln_q.weight", (H + "ln_q.weight",), Replicated()),
        ParamMapping(P + "linear_fc1.weight", (H + "mlp.0.weight",), ColumnSplit()),
        ParamMapping(P + "linear_fc1.bias", (H + "mlp.0.bias",), ColumnSplit()),
        ParamMapping(P + "linear_fc2.weight", (H + "mlp.2.weight",), RowSplit()),
        ParamMapping(P + "linear_fc2.bias", (H + "mlp.2.bias",), Replicated()),
    ]
    if cfg.projector.extra_layer:
        table += [
            ParamMapping(P + "linear_fc3.weight", (H + "mlp.4.weight",), RowSplit()),
            ParamMapping(P + "linear_fc3.bias", (H + "mlp.4.bias",), Replicated()),
        ]
    return table


# ---------------------------------------------------------------------------------------------
# Filling a model from an HF folder (tests, `qmm compare`, weights-only starts)
# ---------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^(.*?\.layers\.)(\d+)\.(.*)$")


def global_param_names(model: torch.nn.Module) -> dict[str, str]:
    """Map each parameter's name in `model` (stage-local layer index, maybe wrapped in
    `module.`) to its global, local-spec name as used in the table."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layer_numbers = {}
    for name, module in model.named_modules():
        if isinstance(module, TransformerLayer):
            layer_numbers[_unwrap(name)] = module.layer_number - 1
    out = {}
    for name, _ in model.named_parameters():
        clean = _unwrap(name)
        match = _LAYER.match(clean)
        if match:
            prefix, idx, rest = match.groups()
            global_idx = layer_numbers.get(f"{prefix}{idx}", int(idx))
            clean = f"{prefix}{global_idx}.{rest}"
        out[name] = to_local_name(clean)
    return out


def _unwrap(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path, cfg: ModelConfig,
                    tp_rank: int | None = None, tp_size: int | None = None) -> list[str]:
    """Copy this rank's shard of every parameter of `model` from an HF folder, reading only the
    tensors it needs. Returns the HF tensor names this stage did not use.

    Raises CheckpointError for a parameter without a mapping or a shape mismatch.
    """
    if tp_rank is None or tp_size is None:
        from megatron.core import parallel_state

        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
    folder = SafetensorsFolder(hf_dir)
    table = {m.megatron: m for m in param_mappings(cfg, tp_size)}
    if cfg.language.tie_word_embeddings:  # the last stage's copy of the tied embedding
        table["language_model.output_layer.weight"] = table["language_model.embedding.word_embeddings.weight"]
    used: set[str] = set()
    params = dict(model.named_parameters())
    for name, global_name in global_param_names(model).items():
        mapping = table.get(global_name)
        if mapping is None:
            raise CheckpointError(f"no HF mapping for Megatron parameter {global_name!r}")
        shard = mapping.transform.to_megatron([folder.get(h) for h in mapping.hf], tp_rank, tp_size)
        param = params[name]
        if tuple(shard.shape) != tuple(param.shape):
            raise CheckpointError(f"{global_name}: HF {mapping.hf} gives shape {tuple(shard.shape)} on TP rank "
                                  f"{tp_rank}/{tp_size}, the model has {tuple(param.shape)}")
        param.copy_(shard.to(param.dtype))
        used.update(mapping.hf)
    return sorted(set(folder.names()) - used)
