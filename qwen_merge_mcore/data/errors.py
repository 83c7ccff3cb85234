"""Why a sample was dropped, and the per-reason bookkeeping that stops a run gone bad."""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Optional

log = logging.getLogger("qwen_merge_mcore.data")

# Reasons a sample is skipped (the keys of BadSampleCounter.counts).
REASONS = ("malformed_row", "missing_file", "bad_image", "bad_video", "too_long", "image_token_mismatch")


class BadSample(Exception):
    """A sample that cannot be trained on. `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str, index: Optional[int] = None):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.index = reason, detail, index


class TooManyBadSamples(RuntimeError):
    pass


class BadSampleCounter:
    """Counts samples seen and skipped per reason; raises once the bad fraction passes the limit.

    The fraction is judged only after 1/max_bad_fraction samples, so that a single bad row
    among the first few cannot stop a run that is 99.9% clean.
    """

    def __init__(self, max_bad_fraction: float):
        self.max_bad_fraction = max_bad_fraction
        self.seen = 0
        self.counts: Counter[str] = Counter()

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    def ok(self) -> None:
        self.seen += 1

    def skip(self, row_id: str, err: BadSample, already_seen: bool = False) -> None:
        """`already_seen`: the sample was counted by `ok()` before it turned out bad (at decode)."""
        self.seen += 0 if already_seen else 1
        self.counts[err.reason] += 1
        log.warning("skipping sample %s (%s): %s", row_id, err.reason, err.detail)
        judge_after = math.ceil(1 / self.max_bad_fraction) if self.max_bad_fraction > 0 else 1
        if self.seen >= judge_after and self.bad > self.max_bad_fraction * self.seen:
            raise TooManyBadSamples(
                f"{self.bad} of {self.seen} samples were unusable ({dict(self.counts)}), more than "
                f"data.max_bad_fraction={self.max_bad_fraction}; last: sample {row_id}: {err}")

    def state_dict(self) -> dict:
        return {"seen": self.seen, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]
        self.counts = Counter(state["counts"])
