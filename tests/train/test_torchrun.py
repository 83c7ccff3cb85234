"""`python -m qwen_merge_mcore.torchrun` (torchrun, 2 CPU workers, TP=2 on gloo) stopped with
SIGTERM mid-run: the workers checkpoint and exit 75, and so does the launcher, in one line
(plain torchrun fails with a traceback and exit 1, which a requeue wrapper reads as a crash)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from qwen_merge_mcore.distributed import free_port
from qwen_merge_mcore.fixtures.tiny_data import make_tiny_data
from qwen_merge_mcore.quickstart import stage_config
from qwen_merge_mcore.training.checkpointing import latest_iteration

REPO = Path(__file__).resolve().parents[2]


def _train(config: Path, tiny, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "qwen_merge_mcore.torchrun", "--nproc-per-node", "2", "--master-port",
            str(free_port()), "-m", "qwen_merge_mcore", "train", "--config", str(config), "checkpoint.pretrained=",
            f"data.tokenizer={tiny['qwen3']}", "train.train_iters=500", "checkpoint.save_interval=1000",
            "data.num_workers=0", *overrides]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_sigterm_exits_with_the_workers_requeue_code_and_errors_are_one_line(tiny, tmp_path):
    make_tiny_data(tmp_path / "data", samples=8)
    config = tmp_path / "stage3.yaml"
    config.write_text(stage_config("stage3", tmp_path))
    run, out = tmp_path / "runs" / "stage3", tmp_path / "out.log"
    cmd, env = _train(config, tiny), ENV
    with open(out, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        try:
            deadline = time.time() + 300
            while not re.search(r"iter\s+2/500", out.read_text()):
                assert proc.poll() is None and time.time() < deadline, out.read_text()[-3000:]
                time.sleep(1)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert "all 2 workers checkpointed and exited with 75" in err and "Traceback" not in err, err[-3000:]
    assert latest_iteration(run) >= 2

    # A worker's error (here: a truncated shard of the checkpoint to start from) ends the launcher
    # with its exit code: each worker's one line, then the launcher's, no traceback.
    ckpt = run / f"iter_{latest_iteration(run):07d}"
    shard = sorted(ckpt.glob("*.distcp"))[0]
    os.truncate(shard, shard.stat().st_size // 2)
    done = subprocess.run(_train(config, tiny, f"checkpoint.pretrained={ckpt}", f"checkpoint.save={tmp_path / 'b'}"),
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"qmm train: error: {shard}: truncated" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert re.search(r"torchrun: worker \d failed first, exit code 1 \(its error is above\)", done.stderr)
