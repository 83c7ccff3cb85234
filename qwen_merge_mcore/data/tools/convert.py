"""Convert public dataset layouts, from a local folder, into the training format (writer.py).

- `recap` (lmms-lab/LLaVA-ReCap-*): parquet with `id`, `image` {bytes, path}, `conversations`, or
  the LLaVA JSON list (`[{"id", "image": "relative/path", "conversations"}]`) next to its images.
- `onevision` (lmms-lab/LLaVA-OneVision-Data): per-subset parquet, same columns (image may be
  null for text-only rows), `data_source`.
- `synthdog` (naver-clova-ix/synthdog-en/-zh): parquet with `image` and `ground_truth`, a JSON
  string `{"gt_parse": {"text_sequence": ...}}`; becomes `<image>{prompt}` -> the text.

Each row goes through the same parser as training reads (formats.py), so what converts, trains;
rows that fail are skipped and counted per reason. A file that cannot be read at all stops the
conversion with its name.

The input is a folder (searched recursively), one file, or a glob. Hugging Face repos hold every
split side by side (`data/train-00000-of-00084.parquet`, `data/validation-00000-of-00001.parquet`):
from a folder or a glob only the files of `split` are read (default `train`; `all` reads every
file). A file's split is named by the start of its file name or by a folder of that name; files
that name no split are always read, and so is a single file given by name.
"""

from __future__ import annotations

import glob
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ...utils.atomic import atomic_output_dir, check_output_not_input
from ..errors import BadSample, log
from ..formats import to_sample
from ..readers import open_file
from .writer import ShardWriter, sample_to_row

STYLES = ("recap", "onevision", "synthdog")
SYNTHDOG_PROMPT = "Read all the text in the image."
EXTENSIONS = (".parquet", ".jsonl", ".json")
# Split names as Hugging Face repos spell them, to the split they mean.
SPLITS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
          "val": "validation", "dev": "validation", "test": "test", "testing": "test"}


@dataclass
class ConvertReport:
    rows: int
    skipped: Counter
    files: int = 0
    other_splits: list[str] = field(default_factory=list)  # files left out by the split filter

    def __str__(self) -> str:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        left = f", {len(self.other_splits)} of other splits left out" if self.other_splits else ""
        return f"{self.rows} rows written from {self.files} files{left}; skipped rows: {skipped}"


def file_split(path: Path, root: Path | None = None) -> str | None:
    """The split a dataset file belongs to: the start of its name (`validation-00000-of-00001`,
    `test.jsonl`) or a folder under `root` named after one; None when it names none."""
    folders = path.parent.relative_to(root).parts if root is not None else ()
    for part in (path.stem, *reversed(folders)):
        split = SPLITS.get(re.split(r"[-_.]", part.lower(), maxsplit=1)[0])
        if split is not None:
            return split
    return None


def input_files(src: str | Path, split: str = "train") -> tuple[list[str], list[str]]:
    """(files to read, files of other splits) of a folder, a glob or one file."""
    text = str(src)
    if Path(text).is_file():
        return [text], []
    if Path(text).is_dir():
        root = Path(text)
        found = [p for p in root.rglob("*") if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    elif glob.has_magic(text):
        root, found = None, [Path(p) for p in glob.glob(text, recursive=True)]
    else:
        raise FileNotFoundError(f"--input {src}: no such file, folder or glob match")
    files = sorted(p for p in found if p.suffix in EXTENSIONS and p.is_file())
    keep = [p for p in files if split == "all" or file_split(p, root) in (None, split)]
    return [str(p) for p in keep], [str(p) for p in files if p not in keep]


def _raw_rows(path: str) -> Iterator[tuple[str, dict]]:
    name = Path(path).stem
    rows = open_file(path)
    for i in range(len(rows)):
        try:
            yield f"{name}:{i}", rows[i]
        except BadSample as err:
            yield f"{name}:{i}", err


def _synthdog_row(row: dict, prompt: str) -> dict:
    gt = row["ground_truth"]
    gt = json.loads(gt) if isinstance(gt, str) else gt
    text = gt["gt_parse"]["text_sequence"]
    return {"id": row.get("id"), "image": row["image"],
            "conversations": [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": text}]}


def convert(style: str, src: str | Path, out: str | Path, prompt: str = SYNTHDOG_PROMPT,
            overwrite: bool = False, limit: int | None = None, rows_per_shard: int = 10_000,
            split: str = "train") -> ConvertReport:
    from tqdm import tqdm

    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    if split != "all" and split not in SPLITS.values():
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(sorted(set(SPLITS.values())))} or all")
    files, other_splits = input_files(src, split)
    check_output_not_input(out, ([src] if Path(src).exists() else []) + files)
    if not files:
        also = f" of split {split!r} ({len(other_splits)} files of other splits)" if other_splits else ""
        raise FileNotFoundError(f"{src}: no .parquet, .jsonl or .json files{also}")
    skipped: Counter = Counter()
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, rows_per_shard)
        for path in tqdm(files, desc=f"convert {style}", unit="file"):
            root = str(Path(path).parent)
            for row_id, row in _raw_rows(path):
                if limit is not None and writer.rows + len(writer._buffer) >= limit:
                    break
                try:
                    if isinstance(row, BadSample):
                        raise row
                    if style == "synthdog":
                        row = _synthdog_row(row, prompt)
                    elif row.get("image") is None:
                        row = {k: v for k, v in row.items() if k != "image"}  # OneVision text-only rows
                    writer.write(sample_to_row(to_sample(row, "sharegpt", row_id, root)))
                except BadSample as err:
                    skipped[err.reason] += 1
                    log.warning("skipping %s (%s): %s", row_id, err.reason, err.detail)
                except (KeyError, TypeError, ValueError, FileNotFoundError) as err:
                    skipped["malformed_row" if not isinstance(err, FileNotFoundError) else "missing_file"] += 1
                    log.warning("skipping %s: %s", row_id, err)
        rows = writer.close()
    return ConvertReport(rows, skipped, len(files), other_splits)
