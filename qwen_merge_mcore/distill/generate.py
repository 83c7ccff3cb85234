"""`qmm distill generate`: teacher replies for every question of the input (see store.py for
the resumable output, sampling.py for the modes)."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .backends import Backend, Request
from .progress import Progress
from .questions import Question, chat_messages, read_questions
from .replies import split_reply, to_row
from .sampling import SamplingConfig, modes_for, params
from .store import Store

# Replies a server could not give: the question stays undone and a rerun asks again.
FAILED = ("timeout", "error")


@dataclass
class GenerateReport:
    questions: int = 0  # in this shard
    already_done: int = 0
    answered: int = 0  # finished in this run
    rows: int = 0  # rows kept by this run
    dropped: Counter = field(default_factory=Counter)  # replies not kept, per reason (length, ...)
    failed: Counter = field(default_factory=Counter)  # questions left undone, per reason
    bad_input: Counter = field(default_factory=Counter)  # input rows skipped, per reason
    output_tokens: int = 0

    def __str__(self) -> str:
        def counts(c: Counter) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"

        return (f"{self.questions} questions ({self.already_done} done before, {self.answered} answered now, "
                f"{self.questions - self.already_done - self.answered} left); {self.rows} rows kept; "
                f"replies dropped: {counts(self.dropped)}; questions failed: {counts(self.failed)}; "
                f"input rows skipped: {counts(self.bad_input)}")


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/8") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: needs 0 <= i < n")
    return i, n


def in_shard(qid: str, shard: tuple[int, int]) -> bool:
    """Shards split by a hash of the id: the same split whatever the row order."""
    return int(hashlib.sha1(qid.encode()).hexdigest(), 16) % shard[1] == shard[0]


def generate(src: str, out: str | Path, make_backend: Callable[[list[Question]], Backend],
             sampling: SamplingConfig = SamplingConfig(), shard: tuple[int, int] = (0, 1), chunk: int = 256,
             teacher: Optional[str] = None, progress_interval_s: float = 60.0) -> GenerateReport:
    """Answer the undone questions of `src` in chunks of `chunk`, committing each chunk."""
    from ..data.readers import dataset_files
    from ..utils.atomic import check_output_not_input

    sampling.validate()
    out = Path(out)
    dataset_files(src)  # a missing input fails before anything is created
    check_output_not_input(out, [src], "--out")
    out.mkdir(parents=True, exist_ok=True)
    store = Store(out, shard)
    report = GenerateReport()
    questions = [q for q in read_questions(src, out, report.bad_input) if in_shard(q.id, shard)]
    report.questions = len(questions)
    todo = [q for q in questions if q.id not in store.done]
    report.already_done = report.questions - len(todo)
    if not todo:
        return report
    backend = make_backend(todo)
    name = teacher or backend.name
    bar = Progress(len(todo), f"distill generate {store.tag}", progress_interval_s)
    try:
        for start in range(0, len(todo), chunk):
            batch = todo[start:start + chunk]
            _answer(batch, out, backend, sampling, name, store, report, bar.interactive)
            bar.update(len(batch))
    finally:
        bar.close()
        backend.close()
    return report


def _answer(batch: list[Question], out: Path, backend: Backend, sampling: SamplingConfig, teacher: str,
            store: Store, report: GenerateReport, progress: bool) -> None:
    requests = {}
    for q in batch:
        for mode in modes_for(q.id, sampling):
            requests[(q.id, mode.name)] = (q, mode, Request(f"{q.id}|{mode.name}", chat_messages(q, out),
                                                            mode.thinking, params(q.id, mode, sampling)))
    replies = backend.generate([r for _, _, r in requests.values()], progress=progress)
    failed = {}
    for (qid, _), (_, _, request) in requests.items():
        reply = replies.get(request.key)
        reason = "error" if reply is None else reply.finish_reason
        if reason in FAILED:
            failed.setdefault(qid, reason)
    rows, dropped = [], Counter()
    for (qid, _), (q, mode, request) in requests.items():
        if qid in failed:
            continue
        reply = replies[request.key]
        report.output_tokens += reply.output_tokens
        if reply.finish_reason != "stop":
            dropped[reply.finish_reason] += 1
            continue
        reasoning, answer, why = split_reply(reply.text, mode)
        if why:
            dropped[why] += 1
            continue
        rows.append(to_row(q, mode, reply, reasoning, answer, teacher, request.params["seed"]))
    done = [q.id for q in batch if q.id not in failed]
    store.commit(done, rows, dropped)
    report.answered += len(done)
    report.rows += len(rows)
    report.dropped.update(dropped)
    report.failed.update(failed.values())

