"""A training run's folder: `iter_NNNNNNN/` checkpoints and the marker naming the latest one
(Megatron's layout). Read by training (resume, weights-only starts) and by `qmm mcore2hf`, which
accepts a run folder wherever a checkpoint folder goes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

LATEST = "latest_checkpointed_iteration.txt"


def iter_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def saved_iterations(root: str | Path) -> list[int]:
    """The iterations that have a checkpoint folder, oldest first."""
    return sorted(int(p.name[5:]) for p in Path(root).glob("iter_*") if p.is_dir() and p.name[5:].isdigit())


def latest_iteration(root: str | Path) -> Optional[int]:
    """The iteration named by `latest_checkpointed_iteration.txt`, or None if there is none."""
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{marker} holds {text!r}, not an iteration number")
    if not iter_dir(root, int(text)).is_dir():
        raise FileNotFoundError(f"{marker} names iteration {text}, but {iter_dir(root, int(text))} is missing")
    return int(text)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A torch_dist folder itself, or a run folder (its latest iteration)."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    it = latest_iteration(path)
    if it is None:
        what = "does not exist" if not path.exists() else (
            f"is neither a torch_dist checkpoint (no metadata.json), a run folder (no {LATEST}) nor a Hugging "
            "Face folder (config.json and *.safetensors)")
        raise FileNotFoundError(f"{path} {what}")
    return iter_dir(path, it)
