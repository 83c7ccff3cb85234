"""Read a Hugging Face safetensors folder (one file or sharded with an index) tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or corrupt; the message names the file or tensor."""


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
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from None
        elif (self.folder / SINGLE).exists():
            weight_map = {name: SINGLE for name in self._open(SINGLE).keys()}
        else:
            raise CheckpointError(f"{self.folder} has neither {INDEX} nor {SINGLE}")
        missing = sorted({f for f in weight_map.values() if not (self.folder / f).exists()})
        if missing:
            raise CheckpointError(f"{self.folder} is missing shard(s) named in its index: {', '.join(missing)}")
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}

    def _open(self, filename: str):
        if filename not in getattr(self, "_handles", {}):
            path = self.folder / filename
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"cannot read {path} (truncated or not safetensors?): {err}") from None
            if not hasattr(self, "_handles"):
                return handle
            self._handles[filename] = handle
        return self._handles[filename]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.folder} has no tensor {name!r}")
        try:
            return self._open(self.weight_map[name]).get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read {name!r} from {self.folder / self.weight_map[name]}: {err}") from None

    def config(self) -> dict:
        path = self.folder / "config.json"
        if not path.exists():
            raise CheckpointError(f"{self.folder} has no config.json")
        return json.loads(path.read_text())
