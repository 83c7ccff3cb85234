"""Megatron checkpoint tensors computed on demand from a Hugging Face folder via the mapping table.

A Megatron `ShardedTensor` names a key (te or local spec; layer-stacked `...layers.<param>` with
the layer index as a prepended axis, or per-layer `...layers.<i>.<param>`), a global shape and
this rank's offsets. `HFTensorSource` turns it into the table's global local-spec name, checks
the HF tensors against the shape Megatron expects, and reads exactly this rank's slice.
"""

from __future__ import annotations

import math
import threading
import zlib
from dataclasses import dataclass

import torch
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.dist_checkpointing.dict_utils import nested_values

from ..config import ModelConfig
from .mapping import GatedMLP, ParamMapping, param_mappings, to_local_name
from .safetensors_io import CheckpointError, SafetensorsFolder


def table_name(sh_ten: ShardedTensor) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(global local-spec name, offsets, global shape) of one layer's tensor."""
    n = sh_ten.prepend_axis_num
    key = sh_ten.key
    if n:
        if n != 1 or ".layers." not in key:
            raise CheckpointError(f"{key}: unexpected {n} prepended axes")
        head, tail = key.split(".layers.", 1)
        key = f"{head}.layers.{sh_ten.global_offset[0]}.{tail}"
    return to_local_name(key), tuple(sh_ten.global_offset[n:]), tuple(sh_ten.global_shape[n:])


def sharded_tensors(state: dict) -> list[ShardedTensor]:
    """Every ShardedTensor of a sharded state dict, factories (SwiGLU fc1) expanded."""
    out = []
    for value in nested_values(state):
        if isinstance(value, ShardedTensorFactory):
            out += [v for v in nested_values(value.build()) if isinstance(v, ShardedTensor)]
        elif isinstance(value, ShardedTensor):
            out.append(value)
    return out


@dataclass
class WrittenTensor:
    key: str
    offset: list[int]
    shape: list[int]
    dtype: str
    crc32: int
    hf: list[str]


class _ScratchFolder:
    """`SafetensorsFolder` reads into a ring of reusable buffers instead of fresh allocations:
    every fresh multi-MB tensor is a new mmap whose pages fault in one by one, which halved read
    throughput on the test machine.

    Safe for the writer's pattern (one item written while the next is read) because it serves
    only items made of one read (`single_read`): the item being written holds at most one slot and
    the item being read takes the other.
    """

    SLOTS = 2

    def __init__(self, folder: SafetensorsFolder):
        self.folder = folder
        self._slots = [torch.empty(0, dtype=torch.uint8) for _ in range(self.SLOTS)]
        self._next = 0
        self._lock = threading.Lock()

    def spec(self, name: str):
        return self.folder.spec(name)

    def get(self, name: str, rows: slice | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            spec = self.folder.spec(name)
            shape = list(spec.shape)
            if rows is not None:
                shape[0] = len(range(*rows.indices(shape[0])))
            nbytes = math.prod(shape) * spec.dtype.itemsize
            with self._lock:
                i, self._next = self._next, (self._next + 1) % self.SLOTS
                if self._slots[i].numel() < nbytes:
                    self._slots[i] = torch.empty(nbytes, dtype=torch.uint8)
                out = self._slots[i][:nbytes].view(spec.dtype).view(shape)
        return self.folder.get(name, rows=rows, out=out)


def single_read(mapping: ParamMapping) -> bool:
    """Whether one slice of this mapping comes from a single read (SwiGLU shards lie in gate or up)."""
    return len(mapping.hf) == 1 or isinstance(mapping.transform, GatedMLP)


class HFTensorSource:
    def __init__(self, folder: SafetensorsFolder, cfg: ModelConfig, tp_size: int):
        self.folder = folder
        self._reader = _ScratchFolder(folder)
        self.table: dict[str, ParamMapping] = {m.megatron: m for m in param_mappings(cfg, tp_size)}
        self.written: list[WrittenTensor] = []
        self.on_write = None  # progress callback(bytes)

    def check(self, state: dict) -> tuple[list[str], set[str]]:
        """(problems, HF names used) for this rank's part of the model, before anything is written."""
        problems, used = [], set()
        for sh_ten in sharded_tensors(state):
            name, _, global_shape = table_name(sh_ten)
            mapping = self.table.get(name)
            if mapping is None:
                problems.append(f"Megatron tensor {name} has no HF mapping")
                continue
            used.update(mapping.hf)
            absent = [h for h in mapping.hf if h not in self.folder]
            if absent:
                problems.append(f"missing HF tensors for {name}: {', '.join(absent)}")
                continue
            metas = [torch.empty(self.folder.spec(h).shape, device="meta") for h in mapping.hf]
            try:
                shape = tuple(mapping.transform.merge(metas).shape)
            except (RuntimeError, ValueError) as err:
                shape = f"unusable ({err})"
            if shape != global_shape:
                got = ", ".join(f"{h} {list(self.folder.spec(h).shape)}" for h in mapping.hf)
                problems.append(f"config/weights shape mismatch for {name}: the config implies {list(global_shape)}, "
                                f"the HF tensors give {shape if isinstance(shape, str) else list(shape)} ({got})")
        return problems, used

    def materialize(self, sh_ten: ShardedTensor) -> torch.Tensor:
        name, offsets, _ = table_name(sh_ten)
        mapping = self.table[name]
        index = tuple(slice(o, o + s) for o, s in zip(offsets, sh_ten.local_shape))
        reader = self._reader if single_read(mapping) else self.folder
        tensor = mapping.transform.megatron_slice(reader, mapping.hf, index)
        tensor = tensor.to(sh_ten.dtype).contiguous()
        raw = tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else b""
        self.written.append(WrittenTensor(sh_ten.key, list(sh_ten.global_offset), list(sh_ten.local_shape),
                                          str(sh_ten.dtype).removeprefix("torch."), zlib.crc32(raw),
                                          list(mapping.hf)))
        if self.on_write:
            self.on_write(tensor.numel() * tensor.element_size())
        return tensor
