"""Stream Hugging Face safetensors folders tensor by tensor, in and out.

`SafetensorsFolder` opens a folder with or without `*.safetensors.index.json`, checks every
shard before any tensor is read (missing shards, truncated files, names the index promises but
a shard lacks) and hands out one tensor at a time, so a caller never holds more than the
tensors it is working on. It reads each tensor's bytes with `pread` at the offset the header
gives rather than through `safe_open`: safe_open memory-maps the shard, and every page a
`get_tensor` touched stays in the process's resident set until the handle closes, so RSS
grows to the size of the shard (measured: +128 MB per 128 MB tensor read).

`ShardedSafetensorsWriter` is given the full list of output tensors (name, shape, dtype) up
front. That fixes every shard's header before any data exists, so each tensor goes straight to
its place on disk and leaves memory at once: peak memory is one tensor, not one shard. Files
follow the `save_pretrained` convention: `model.safetensors` for one shard, otherwise
`model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import math
import os
import struct
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
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or corrupt; the message names the file or tensor."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def read_header(path: str | Path) -> tuple[dict[str, dict], int]:
    """The tensor entries of one safetensors file and where its data starts, after checking the
    file holds all their bytes."""
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
    """Name -> file map of a checkpoint folder; `get(name)` reads one tensor (or rows of it), nothing more.

    Usable as a context manager, which closes the open shard files at the end.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder} is not a folder")
        self._shard_of: dict[str, str] = {}
        self._specs: dict[str, TensorSpec] = {}
        self._offsets: dict[str, int] = {}  # absolute file offset of each tensor's bytes
        self._fds: dict[str, int] = {}
        indexes = sorted(self.folder.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{self.folder}: several safetensors indexes {[p.name for p in indexes]}")
        if indexes:
            self._load_index(indexes[0])
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.folder}: no *.safetensors files (and no index)")
            for shard in files:
                for name in self._read_shard(shard):
                    if name in self._shard_of:
                        raise CheckpointError(f"{self.folder}: tensor {name} is in both {self._shard_of[name]} "
                                              f"and {shard}")
                    self._shard_of[name] = shard

    def _load_index(self, index: Path) -> None:
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err!r})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (self.folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{self.folder} is missing shard(s) named in {index.name} "
                                  f"({len(missing)} of {len(shards)}): {', '.join(missing)}")
        absent = []
        for shard in shards:
            present = self._read_shard(shard)
            absent += [n for n, s in weight_map.items() if s == shard and n not in present]
        if absent:
            raise CheckpointError(f"{self.folder}: {len(absent)} tensors listed in {index.name} are not in their "
                                  f"shard: {preview(absent)}")
        self._shard_of = dict(weight_map)

    def _read_shard(self, shard: str) -> set[str]:
        header, data_start = read_header(self.folder / shard)
        for name, entry in header.items():
            self._specs[name] = TensorSpec(name, tuple(entry["shape"]), DTYPES[entry["dtype"]])
            self._offsets[name] = data_start + entry["data_offsets"][0]
        return set(header)

    @property
    def weight_map(self) -> dict[str, str]:
        return dict(self._shard_of)

    def names(self) -> list[str]:
        return sorted(self._shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def spec(self, name: str) -> TensorSpec:
        if name not in self._shard_of:
            raise CheckpointError(f"{self.folder} has no tensor {name!r}")
        return self._specs[name]

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor, or its rows [start, stop) along dim 0, from disk into its own memory.

        Rows of a row-major tensor are one contiguous byte range, so a large tensor can be
        processed in slices without ever being whole in memory.
        """
        spec = self.spec(name)
        shape, start, stop = spec.shape, 0, spec.nbytes
        if rows is not None:
            if not spec.shape or not 0 <= rows[0] <= rows[1] <= spec.shape[0]:
                raise ValueError(f"{name}: rows {rows} out of range for shape {spec.shape}")
            row_bytes = spec.nbytes // spec.shape[0] if spec.shape[0] else 0
            shape, start, stop = (rows[1] - rows[0], *spec.shape[1:]), rows[0] * row_bytes, rows[1] * row_bytes
        shard = self._shard_of[name]
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.folder / shard, os.O_RDONLY)
        raw = torch.empty(stop - start, dtype=torch.uint8)
        view, done = memoryview(raw.numpy()), 0
        while done < len(view):  # one read returns at most ~2 GiB on Linux
            n = os.preadv(fd, [view[done:]], self._offsets[name] + start + done)
            if n == 0:
                raise CheckpointError(f"{self.folder / shard}: file ended inside tensor {name} (truncated?)")
            done += n
        return raw.view(spec.dtype).reshape(shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def config(self) -> dict:
        path = self.folder / "config.json"
        if not path.exists():
            raise CheckpointError(f"{self.folder} has no config.json")
        return json.loads(path.read_text())

    def __enter__(self) -> "SafetensorsFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Shard:
    file: str
    specs: list[TensorSpec]
    offsets: dict[str, int]  # absolute file offset of each tensor's bytes
    header: bytes
    pending: set[str]


class ShardedSafetensorsWriter:
    """Write a known list of tensors into size-capped shards, each tensor straight to disk.

    Tensors may arrive in any order; a shard file is closed as soon as its last tensor is in.
    `close()` refuses to write the index while any planned tensor is missing.
    """

    def __init__(self, folder: str | Path, specs: Sequence[TensorSpec], max_shard_bytes: int = 5 * 2**30,
                 metadata: dict[str, str] | None = None):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the output plan")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._metadata = {"format": "pt", **(metadata or {})}
        groups = _pack(specs, max_shard_bytes)
        files = ([WEIGHTS_NAME] if len(groups) == 1 else
                 [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
        self._shards = [self._layout(f, g) for f, g in zip(files, groups)]
        self._shard_by_name = {s.name: shard for shard in self._shards for s in shard.specs}
        self._spec_by_name = {s.name: s for s in specs}
        self._open: dict[str, object] = {}
        self._unwritten = {s.name: s.nbytes for s in specs}
        self.total_size = sum(s.nbytes for s in specs)

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
        return _Shard(file, specs, offsets, blob, {s.name for s in specs})

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        """Write a whole tensor, or rows of it starting at `row_start` (each row exactly once)."""
        spec = self._spec_by_name.get(name)
        if spec is None:
            raise KeyError(f"{name} is not in the output plan")
        whole = tuple(tensor.shape) == spec.shape and row_start == 0
        fits = (tensor.dim() == len(spec.shape) > 0 and tuple(tensor.shape[1:]) == spec.shape[1:]
                and 0 <= row_start and row_start + tensor.shape[0] <= spec.shape[0])
        if tensor.dtype != spec.dtype or not (whole or fits):
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype} at row {row_start}, "
                             f"planned {spec.shape} {spec.dtype}")
        shard = self._shard_by_name[name]
        if name not in shard.pending:
            raise ValueError(f"{name} was already written")
        f = self._open.get(shard.file)
        if f is None:
            f = self._open[shard.file] = open(self.folder / shard.file, "wb")
            f.write(shard.header)
        data = tensor.detach().cpu().contiguous().reshape(-1)
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else 0
        f.seek(shard.offsets[name] + row_start * row_bytes)
        if data.numel():
            f.write(memoryview(data.view(torch.uint8).numpy()))
        self._unwritten[name] -= data.numel() * data.element_size()
        if self._unwritten[name] <= 0:
            shard.pending.discard(name)
        if not shard.pending:  # flush a full shard now, not at the end
            f.close()
            del self._open[shard.file]

    def close(self) -> None:
        """Check every planned tensor was written, then write the index (several shards only)."""
        for f in self._open.values():
            f.close()
        self._open.clear()
        missing = sorted(n for shard in self._shards for n in shard.pending)
        if missing:
            raise CheckpointError(f"{self.folder}: {len(missing)} planned tensors were never written: "
                                  f"{preview(missing)}")
        if len(self._shards) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {s.name: shard.file for shard in self._shards for s in shard.specs}}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def __enter__(self) -> "ShardedSafetensorsWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no index that would make the partial folder look complete
            for f in self._open.values():
                f.close()
            self._open.clear()


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

