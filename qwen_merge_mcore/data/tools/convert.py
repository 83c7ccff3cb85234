"""Convert public dataset layouts, from a local folder, into the training format (writer.py).

- `recap` (lmms-lab/LLaVA-ReCap-*): parquet with `id`, `image` {bytes, path}, `conversations`, or
  the LLaVA JSON list (`[{"id", "image": "relative/path", "conversations"}]`) next to its images.
- `onevision` (lmms-lab/LLaVA-OneVision-Data): per-subset parquet, same columns (image may be
  null for text-only rows), `data_source`.
- `synthdog` (naver-clova-ix/synthdog-en/-zh): parquet with `image` and `ground_truth`, a JSON
  string `{"gt_parse": {"text_sequence": ...}}`; becomes `<image>{prompt}` -> the text.

Each row goes through the same parser as training reads (formats.py), so what converts, trains;
rows that fail are skipped and counted per reason.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ...utils.atomic import atomic_output_dir
from ..errors import BadSample, log
from ..formats import to_sample
from ..readers import open_file
from .writer import ShardWriter, sample_to_row

STYLES = ("recap", "onevision", "synthdog")
SYNTHDOG_PROMPT = "Read all the text in the image."


@dataclass
class ConvertReport:
    rows: int
    skipped: Counter

    def __str__(self) -> str:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.rows} rows written; skipped: {skipped}"


def _input_files(src: Path) -> list[str]:
    """A file, or every .parquet/.jsonl/.json under a folder (HF repos keep them in data/)."""
    if src.is_file():
        return [str(src)]
    return sorted(str(p) for p in src.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json")
                  and not any(part.startswith(".") for part in p.relative_to(src).parts))


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
            overwrite: bool = False, limit: int | None = None, rows_per_shard: int = 10_000) -> ConvertReport:
    from tqdm import tqdm

    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    src = Path(src)
    files = _input_files(src)
    if not files:
        raise FileNotFoundError(f"{src}: no .parquet, .jsonl or .json files")
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
    return ConvertReport(rows, skipped)
