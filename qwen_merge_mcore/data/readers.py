"""Random access to the rows of a JSONL or parquet file, without loading it whole.

JSONL: one pass records line offsets. Parquet: rows are read one row group at a time (the last
group stays cached, and the mixture reads a pass in order within each dataset's shuffled blocks).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from .errors import BadSample


class JsonlRows:
    def __init__(self, path: str):
        self.path = path
        self._offsets: list[int] = []
        with open(path, "rb") as f:
            pos = 0
            for line in f:
                if line.strip():
                    self._offsets.append(pos)
                pos += len(line)
        self._file = None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> Any:
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(self._offsets[i])
        line = self._file.readline()
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadSample("malformed_row", f"invalid JSON: {err}") from None

    def __getstate__(self):  # file handles do not pickle (worker processes)
        return {**self.__dict__, "_file": None}


class JsonArrayRows:
    """A JSON file holding one list of rows (LLaVA's `llava_v1_5_mix665k.json` layout); loaded whole."""

    def __init__(self, path: str):
        self.path = path
        with open(path, encoding="utf-8") as f:
            self._rows = json.load(f)
        if not isinstance(self._rows, list):
            raise ValueError(f"{path}: a .json dataset must hold a list of rows (or use .jsonl)")

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> Any:
        return self._rows[i]


def _json_or_lines(path: str):
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return JsonArrayRows(path) if head.startswith(b"[") else JsonlRows(path)


class ParquetRows:
    def __init__(self, path: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = path
        try:
            meta = pq.ParquetFile(path).metadata
        except pa.ArrowException as err:  # not parquet, truncated, damaged footer
            raise ValueError(f"{path}: not a readable parquet file ({err})") from None
        self._starts = [0]
        for g in range(meta.num_row_groups):
            self._starts.append(self._starts[-1] + meta.row_group(g).num_rows)
        self._file = None
        self._group, self._table = -1, None

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> Any:
        import bisect

        import pyarrow.parquet as pq

        if not 0 <= i < len(self):
            raise IndexError(i)
        group = bisect.bisect_right(self._starts, i) - 1
        if group != self._group:
            import pyarrow as pa

            if self._file is None:
                self._file = pq.ParquetFile(self.path)
            try:
                self._table, self._group = self._file.read_row_group(group), group
            except pa.ArrowException as err:  # a damaged page: every row of the group is lost, so say so
                raise ValueError(f"{self.path}: row group {group} (rows {self._starts[group]}-"
                                 f"{self._starts[group + 1] - 1}) cannot be read ({err})") from None
        return self._table.slice(i - self._starts[group], 1).to_pylist()[0]

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_group": -1, "_table": None}


class ConcatRows:
    """Several files (parquet shards) as one row sequence."""

    def __init__(self, parts: list):
        self.parts = parts
        self._starts = [0]
        for p in parts:
            self._starts.append(self._starts[-1] + len(p))

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> Any:
        import bisect

        k = bisect.bisect_right(self._starts, i) - 1
        return self.parts[k][i - self._starts[k]]


def dataset_files(path: str) -> list[str]:
    """A file, a folder (its .parquet/.jsonl files) or a glob pattern, sorted."""
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in sorted(os.listdir(path))
                 if os.path.splitext(f)[1].lower() in _OPENERS]
    elif any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
    else:
        files = [path] if os.path.exists(path) else []
    if not files:
        raise FileNotFoundError(f"dataset {path}: no .jsonl or .parquet file found")
    return files


def open_rows(path: str):
    """Rows of a dataset path (see `dataset_files`)."""
    files = dataset_files(path)
    return open_file(files[0]) if len(files) == 1 else ConcatRows([open_file(f) for f in files])


def open_file(path: str):
    """JsonlRows for .jsonl, JsonArrayRows for a .json list, ParquetRows for .parquet."""
    ext = os.path.splitext(path)[1].lower()
    if ext in _OPENERS:
        return _OPENERS[ext](path)
    raise ValueError(f"dataset file {path}: unknown extension {ext!r} (use .jsonl or .parquet)")


_OPENERS = {".jsonl": JsonlRows, ".json": _json_or_lines, ".ndjson": JsonlRows, ".parquet": ParquetRows, ".pq": ParquetRows}
