"""Where a model tensor lives in a torch_dist checkpoint: its key as the checkpoint spells it
(the te spec's names, or the local spec's older norm names) and, for layer-stacked keys, its layer.
Shared by loading (`common.load_sharded`), export (`mcore2hf`) and verification (`verify`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Container

from .mapping import split_layer
from .safetensors_io import CheckpointError

if TYPE_CHECKING:  # torch is imported on first use: `qmm --help` stays fast
    import torch


def _older_names() -> dict[str, str]:
    from ..models.specs import LOCAL_TO_TE_KEYS

    return {f".{te}": f".{local}" for local, te in LOCAL_TO_TE_KEYS.items()}


def stored_key(key: str, stored: Container[str]) -> str:
    """`key` as the checkpoint spells it: itself, or the name the local spec wrote before it
    declared the te names (`...input_layernorm.weight` for `...linear_qkv.layer_norm_weight`)."""
    if key in stored:
        return key
    for new, old in _older_names().items():
        older = key.replace(new, old)
        if older != key and older in stored:
            return older
    return key


class StoredTensor:
    """Where a table entry lives in the checkpoint: a key and, for layer-stacked keys, the layer."""

    def __init__(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, layer: int | None, layers: int):
        self.key, self.shape, self.dtype, self.layer, self.layers = key, shape, dtype, layer, layers

    def sharded_tensor(self):
        import torch
        from megatron.core.dist_checkpointing import ShardedTensor

        if self.layer is None:
            return ShardedTensor.from_rank_offsets(self.key, torch.empty(self.shape, dtype=self.dtype))
        # One layer of a layer-stacked key, addressed as a [1, ...] block of the [layers, ...] tensor
        # (with a prepended axis, Megatron's loader assumes every rank holds a layer).
        data = torch.empty((1, *self.shape), dtype=self.dtype)
        return ShardedTensor.from_rank_offsets(self.key, data, (0, self.layer, self.layers))

    def unwrap(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.layer is None else tensor[0]


def locate(name: str, metadata: dict) -> StoredTensor:
    """Find table entry `name` (global layer index) among the checkpoint's keys: per layer, or
    one layer of a layer-stacked key."""
    key = stored_key(name, metadata)
    if key in metadata:
        meta = metadata[key]
        return StoredTensor(key, tuple(meta.global_shape), meta.dtype, None, 0)
    layer = split_layer(name)
    if layer is not None:
        stacked = stored_key(layer.stacked, metadata)
        if stacked in metadata:
            meta = metadata[stacked]
            return StoredTensor(stacked, tuple(meta.global_shape[1:]), meta.dtype, layer.index, meta.global_shape[0])
    raise CheckpointError(f"the checkpoint has no tensor for {name}")
