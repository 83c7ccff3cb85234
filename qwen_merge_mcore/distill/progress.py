"""Progress: a bar on a terminal, a periodic log line under Slurm or when stderr is a file."""

from __future__ import annotations

import os
import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, interval_s: float = 60.0):
        self.total, self.desc, self.interval_s = total, desc, interval_s
        self.done, self._start, self._last = 0, time.monotonic(), 0.0
        interactive = sys.stderr.isatty() and "SLURM_JOB_ID" not in os.environ
        self._bar = None
        if interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="question")

    @property
    def interactive(self) -> bool:
        return self._bar is not None

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s or self.done >= self.total:
            self._last = now
            rate = self.done / max(now - self._start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            print(f"{self.desc}: {self.done}/{self.total} questions ({100 * self.done / max(self.total, 1):.0f}%), "
                  f"{rate:.2f} questions/s, eta {eta / 60:.0f} min", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
