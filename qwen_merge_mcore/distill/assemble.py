"""`qmm distill assemble`: the stage-3 mix from generated (and judged) rows.

Text questions are rendered into images with the existing renderer (data/tools/render.py) and
joined with their teacher replies by row; multimodal rows keep their own images. Output, under
`--out` (`data/` gives the paths launch/stage3.yaml names):
  stage3-rendered-questions/data.jsonl + images/   text questions as pages + instruction
  stage3-multimodal-reasoning/data.jsonl + images/ the multimodal traces
  stage3-data.yaml                                 the `data:` section with the recipe's mix
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..data.tools.render import DEFAULT_INSTRUCTION, MissingGlyphs, PageStyle, render_pages
from ..utils.atomic import atomic_output_dir, atomic_write_text, check_output_not_input, log
from .replies import NO_THINK_TAG
from .store import read_rows

TEXT, MULTIMODAL = "stage3-rendered-questions", "stage3-multimodal-reasoning"
EPOCHS = 1.2  # the recipe: 1.2 epochs over both parts (launch/stage3.yaml)


@dataclass
class AssembleReport:
    text_rows: int = 0
    pages: int = 0
    multimodal_rows: int = 0
    skipped: int = 0  # rows not passed by the judge, or questions the font cannot draw

    def __str__(self) -> str:
        return (f"{self.text_rows} text rows rendered into {self.pages} pages, {self.multimodal_rows} multimodal "
                f"rows, {self.skipped} rows skipped")


def _rows(inputs: list[str]) -> list[tuple[Path, dict]]:
    out = []
    for folder in inputs:
        rows = read_rows(Path(folder))
        if not rows:
            raise ValueError(f"{folder}: no data-*.jsonl rows (an output of `qmm distill generate` or `judge`)")
        out.extend((Path(folder), r) for r in rows)
    return out


def assemble(inputs: list[str], out: str | Path, instruction: str = DEFAULT_INSTRUCTION,
             style: PageStyle = PageStyle(), font: Optional[str] = None, overwrite: bool = False) -> AssembleReport:
    out = Path(out)
    for src in inputs:
        check_output_not_input(out / TEXT, [src], "--out")
        check_output_not_input(out / MULTIMODAL, [src], "--out")
    rows = _rows(inputs)
    report = AssembleReport()
    usable = [(src, r) for src, r in rows if r.get("verdict", "pass") == "pass"]
    report.skipped = len(rows) - len(usable)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(out / TEXT, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "data.jsonl", "w", encoding="utf-8") as f:
            for _, row in (x for x in usable if not x[1].get("images")):
                try:
                    names = _render(row["question"], tmp, style, font)
                except MissingGlyphs as err:
                    log.warning("skipping %s: %s", row["id"], err)
                    report.skipped += 1
                    continue
                tag = "" if row.get("mode") != "nothink" else NO_THINK_TAG
                user = {"role": "user", "content": "<image>" * len(names) + instruction + tag}
                f.write(json.dumps({**row, "messages": [user, row["messages"][-1]], "images": names},
                                   ensure_ascii=False) + "\n")
                report.text_rows += 1
        report.pages = len(list((tmp / "images").iterdir()))
    with atomic_output_dir(out / MULTIMODAL, overwrite=overwrite) as tmp:
        with open(tmp / "data.jsonl", "w", encoding="utf-8") as f:
            for src, row in (x for x in usable if x[1].get("images")):
                for name in row["images"]:
                    _link(src / name, tmp / name)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                report.multimodal_rows += 1
    atomic_write_text(out / "stage3-data.yaml", data_section(out))
    return report


def _render(question: str, tmp: Path, style: PageStyle, font: Optional[str]) -> list[str]:
    """Pages named by the question's hash: its think and no-think rows share them."""
    key = hashlib.sha1(question.encode()).hexdigest()[:20]
    existing = sorted(p.name for p in (tmp / "images").glob(f"{key}_*.png"))
    if existing:
        return [f"images/{n}" for n in existing]
    names = []
    for k, png in enumerate(render_pages(question, style, font)):
        names.append(f"images/{key}_{k:02d}.png")
        (tmp / names[-1]).write_bytes(png)
    return names


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def data_section(out: Path) -> str:
    lines = ["# The stage-3 mix written by `qmm distill assemble`: the `data:` section of launch/stage3.yaml",
             "# (that file names data/stage3-*; assemble with --out data, or copy these paths there).",
             "data:", "  template: qwen3", "  datasets:"]
    for name in (TEXT, MULTIMODAL):
        short = name[len("stage3-"):]
        lines.append(f"    - {{path: {out / name}, name: {short}, epochs: {EPOCHS}}}")
    return "\n".join(lines) + "\n"
