"""Streaming safetensors I/O: read a checkpoint folder one tensor (or row range) at a time, and
write sharded safetensors with an index without ever holding more than the tensor being written.

Reads use plain positioned file reads rather than mmap, so a tensor's pages are not left mapped
(and counted in the process's RSS) after it has been handed on. Files are validated when the
folder is opened: a missing shard, a truncated file or a header that does not match the index
fails with a message naming the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype codes <-> torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CODES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint folder or file is unusable (missing, truncated, inconsistent)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the absolute offset where its data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors file (header claims {n} bytes, "
                                  f"file has {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    need = max((v["data_offsets"][1] for v in header.values()), default=0)
    if data_start + need > size:
        raise CheckpointError(f"{path}: truncated safetensors file: its header needs {data_start + need} "
                              f"bytes, the file has {size}")
    return header, data_start


class SafetensorsFolder:
    """All tensors of an HF checkpoint folder (single file, or shards listed by an index)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a checkpoint folder")
        index = self.folder / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).exists()]
            if missing:
                raise CheckpointError(f"{self.folder}: shard(s) listed in {INDEX_NAME} are missing: "
                                      f"{', '.join(missing)}")
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.folder}: no *.safetensors files and no {INDEX_NAME}")
            weight_map = None
        self._infos: dict[str, TensorInfo] = {}
        for fname in files:
            path = self.folder / fname
            header, start = read_header(path)
            for name, meta in header.items():
                if meta["dtype"] not in DTYPES:
                    raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
                b, e = meta["data_offsets"]
                self._infos[name] = TensorInfo(name, path, DTYPES[meta["dtype"]], tuple(meta["shape"]),
                                               start + b, start + e)
        if weight_map is not None:
            wrong = [n for n, f in weight_map.items() if n not in self._infos or self._infos[n].file.name != f]
            if wrong:
                raise CheckpointError(f"{self.folder}: {INDEX_NAME} lists tensors that are not in the named "
                                      f"shard: {', '.join(sorted(wrong)[:10])}")

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.folder}: no tensor named {name}") from None

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor `name`, or only rows `rows` of its first dimension (one contiguous read)."""
        info = self.info(name)
        shape = list(info.shape)
        begin, end = info.begin, info.end
        if rows is not None:
            start, stop, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("row slices must be contiguous")
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, end = begin + start * row_bytes, begin + stop * row_bytes
            shape[0] = stop - start
        buf = bytearray(end - begin)
        with open(info.file, "rb", buffering=0) as f:
            f.seek(begin)
            view = memoryview(buf)
            got = 0
            while got < len(buf):
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{info.file}: truncated while reading {name}")
                got += n
        if not buf:
            return torch.empty(shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(shape)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class ShardedSafetensorsWriter:
    """Writes a known set of tensors into `model-0000i-of-0000n.safetensors` + index.

    The tensors are declared up front (name, shape, dtype), so every file's header and every
    tensor's offset are fixed before any data is written: `write(name, tensor)` then stores one
    tensor at its place, in any order, and can be called from several processes at once (each
    opens the file and writes at disjoint offsets). `finish()` checks every tensor was written
    and writes the index.
    """

    def __init__(self, folder: str | Path, tensors: Iterable[PlannedTensor], max_shard_bytes: int = 5 << 30,
                 create: bool = True):
        self.folder = Path(folder)
        tensors = list(tensors)
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the write plan")
        groups: list[list[PlannedTensor]] = [[]]
        size = 0
        for t in tensors:
            if groups[-1] and size + t.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        n = len(groups)
        self._where: dict[str, tuple[Path, int, PlannedTensor]] = {}
        self.files: list[Path] = []
        self.total_bytes = sum(t.nbytes for t in tensors)
        for i, group in enumerate(groups):
            path = self.folder / (SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
            header, offset = {}, 0
            for t in group:
                header[t.name] = {"dtype": CODES[t.dtype], "shape": list(t.shape),
                                  "data_offsets": [offset, offset + t.nbytes]}
                offset += t.nbytes
            header["__metadata__"] = {"format": "pt"}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
            start = 8 + len(raw)
            if create:
                with open(path, "wb") as f:
                    f.write(struct.pack("<Q", len(raw)) + raw)
                    f.truncate(start + offset)
            for t in group:
                b = header[t.name]["data_offsets"][0]
                self._where[t.name] = (path, start + b, t)
            self.files.append(path)
        self._written: set[str] = set()

    def planned(self) -> list[PlannedTensor]:
        return [w[2] for w in self._where.values()]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        path, offset, plan = self._where[name]
        if tuple(tensor.shape) != plan.shape or tensor.dtype != plan.dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {plan.shape} {plan.dtype}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        fd = os.open(path, os.O_WRONLY)
        try:
            view, done = memoryview(data), 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        finally:
            os.close(fd)
        self._written.add(name)

    def finish(self, written: Iterable[str] | None = None) -> None:
        """Write the index. `written`: names written by other processes, for the completeness check."""
        done = self._written | set(written or ())
        missing = [n for n in self._where if n not in done]
        if missing:
            raise CheckpointError(f"tensors planned but never written: {', '.join(missing[:10])}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {n: w[0].name for n, w in sorted(self._where.items())}}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
