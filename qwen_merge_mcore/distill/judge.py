"""`qmm distill judge`: a verdict per generated row against its reference answer.

Rules first (rules.py); where none applies, a judge model is asked with thinking turned off
through its chat template (`enable_thinking: false`, the switch Qwen3 templates read; not a
`/no_think` typed into the prompt). Requests carry the row's key, so verdicts are matched to
rows by key, never by completion order. Verdicts: pass, fail, or unverified (no reference, a
reference whose R1-distill `score` is below --min-score, or a judge reply without a verdict).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

from ..utils.atomic import log
from .backends import Backend, Request
from .rules import rule_verdict

PROMPT = ("You are grading an answer against the reference answer of a question.\n\n"
          "Question:\n{question}\n\nReference answer:\n{reference}\n\nAnswer to grade:\n{answer}\n\n"
          "Does the answer reach the same final result as the reference? Reply with one line "
          "`VERDICT: PASS` or `VERDICT: FAIL`, then one short sentence saying why.")
_VERDICT = re.compile(r"VERDICT:\s*(PASS|FAIL)", re.I)
JUDGE_PARAMS = {"temperature": 0.0, "max_tokens": 256, "seed": 0}


def row_key(row: dict) -> str:
    return f"{row['id']}|{row.get('mode', '')}"


def judge_messages(row: dict) -> list[dict]:
    """The judge's chat: one user turn (text only; the question's text is enough to grade)."""
    return [{"role": "user", "content": PROMPT.format(question=row["question"], reference=row["reference"],
                                                      answer=row["answer"])}]


def judge_request(row: dict, max_tokens: int = JUDGE_PARAMS["max_tokens"]) -> Request:
    return Request(row_key(row), judge_messages(row), False, {**JUDGE_PARAMS, "max_tokens": max_tokens})


def parse_verdict(text: str) -> tuple[str, str]:
    found = _VERDICT.findall(text)
    reason = text.strip().splitlines()[-1][:500] if text.strip() else ""
    if not found:
        return "unverified", f"judge reply without a verdict: {text.strip()[:200]!r}"
    return found[-1].lower(), reason


def _pre_verdict(row: dict, min_score: Optional[float]) -> Optional[tuple[str, str, str]]:
    """(verdict, reason, by) without a model, or None."""
    reference = row.get("reference")
    if not isinstance(reference, str) or not reference.strip():
        return "unverified", "no reference answer", "rules"
    score = row.get("score")
    if min_score is not None and isinstance(score, (int, float)) and score < min_score:
        return "unverified", f"the reference's score {score} is below --min-score {min_score}", "rules"
    ruled = rule_verdict(row.get("answer") or "", reference)
    if ruled is not None:
        return ("pass" if ruled[0] else "fail"), ruled[1], "rules"
    return None


def judge(src: str | Path, out: str | Path, make_backend: Optional[Callable[[], Backend]] = None,
          keep: Optional[str] = None, min_score: Optional[float] = 8.0, overwrite: bool = False,
          record_prompt_ids: bool = False, max_tokens: int = JUDGE_PARAMS["max_tokens"]) -> Counter:
    """Write `out/data-00000.jsonl` (the kept rows, each with `verdict`, `judge_reason`, `judged_by`)
    and, with `keep`, `out/rejected/data.jsonl` with the others; images are linked from `src`."""
    from ..utils.atomic import atomic_output_dir, check_output_not_input
    from .store import read_rows

    src, out = Path(src), Path(out)
    rows = read_rows(src)
    if not rows:
        raise ValueError(f"{src}: no data-*.jsonl rows to judge (the output of `qmm distill generate`)")
    check_output_not_input(out, [src], "--out")
    pending = []
    for row in rows:
        decided = _pre_verdict(row, min_score)
        if decided is None:
            pending.append(row)
        else:
            row["verdict"], row["judge_reason"], row["judged_by"] = decided
    if pending:
        if make_backend is None:
            raise ValueError(f"{len(pending)} rows need a judge model (no rule decides them): pass --judge "
                             "MODEL_DIR or --server URL")
        backend = make_backend()
        try:
            teachers = {r.get("teacher") for r in rows}
            if backend.name in teachers:
                log.warning("the judge %s is the model that generated these rows: it tends to pass its own "
                            "answers; prefer another judge", backend.name)
            replies = backend.generate([judge_request(r, max_tokens) for r in pending])
        finally:
            backend.close()
        for row in pending:
            reply = replies.get(row_key(row))
            if reply is None or reply.finish_reason in ("timeout", "error"):
                row["verdict"], row["judge_reason"] = "unverified", "the judge request failed"
            else:
                row["verdict"], row["judge_reason"] = parse_verdict(reply.text)
                if record_prompt_ids:
                    row["judge_prompt_token_ids"] = reply.prompt_token_ids
            row["judged_by"] = backend.name
    counts = Counter(r["verdict"] for r in rows)
    kept = [r for r in rows if keep is None or r["verdict"] == keep]
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        _write_jsonl(tmp / "data-00000.jsonl", kept)
        if keep is not None:
            (tmp / "rejected").mkdir()
            _write_jsonl(tmp / "rejected" / "data.jsonl", [r for r in rows if r["verdict"] != keep])
        _link_images(src, tmp, rows)
    return counts


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _link_images(src: Path, out: Path, rows: list[dict]) -> None:
    """Hard links where the file system allows (no second copy of the images), else copies."""
    for name in sorted({image for r in rows for image in r.get("images") or []}):
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / name, target)
        except OSError:
            shutil.copyfile(src / name, target)
