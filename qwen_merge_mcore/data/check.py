"""Checks of what a run reads: `check_sources` before a model is built, `check_mix` for `qmm data check`."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .packing import packing_efficiency
from .readers import dataset_files, open_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_sources(data_cfg, tokenizer: str | None) -> None:
    """Every dataset path has files with rows, every data_root exists, and `tokenizer` (a folder
    or a cached hub model) is there: failures that would otherwise come after the model is built.
    Raises ConfigError naming the key and the path."""
    from ..config import ConfigError

    if not data_cfg.datasets:
        raise ConfigError("data.datasets", "is empty: there is nothing to train on")
    for i, ds in enumerate(data_cfg.datasets):
        key = f"data.datasets[{i}]"
        try:
            empty = not any(_holds_rows(f) for f in dataset_files(ds.path))
        except (OSError, ValueError) as err:  # no files, unreadable or damaged files
            raise ConfigError(f"{key}.path", str(err)) from None
        if empty:
            raise ConfigError(f"{key}.path", f"{ds.path} holds no rows")
        if ds.data_root and not os.path.isdir(ds.data_root):
            raise ConfigError(f"{key}.data_root", f"{ds.data_root} is not a folder")
    if tokenizer is not None:
        try:
            tokenizer_path(tokenizer)
        except FileNotFoundError as err:
            raise ConfigError("data.tokenizer", str(err)) from None


def _holds_rows(path: str) -> bool:
    """Whether a dataset file has a row, from its start only (parquet: its footer): every rank
    runs this, and the loader reads the whole file afterwards anyway."""
    if os.path.splitext(path)[1].lower() not in (".jsonl", ".ndjson", ".json"):
        return len(open_file(path)) > 0  # parquet metadata; other extensions are refused by name
    with open(path, "rb") as f:
        head = f.read(1 << 16).strip()
    return bool(head) and not re.fullmatch(rb"\[\s*\]", head)


def tokenizer_path(name: str) -> str:
    """`name` if it is a folder with a tokenizer, else the cached hub snapshot of that repo id.

    Never asks the hub: compute nodes have no network, and transformers would retry a missing
    local path as a repo id for about a minute before failing."""
    path = Path(name)
    if path.is_dir():
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise FileNotFoundError(f"tokenizer {name}: the folder has no {' or '.join(TOKENIZER_FILES)}")
        return name
    if path.exists():
        raise FileNotFoundError(f"tokenizer {name}: not a folder")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True, allow_patterns=list(TOKENIZER_FILES))
    except Exception:  # an invalid repo id, or not in the cache: both mean "not here"
        raise FileNotFoundError(f"tokenizer {name}: no such folder (nor a model in the local Hugging Face "
                                "cache)") from None


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path(name))


def check_mix(data_cfg, model_cfg, tokenizer_dir, samples: int, seed: int) -> tuple[str, bool]:
    """Parse, tokenise, pack and decode (through DALI, every image of every packed sequence) the
    first `samples` samples of the mix, as training would.

    A sample counts as usable only once its media decoded. Returns the report and whether the
    bad fraction stays within data.max_bad_fraction (training would stop otherwise)."""
    from collections import Counter

    from .loader import build_train_iterator

    tokenizer = load_tokenizer(tokenizer_dir) if isinstance(tokenizer_dir, (str, os.PathLike)) else tokenizer_dir
    it = build_train_iterator(data_cfg, model_cfg, tokenizer, seed=seed, step_samples=min(samples, 512))
    it.bad.max_bad_fraction = 1.0  # report every bad sample; the fraction is judged at the end
    lengths: list[int] = []
    decoded = 0
    while it.bad.seen < samples:
        it.next_step()
        if it.pass_index:
            break
        for packed in list(it._step):
            next(it)
            if not it.last_row_ids:  # an empty slot, or every sample of it failed to decode
                continue
            decoded += 1
            kept = Counter(it.last_row_ids)
            for s in packed:
                if kept[s.row_id]:
                    kept[s.row_id] -= 1
                    lengths.append(len(s))
    counts = dict(it.bad.counts)
    checked, bad = it.bad.seen, it.bad.bad
    ok = bad <= data_cfg.max_bad_fraction * checked
    lines = [f"samples checked: {checked}, usable: {len(lengths)}, bad: {bad} {counts}",
             f"packed sequences decoded through DALI: {decoded}"]
    if lengths:
        eff = packing_efficiency(lengths, it.capacity, data_cfg.pad_to_multiple_of, it.step_samples)
        lines.append(f"tokens per sample: mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}; "
                     f"packing efficiency into {it.capacity}: {eff:.4f}")
    if not ok:
        lines.append(f"bad fraction {bad / checked:.4f} exceeds data.max_bad_fraction={data_cfg.max_bad_fraction}: "
                     "training would stop")
    return "\n".join(lines), ok
