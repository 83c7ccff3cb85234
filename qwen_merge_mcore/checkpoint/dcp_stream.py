"""Write a Megatron-Core torch_dist checkpoint one tensor at a time.

`save_streaming(sharded_state_dict, dir, materialize)` goes through Megatron's own
`dist_checkpointing.save` (factories such as the SwiGLU fc1 split, sharding validation,
`common.pt`, `metadata.json`) with a save strategy of the same `torch_dist` backend and version,
so `dist_checkpointing.load` reads the result like any Megatron checkpoint, at any TP/PP.

The difference is where the bytes come from. The sharded state dict may hold meta tensors (a
model built on the meta device): its keys, global shapes and offsets are all the writer needs
to plan. Only when torch.distributed.checkpoint asks for one write item's data does the planner
call `materialize(sharded_tensor)`, and the storage writer serialises it and lets it go (the next
item is read meanwhile, within a byte budget). torch's stock FileSystemWriter keeps every tensor
of a file referenced until the file is closed (and Megatron's async writer stages the whole
shard), so a rank's peak memory would be its whole shard; here it is one or two tensors.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing import save as mcore_save
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (MCoreSavePlanner,
                                                               _replace_state_dict_keys_with_sharded_keys,
                                                               mcore_to_pyt_state_dict)
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, FileSystemWriter, _item_size, _write_item
from torch.distributed.checkpoint.planner import WriteItemType

from .verify import crc32

Materialize = Callable[[ShardedTensor], torch.Tensor]


class _LazyPlanner(MCoreSavePlanner):
    """Megatron's save planner, resolving each tensor write item through `materialize`."""

    def __init__(self, materialize: Materialize, shards: dict[int, ShardedTensor]):
        super().__init__(flatten_state_dict=False, dedup_replicated_tensors=False)
        self._materialize = materialize
        self._shards = shards  # id(placeholder data) -> its ShardedTensor

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        placeholder = self.lookup_object(write_item.index)
        sh_ten = self._shards[id(placeholder)]
        tensor = self._materialize(sh_ten)
        if tuple(tensor.shape) != tuple(sh_ten.local_shape) or tensor.dtype != sh_ten.dtype:
            raise ValueError(f"{sh_ten.key}: materialised {tuple(tensor.shape)} {tensor.dtype}, the checkpoint "
                             f"expects {tuple(sh_ten.local_shape)} {sh_ten.dtype}")
        # Layer-stacked keys carry the layer index as a leading axis of size 1 here.
        return tensor.contiguous().view(placeholder.shape)


def own_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` over exactly its own bytes. torch.save writes a tensor's whole storage, and the
    tensors written here are often views into larger buffers (a TP shard of a merged QKV, a slot
    of the reader's reusable buffers): a 512-byte norm took 600 KB on disk. Contiguous views get a
    tensor sharing their bytes (no copy); only non-contiguous ones are copied."""
    if tensor.untyped_storage().nbytes() == tensor.nbytes or not tensor.numel():
        return tensor
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    return torch.frombuffer(tensor.view(-1).view(torch.uint8).numpy(), dtype=tensor.dtype).view(tensor.shape)


class _Checksummed:
    """A write-only file that keeps the size and CRC32 of what went through it: the file's
    checksum for the conversion manifest without reading the file back."""

    def __init__(self, raw):
        self.raw, self.size, self.crc = raw, 0, 0

    def write(self, data) -> int:
        n = self.raw.write(data)
        self.crc = crc32(memoryview(data).cast("B")[:n], self.crc)
        self.size += n
        return n

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()


@contextlib.contextmanager
def _no_record_crc32():
    """torch.save without the zip records' own CRC32 (torch.load does not check it): the writer
    checksums the whole file for the manifest, which the loaders verify, so a second CRC of every
    byte was a fifth of a conversion's CPU time."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


class _StreamingWriter(FileSystemWriter):
    """One file per rank, items resolved, written and released in order. The next item is
    resolved (read from the source) on a helper thread while the current one is written, as long
    as both together stay under `readahead_bytes`. `files` gets each written file's (size, CRC32)."""

    def __init__(self, path, files: dict, sync_files: bool = True, readahead_bytes: int = 1 << 30):
        super().__init__(path, sync_files=sync_files)
        self.readahead_bytes = readahead_bytes
        self.files = files

    def write_data(self, plan, planner):
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        items = plan.items
        sizes = [_item_size(i) if i.type != WriteItemType.BYTE_IO else 0 for i in items]
        results = []
        with ThreadPoolExecutor(1) as pool, _no_record_crc32(), \
                self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as raw:
            stream = _Checksummed(raw)
            ahead = {}
            for k, item in enumerate(items):
                data = ahead.pop(k).result() if k in ahead else planner.resolve_data(item)
                if k + 1 < len(items) and sizes[k] + sizes[k + 1] <= self.readahead_bytes:
                    ahead[k + 1] = pool.submit(planner.resolve_data, items[k + 1])
                if isinstance(data, torch.Tensor):
                    data = own_bytes(data.detach().cpu())
                results.append(_write_item(self.transforms, stream, data, item, name, self.serialization_format))
                del data
            if self.sync_files:
                raw.flush()
                os.fsync(raw.fileno())
        self.files[name] = {"bytes": stream.size, "crc32": stream.crc}
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(results)
        return future


class StreamingTorchDistStrategy(SaveShardedStrategy):
    """The `torch_dist` (version 1) format, written through `_LazyPlanner` and `_StreamingWriter`."""

    def __init__(self, materialize: Materialize, sync_files: bool = True):
        super().__init__("torch_dist", 1)
        self.materialize = materialize
        self.sync_files = sync_files
        self.files: dict[str, dict] = {}  # this rank's written file -> {"bytes", "crc32"}

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        pyt_state_dict = mcore_to_pyt_state_dict(by_key, is_loading=False)
        # After the conversion each ShardedTensor's `data` is the object DCP hands back.
        shards = {id(st.data): st for sts in by_key.values() for st in sts if isinstance(st, ShardedTensor)}
        dcp.save(pyt_state_dict, storage_writer=_StreamingWriter(checkpoint_dir, self.files, sync_files=self.sync_files),
                 planner=_LazyPlanner(self.materialize, shards))


def save_streaming(sharded_state_dict: dict, checkpoint_dir: str | Path, materialize: Materialize,
                   sync_files: bool = True) -> dict[str, dict]:
    """Megatron `dist_checkpointing.save` with tensors produced on demand (collective call).
    Returns this rank's `.distcp` files with their size and CRC32."""
    strategy = StreamingTorchDistStrategy(materialize, sync_files)
    mcore_save(sharded_state_dict, str(checkpoint_dir), sharded_strategy=strategy)
    return strategy.files
