"""Stream Hugging Face safetensors folders tensor by tensor, in and out.

`SafetensorsFolder` opens a folder (one file, or shards listed by an index), checks every shard's
header before any tensor is read (missing shards, truncated files, names the index promises but a
shard lacks) and reads one tensor, or a row range of one, with a positioned file read, or maps
exactly one tensor's bytes read-only (`mapped`, for a converter's writer). It never maps whole
files: mapped pages stay resident (and count in the process's RSS) for as long as the mapping
lives, which would make a converter's memory grow with the checkpoint instead of the tensor.

`ShardedSafetensorsWriter` is given the full list of output tensors (name, shape, dtype) up
front. That fixes every shard's header before any data exists, so each tensor goes straight to
its place on disk, in any order: peak memory is one tensor, not one shard. Files follow the
`save_pretrained` convention: `model.safetensors` for one shard, otherwise
`model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or corrupt; the message names the file or tensor."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(path: str | Path) -> tuple[dict[str, dict], int]:
    """The tensor entries of one safetensors file and the offset where its data starts, after
    checking the file holds all their bytes."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated safetensors file: header needs {8 + header_len} bytes, "
                                  f"file has {size}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {err})") from None
    header.pop("__metadata__", None)
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensors need {8 + header_len + data_end} "
                              f"bytes, file has {size} (an interrupted download or copy?)")
    unknown = sorted({e["dtype"] for e in header.values()} - DTYPES.keys())
    if unknown:
        raise CheckpointError(f"{path}: unsupported dtypes {unknown}")
    return header, 8 + header_len


class SafetensorsFolder:
    """Name -> file map of a checkpoint folder; `get(name)` reads one tensor, nothing more."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder} is not a folder")
        index = self.folder / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index} is not a valid safetensors index: {err!r}") from None
        elif (self.folder / SINGLE).exists():
            weight_map = None
        else:
            raise CheckpointError(f"{self.folder} has neither {INDEX} nor {SINGLE}")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise CheckpointError(f"{self.folder} is missing shard(s) named in its index: {', '.join(missing)}")
        self._specs: dict[str, TensorSpec] = {}
        self._where: dict[str, tuple[str, int, int]] = {}  # name -> (file, begin, end)
        for fname in files:
            header, start = read_header(self.folder / fname)
            for name, entry in header.items():
                self._specs[name] = TensorSpec(name, tuple(entry["shape"]), DTYPES[entry["dtype"]])
                b, e = entry["data_offsets"]
                self._where[name] = (fname, start + b, start + e)
        if weight_map is None:
            weight_map = {name: SINGLE for name in self._specs}
        absent = [n for n, f in weight_map.items() if self._where.get(n, ("",))[0] != f]
        if absent:
            raise CheckpointError(f"{self.folder}: {len(absent)} tensors listed in {INDEX} are not in their "
                                  f"shard: {preview(sorted(absent))}")
        self.weight_map: dict[str, str] = weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def spec(self, name: str) -> TensorSpec:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.folder} has no tensor {name!r}")
        return self._specs[name]

    @property
    def total_bytes(self) -> int:
        return sum(self._specs[n].nbytes for n in self.weight_map)

    def buffer(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """New memory for a tensor that a transform assembles (readers that reuse memory override it)."""
        return torch.empty(shape, dtype=dtype)

    def _locate(self, name: str, rows: slice | None) -> tuple[Path, int, int, list[int]]:
        """(file, first byte, end byte, shape) of tensor `name`, or of its rows `rows`."""
        spec = self.spec(name)
        fname, begin, end = self._where[name]
        shape = list(spec.shape)
        if rows is not None:
            start, stop, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("row slices must be contiguous")
            row_bytes = (end - begin) // shape[0]
            begin, end = begin + start * row_bytes, begin + stop * row_bytes
            shape[0] = stop - start
        return self.folder / fname, begin, end, shape

    def get(self, name: str, rows: slice | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name`, or only the rows `rows` of its first dimension (one contiguous read);
        into `out` (a contiguous tensor of that shape and dtype) when given."""
        dtype = self.spec(name).dtype
        path, begin, end, shape = self._locate(name, rows)
        if out is not None:
            if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
                raise ValueError(f"{name}: out must be contiguous {tuple(shape)} {dtype}")
            buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else bytearray()
        else:
            buf = bytearray(end - begin)
        fd = os.open(path, os.O_RDONLY)
        try:
            view, got = memoryview(buf), 0
            while got < len(buf):
                n = os.preadv(fd, [view[got:]], begin + got)
                if n <= 0:
                    raise CheckpointError(f"cannot read {name!r} from {path}: file ends early (truncated?)")
                got += n
        finally:
            os.close(fd)
        if out is not None:
            return out
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def mapped(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor `name` (or its rows `rows`) as a READ-ONLY view of the file's pages, mapped for
        as long as the tensor lives: no copy at all, for a reader that only passes the bytes on
        (a writer). Writing into it kills the process (SIGSEGV), so `get` serves everyone else."""
        dtype = self.spec(name).dtype
        path, begin, end, shape = self._locate(name, rows)
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        if path.stat().st_size < end:
            raise CheckpointError(f"cannot read {name!r} from {path}: file ends early (truncated?)")
        skip = begin % mmap.ALLOCATIONGRANULARITY
        with open(path, "rb") as f:  # the mapping outlives the descriptor
            # MAP_POPULATE maps the (usually cached) pages at once instead of faulting them in one by one.
            region = mmap.mmap(f.fileno(), end - begin + skip, offset=begin - skip, prot=mmap.PROT_READ,
                               flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        with warnings.catch_warnings():  # "the buffer is not writable": the docstring's contract
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(region, dtype=torch.uint8, offset=skip)
        return flat.view(dtype).view(shape)

    def config(self) -> dict:
        path = self.folder / "config.json"
        if not path.exists():
            raise CheckpointError(f"{self.folder} has no config.json")
        return json.loads(path.read_text())


@dataclass
class _Shard:
    file: str
    specs: list[TensorSpec]
    offsets: dict[str, int]  # absolute file offset of each tensor's bytes
    header: bytes


class ShardedSafetensorsWriter:
    """Write a known list of tensors into size-capped shards, each tensor straight to disk.

    Tensors may arrive in any order, and from several processes: `create()` (once) lays out
    every file with its header, then any process holding a writer built from the same specs can
    `write()` its tensors (disjoint byte ranges of the same files). `close(written=...)` refuses
    to write the index while any planned tensor is missing.
    """

    def __init__(self, folder: str | Path, specs: Sequence[TensorSpec], max_shard_bytes: int = 5 * 2**30,
                 metadata: dict[str, str] | None = None, create: bool = True):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the output plan")
        self.folder = Path(folder)
        self._metadata = {"format": "pt", **(metadata or {})}
        groups = _pack(specs, max_shard_bytes)
        files = ([SINGLE] if len(groups) == 1 else
                 [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
        self._shards = [self._layout(f, g) for f, g in zip(files, groups)]
        self._shard_by_name = {s.name: shard for shard in self._shards for s in shard.specs}
        self._spec_by_name = {s.name: s for s in specs}
        self.written: set[str] = set()
        self._rows_written: dict[str, int] = {}
        self.total_size = sum(s.nbytes for s in specs)
        if create:
            self.create()

    def _layout(self, file: str, specs: list[TensorSpec]) -> _Shard:
        header: dict[str, object] = {"__metadata__": self._metadata}
        start = 0
        for s in specs:
            header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [start, start + s.nbytes]}
            start += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the safetensors writer aligns the data start to 8 bytes
        blob = struct.pack("<Q", len(raw)) + raw
        offsets = {s.name: len(blob) + header[s.name]["data_offsets"][0] for s in specs}
        return _Shard(file, specs, offsets, blob)

    def create(self) -> None:
        """Write every shard's header and size the file to its final length."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for shard in self._shards:
            with open(self.folder / shard.file, "wb") as f:
                f.write(shard.header)
                f.truncate(len(shard.header) + sum(s.nbytes for s in shard.specs))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._spec_by_name.get(name)
        if spec is None:
            raise KeyError(f"{name} is not in the output plan")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {spec.shape} {spec.dtype}")
        if name in self.written:
            raise ValueError(f"{name} was already written")
        self._put(name, tensor, 0)
        self.written.add(name)

    def write_rows(self, name: str, rows: torch.Tensor, row_start: int) -> None:
        """Write rows [row_start, row_start + len(rows)) of a planned tensor, so a large tensor can
        be produced slice by slice; it counts as written once all its rows are (each exactly once)."""
        spec = self._spec_by_name.get(name)
        if spec is None:
            raise KeyError(f"{name} is not in the output plan")
        if (rows.dtype != spec.dtype or rows.dim() != len(spec.shape) or not spec.shape
                or tuple(rows.shape[1:]) != spec.shape[1:] or not 0 <= row_start <= spec.shape[0] - rows.shape[0]):
            raise ValueError(f"{name}: got rows {tuple(rows.shape)} {rows.dtype} at row {row_start}, "
                             f"planned {spec.shape} {spec.dtype}")
        if name in self.written:
            raise ValueError(f"{name} was already written")
        self._put(name, rows, row_start * (spec.nbytes // spec.shape[0]) if spec.shape[0] else 0)
        self._rows_written[name] = self._rows_written.get(name, 0) + rows.shape[0]
        if self._rows_written[name] == spec.shape[0]:
            self.written.add(name)

    def _put(self, name: str, tensor: torch.Tensor, byte_offset: int) -> None:
        """pwrite the tensor's bytes at `byte_offset` within tensor `name`'s place in its shard."""
        data = tensor.detach().cpu().contiguous().reshape(-1)
        if not data.numel():
            return
        shard = self._shard_by_name[name]
        view = memoryview(data.view(torch.uint8).numpy())
        fd = os.open(self.folder / shard.file, os.O_WRONLY)
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], shard.offsets[name] + byte_offset + done)
        finally:
            os.close(fd)

    def close(self, written: Iterable[str] = ()) -> None:
        """Check every planned tensor was written (here or, listed in `written`, by other
        processes), then write the index (several shards only)."""
        done = self.written | set(written)
        missing = sorted(n for n in self._spec_by_name if n not in done)
        if missing:
            raise CheckpointError(f"{self.folder}: {len(missing)} planned tensors were never written: "
                                  f"{preview(missing)}")
        if len(self._shards) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {s.name: shard.file for shard in self._shards for s in shard.specs}}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _pack(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, order-keeping shard assignment; a tensor larger than the cap gets a shard of its own."""
    groups: list[list[TensorSpec]] = [[]]
    used = 0
    for s in specs:
        if groups[-1] and used + s.nbytes > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(s)
        used += s.nbytes
    return groups


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1.5GiB', '123' (bytes) -> bytes; decimal units as save_pretrained uses them."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    try:
        value = float(number) * units[t[len(number):]]
    except (ValueError, KeyError):
        raise ValueError(f"cannot read size {text!r}; use e.g. 5GB or 500MB") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value)


def preview(names: Sequence[str], limit: int = 10) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
