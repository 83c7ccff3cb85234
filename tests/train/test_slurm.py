"""`sbatch slurm/stage3.sbatch` on a real one-node Slurm with the tiny config and 2 tasks (TP=2 on
gloo). The job is stopped with SIGTERM mid-run (as preemption does): it checkpoints and exits;
requeued, it resumes from that checkpoint. Later Slurm's time-limit warning (SIGUSR1 to the batch
shell, `--signal=B:USR1@...`) makes it checkpoint and requeue itself; it resumes again and
finishes every step exactly once, with a lower loss and a final checkpoint."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from qwen_merge_mcore.fixtures.tiny_data import make_tiny_data
from qwen_merge_mcore.testing.slurm import FINISHED, SlurmCluster, slurm_missing
from qwen_merge_mcore.training.checkpointing import latest_iteration
from qwen_merge_mcore.quickstart import stage_config

REPO = Path(__file__).resolve().parents[2]
STEPS, INTERVAL = 12, 3
LINE = re.compile(r"\[stage3\] iter\s+(\d+)/\d+ \| loss ([0-9.]+)")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = slurm_missing()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def _wait_for(path: Path, pattern: str, timeout: float, job_state) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace")):
            return
        state = job_state()
        assert state[0] not in FINISHED, f"job ended early {state}:\n{_tail(path)}"
        time.sleep(1)
    raise TimeoutError(f"{pattern!r} not in {path} after {timeout} s:\n{_tail(path)}")


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else "(no output)"


def _start_now(slurm, job) -> None:
    """Slurm makes a requeued job eligible only ~2 minutes later; the test does not wait for
    that. It waits 2 s: slurmd refuses credentials issued in the same second as the revocation
    of the killed instance's ("Job credential revoked")."""
    time.sleep(2)
    slurm.run(["scontrol", "update", f"jobid={job}", "StartTime=now"])


def test_sbatch_stage3_preempted_then_resumed(slurm, tiny, tmp_path):
    make_tiny_data(tmp_path / "data", samples=24)
    config = tmp_path / "stage3.yaml"
    config.write_text(stage_config("stage3", tmp_path))
    run, out = tmp_path / "runs" / "stage3", tmp_path / "job.out"
    env = {"CONFIG": str(config), "PYTHON": sys.executable, "PYTHONPATH": str(REPO),
           "OVERRIDES": f"checkpoint.pretrained= data.tokenizer={tiny['qwen3']} train.train_iters={STEPS} "
                        f"checkpoint.save_interval={INTERVAL}"}
    job = slurm.sbatch(["--ntasks-per-node=2", "--cpus-per-task=1", f"--output={out}", "slurm/stage3.sbatch"],
                       env=env, cwd=REPO)

    # Preempt it after the first interval checkpoint: SIGTERM to the tasks, as scancel/preemption do.
    _wait_for(out, rf"iter\s+{INTERVAL + 2}/{STEPS}", 300, lambda: slurm.state(job))
    slurm.run(["scancel", "--signal=TERM", str(job)])
    state = slurm.wait(job, timeout=120)
    assert state == ("FAILED", "75:0"), f"{state}\n{_tail(out)}"  # 75: stopped with a checkpoint
    stopped_at = latest_iteration(run)
    assert INTERVAL + 2 <= stopped_at < STEPS, _tail(out)

    slurm.run(["scontrol", "requeue", str(job)])
    _start_now(slurm, job)
    _wait_for(out, rf"resumed from .* at iteration {stopped_at}", 300, lambda: slurm.state(job))

    # The time-limit warning goes to the batch shell only; the script passes it on and requeues.
    _wait_for(out, rf"iter\s+{stopped_at + 2}/{STEPS}", 300, lambda: slurm.state(job))
    slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])
    _wait_for(out, "time limit near: checkpoint and requeue", 60, lambda: slurm.state(job))
    state = slurm.wait(job, timeout=120, until={"PENDING", "REQUEUED", "REQUEUE_HOLD"} | FINISHED)
    assert state[0] in ("PENDING", "REQUEUED"), f"{state}\n{_tail(out)}"
    second_stop = latest_iteration(run)
    assert stopped_at + 2 <= second_stop < STEPS, _tail(out)
    _start_now(slurm, job)
    _wait_for(out, rf"resumed from .* at iteration {second_stop}", 300, lambda: slurm.state(job))
    state = slurm.wait(job, timeout=300)
    assert state == ("COMPLETED", "0:0"), f"{state}\n{_tail(out)}"

    log = out.read_text()
    losses = {int(i): float(v) for i, v in LINE.findall(log)}
    assert sorted(losses) == list(range(1, STEPS + 1)), log[-3000:]  # every step once: no step redone or lost
    assert losses[STEPS] < losses[1] - 0.3, losses
    assert latest_iteration(run) == STEPS and (run / f"iter_{STEPS:07d}" / "metadata.json").is_file()
