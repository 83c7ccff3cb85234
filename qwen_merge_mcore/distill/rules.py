"""Rule-based verdicts: compare the teacher's final answer with the reference where an answer
can be extracted from both (a boxed expression, a final number, a multiple-choice letter, a
short exact answer). `None` when no rule applies: the model judge decides."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_LETTER = re.compile(r"^\(?([A-J])\)?[.:)]?$")
_ANSWER_LETTER = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-J])\)?(?![A-Za-z])", re.I)
SHORT = 32  # characters: a reference at most this long is compared exactly


def boxed(text: str) -> Optional[str]:
    """The content of the last \\boxed{...} (nested braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None


def number(text: str) -> Optional[Fraction]:
    """`text` as an exact number when it is one (commas, fractions, a trailing %, $ or .)."""
    t = text.strip().strip("$").rstrip(".%").replace(",", "").replace("\\!", "")
    t = re.sub(r"^\\d?frac\{(-?\d+)\}\{(\d+)\}$", r"\1/\2", t)
    if not re.fullmatch(r"-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+", t):
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def letter(text: str) -> Optional[str]:
    m = _LETTER.match(text.strip())
    return m.group(1) if m else None


def _normal(text: str) -> str:
    return re.sub(r"[\s.,;:!?'\"`()\[\]]+", " ", text.lower()).strip()


def _final_line(answer: str) -> str:
    lines = [line for line in answer.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def rule_verdict(answer: str, reference: str) -> Optional[tuple[bool, str]]:
    """(passed, reason) or None when no rule can decide."""
    ref = boxed(reference) or reference.strip()
    got_boxed = boxed(answer)
    ref_number = number(ref)
    if ref_number is not None:
        candidates = [got_boxed] if got_boxed is not None else _NUMBER.findall(_final_line(answer))[-1:]
        got = number(candidates[0]) if candidates and candidates[0] is not None else None
        if got is None:
            return None
        return got == ref_number, f"number: answer {got} vs reference {ref_number}"
    ref_letter = letter(ref)
    if ref_letter is not None:
        got = letter(got_boxed) if got_boxed else None
        if got is None:
            found = _ANSWER_LETTER.findall(answer) or ([letter(_final_line(answer))] if letter(_final_line(answer))
                                                      else [])
            got = found[-1].upper() if found else None
        if got is None:
            return None
        return got == ref_letter, f"choice: answer {got} vs reference {ref_letter}"
    if len(ref) <= SHORT:
        got = got_boxed if got_boxed is not None else _final_line(answer)
        if _normal(got) == _normal(ref):
            return True, "exact: the final answer equals the reference"
        if got_boxed is not None:
            return False, f"exact: boxed {got_boxed!r} vs reference {ref!r}"
    return None
