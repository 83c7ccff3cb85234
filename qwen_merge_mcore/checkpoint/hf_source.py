"""Megatron checkpoint tensors computed on demand from a Hugging Face folder via the mapping table:
the one import path. `qmm hf2mcore` writes them, `load_hf_weights` copies them into a model
(tests, `qmm compare` references, training started from an HF folder).

A Megatron `ShardedTensor` names a key (layer-stacked `...layers.<param>` with the layer index as a
prepended axis, or per-layer `...layers.<i>.<param>`), a global shape and this rank's offsets.
`HFTensorSource` turns it into the table's name, checks the HF tensors against the shape Megatron
expects, and reads exactly this rank's slice.
"""

from __future__ import annotations

import math
import mmap
import threading
from dataclasses import dataclass

import torch
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.dist_checkpointing.dict_utils import nested_values

from ..config import ModelConfig
from .mapping import GatedMLP, ParamMapping, param_mappings, split_layer
from .safetensors_io import CheckpointError, SafetensorsFolder, preview


def table_name(sh_ten: ShardedTensor) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(table name with the global layer index, offsets, global shape) of one layer's tensor."""
    n = sh_ten.prepend_axis_num
    key = sh_ten.key
    if n:
        layer = split_layer(key)
        if n != 1 or layer is None or layer.index is not None:
            raise CheckpointError(f"{key}: unexpected {n} prepended axes")
        key = layer.at(sh_ten.global_offset[0])
    return key, tuple(sh_ten.global_offset[n:]), tuple(sh_ten.global_shape[n:])


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
    hf: list[str]


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """`nbytes` of new memory, backed by 2 MB pages where the kernel allows it (transparent huge
    pages, also in their common `madvise` mode): the kernel faults a fresh 4 KB-page buffer in page
    by page, which made reading a 620 MB embedding shard into new memory three times slower than
    reading it into memory already touched."""
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8)  # the tensor keeps the mapping alive


class _ScratchFolder:
    """`SafetensorsFolder` as the streaming writer reads it, copying as little as it can: a slice
    that is a row range of one HF tensor is mapped, not read (`SafetensorsFolder.mapped`: the
    writer only passes its bytes on); what must be assembled (a padded vocabulary, a column range)
    goes into a ring of reusable buffers (`huge_page_buffer`), not fresh allocations: a fresh
    multi-MB tensor is new memory whose pages the kernel faults in and zeroes one by one, which
    cost as much as the read itself.

    Safe for the writer's pattern (one item written while the next is read) because it serves
    only items made of one read or one buffer (`single_read`): the item being written holds at
    most one slot and the item being read takes the other.
    """

    SLOTS = 2

    def __init__(self, folder: SafetensorsFolder):
        self.folder = folder
        self._slots = [torch.empty(0, dtype=torch.uint8) for _ in range(self.SLOTS)]
        self._next = 0
        self._lock = threading.Lock()

    def spec(self, name: str):
        return self.folder.spec(name)

    def buffer(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """The next slot, as an uninitialised contiguous tensor of `shape`."""
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            i, self._next = self._next, (self._next + 1) % self.SLOTS
            if self._slots[i].numel() < nbytes:
                self._slots[i] = torch.empty(0, dtype=torch.uint8)  # freed before the bigger one is mapped
                self._slots[i] = huge_page_buffer(nbytes)
            return self._slots[i][:nbytes].view(dtype).view(shape)

    def get(self, name: str, rows: slice | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            return self.folder.mapped(name, rows)
        return self.folder.get(name, rows=rows, out=out)


def single_read(mapping: ParamMapping) -> bool:
    """Whether one slice of this mapping comes from a single read into one buffer (SwiGLU shards
    lie in gate or up; padded vocabularies are read into their padded buffer)."""
    return len(mapping.hf) == 1 or isinstance(mapping.transform, GatedMLP)


class HFTensorSource:
    """This rank's Megatron tensors, read slice by slice from an HF folder through the table."""

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

    def read(self, sh_ten: ShardedTensor) -> torch.Tensor:
        """The slice `sh_ten` describes, in its dtype. Often a read-only mapping of the file or a
        slot of the ring (`_ScratchFolder`): copy it, never write into it; valid until the
        next-but-one read."""
        name, offsets, _ = table_name(sh_ten)
        mapping = self.table[name]
        index = tuple(slice(o, o + s) for o, s in zip(offsets, sh_ten.local_shape))
        if not single_read(mapping):
            return mapping.transform.megatron_slice(self.folder, mapping.hf, index).to(sh_ten.dtype).contiguous()
        tensor = mapping.transform.megatron_slice(self._reader, mapping.hf, index).to(sh_ten.dtype)
        if not tensor.is_contiguous():  # a column range (row-parallel linears) of mapped rows
            tensor = self._reader.buffer(tensor.shape, tensor.dtype).copy_(tensor)
        return tensor

    def materialize(self, sh_ten: ShardedTensor) -> torch.Tensor:
        """`read`, recorded for the conversion manifest (the streaming writer's callback)."""
        name = table_name(sh_ten)[0]
        tensor = self.read(sh_ten)
        self.written.append(WrittenTensor(sh_ten.key, list(sh_ten.global_offset), list(sh_ten.local_shape),
                                          str(sh_ten.dtype).removeprefix("torch."), list(self.table[name].hf)))
        if self.on_write:
            self.on_write(tensor.numel() * tensor.element_size())
        return tensor


def module_sharded_state(model: torch.nn.Module) -> dict:
    """The sharded state dict of a model chunk, or of a plain container of chunk parts (tests
    build `vision_model` + `projector` alone), with the keys a full chunk gives them."""
    if hasattr(model, "sharded_state_dict"):
        return model.sharded_state_dict()
    return {k: v for name, child in model.named_children() for k, v in child.sharded_state_dict(f"{name}.").items()}


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_dir, cfg: ModelConfig) -> list[str]:
    """Copy this rank's slice of every tensor of `model` from an HF folder, reading only that
    slice (the path `qmm hf2mcore` writes through). Returns the HF tensor names this rank did not
    use. Raises CheckpointError, naming the folder, for unmapped, missing or mis-shaped tensors."""
    from megatron.core import parallel_state

    folder = SafetensorsFolder(hf_dir)
    state = module_sharded_state(model)
    source = HFTensorSource(folder, cfg, parallel_state.get_tensor_model_parallel_world_size())
    problems, used = source.check(state)
    if problems:
        raise CheckpointError(f"{folder.folder}: cannot load: {preview(problems, 5)}")
    for sh_ten in sharded_tensors(state):
        sh_ten.data.copy_(source.read(sh_ten))
    return sorted(set(folder.names()) - used)


# Training choices that an HF config does not fix (or fixes only as a default).
_NOT_IN_WEIGHTS = {"preset", "backend", "language.make_vocab_size_divisible_by", "language.max_position_embeddings",
                   "projector.init_std"}


def config_differences(hf: ModelConfig, model: ModelConfig) -> list[str]:
    """`field: HF value != model value` for every model field an HF folder's config fixes."""
    from dataclasses import asdict

    def flat(cfg: ModelConfig) -> dict:
        out = {}
        for key, value in asdict(cfg).items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            out.update({f"{key}.{k}" if k else key: v for k, v in items})
        return out

    ours, theirs = flat(model), flat(hf)
    skip = set(_NOT_IN_WEIGHTS)
    if not hf.has_vision:
        skip |= {k for k in theirs if k.split(".")[0] in ("vision", "projector") or k.endswith("_token_id")}
    return [f"{k}: {theirs[k]!r} != {ours[k]!r}" for k in theirs if k not in skip and theirs[k] != ours[k]]


def check_coverage(folder: SafetensorsFolder, cfg: ModelConfig) -> None:
    """Every HF tensor is consumed exactly once by the table, and the table finds all it needs."""
    wanted = [h for m in param_mappings(cfg) for h in m.hf]
    dupes = sorted({h for h in wanted if wanted.count(h) > 1})
    missing = sorted(set(wanted) - set(folder.names()))
    leftover = sorted(set(folder.names()) - set(wanted))
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors the config requires are missing: {preview(missing)}")
    if leftover:
        problems.append(f"{len(leftover)} tensors would be left over (not in the {cfg.architecture} "
                        f"mapping): {preview(leftover)}")
    if dupes:
        problems.append(f"tensors mapped twice: {preview(dupes)}")
    if problems:
        raise CheckpointError(f"{folder.folder}: " + "; ".join(problems))


def load_hf_folder(chunks: list[torch.nn.Module], hf_dir, cfg: ModelConfig) -> None:
    """Weights-only start from a Hugging Face folder (Qwen-Merge, Qwen3 or Qwen2.5-VL, told apart
    by its config.json): each rank fills its model chunks with its own slices through the mapping
    table, as `qmm hf2mcore` would have written them. The folder's config must describe `cfg`'s
    model, and every tensor in it must belong to the table."""
    from .common import read_model_config

    folder = SafetensorsFolder(hf_dir)
    hf_cfg = read_model_config(folder.folder / "config.json")[1]
    differences = config_differences(hf_cfg, cfg)
    if differences:
        raise CheckpointError(f"{folder.folder}: the Hugging Face model ({hf_cfg.architecture}) is not the "
                              f"configured model: {preview(differences, 5)} (HF value != model value)")
    check_coverage(folder, cfg)
    for chunk in chunks:
        load_hf_weights(chunk, folder.folder, cfg)
