"""SIGTERM / SIGUSR1 -> checkpoint and clean exit.

Slurm sends SIGTERM when it preempts or cancels a job and (with `--signal=USR1@120`) SIGUSR1
shortly before the time limit; torchrun forwards SIGTERM to its workers. The handler only
records the signal; the loop asks every step whether any rank got one (one tiny all-reduce),
so that all ranks save the same iteration together and leave.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped early with a checkpoint; run again to continue


class ExitSignals:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def any_rank_received(self) -> bool:
        flag = torch.tensor([1 if self.received is not None else 0],
                            device="cuda" if torch.cuda.is_available() else "cpu")
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
