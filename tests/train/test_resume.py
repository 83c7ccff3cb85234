"""Resuming a run whose checkpoints or settings changed since (CPU ranks, gloo, TP=2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from . import cases


@pytest.fixture(scope="module")
def damaged(distributed, tmp_path_factory):
    return distributed(cases.damaged_checkpoint_cases, world_size=2, tp=2,
                       args=(str(tmp_path_factory.mktemp("damaged")), 2))[0]


def test_truncated_latest_falls_back_to_newest_intact(damaged):
    r = damaged
    assert f"{r['shard']}: truncated" in r["log"], r["log"]
    assert "moved aside to iter_0000004.damaged" in r["log"] and "resuming from the newest intact" in r["log"]
    assert r["resumed_from"] == 2
    # Iteration 4 trained and saved again; the damaged copy is kept beside, out of the way.
    assert r["after"] == (6, ["iter_0000002", "iter_0000004", "iter_0000004.damaged", "iter_0000006"]), r["after"]


def test_weights_only_start_from_truncated_checkpoint_names_the_file(damaged):
    assert damaged["pretrained"] and damaged["pretrained"].startswith(damaged["shard"].replace(
        "iter_0000004", "iter_0000004.damaged") + ": truncated"), damaged["pretrained"]


@pytest.fixture(scope="module")
def longer(distributed, tmp_path_factory):
    return distributed(cases.longer_run_cases, world_size=2, tp=2,
                       args=(str(tmp_path_factory.mktemp("longer")), 2))[0]


def test_longer_train_iters_on_resume_follows_the_new_schedule(longer):
    log = longer["log"]
    assert "the LR schedule follows this config, not the checkpoint's: lr_decay_steps 4 -> 8 (at step 4)" in log, log
    logged = dict(re.findall(r"iter\s+(\d+)/8 \| .*? \| lr (\S+) \|", log))
    # Steps 5-8 train at the LR of a fresh 8-step schedule, not at min_lr = 0 after the old end.
    assert [logged[str(i)] for i in range(5, 9)] == longer["expected_lr"][4:], (logged, longer["expected_lr"])


def test_summary_holds_every_step_across_resumes(longer):
    assert len(longer["short"]) == 4 and len(longer["longer"]) == 8
    assert longer["longer"][:4] == longer["short"]
    assert longer["summary_json"]["losses"] == longer["longer"]
    assert longer["summary_json"]["first_iteration"] == 4 and longer["summary_json"]["first_loss"] == longer["short"][0]


def test_wandb_run_id_is_kept_in_the_run_folder(tmp_path):
    from qwen_merge_mcore.training.observability import WANDB_RUN_ID, wandb_resume

    first = wandb_resume(str(tmp_path / "run"))
    assert first == {"id": (tmp_path / "run" / WANDB_RUN_ID).read_text().strip(), "resume": "allow"}
    assert wandb_resume(str(tmp_path / "run")) == first  # the requeued job: same run
    assert wandb_resume(str(tmp_path / "other"))["id"] != first["id"]
    assert wandb_resume(None) == {}


def test_a_resumed_job_continues_the_same_wandb_run(tmp_path, monkeypatch):
    """Through the real wandb client, offline (no network)."""
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install 'qwen_merge_mcore[wandb]')")
    from qwen_merge_mcore.training.observability import WANDB_RUN_ID, StepLogger

    from .helpers import tiny_config

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(checkpoint={"save": str(tmp_path / "run")}, logging={"wandb_project": "qmm-test"})
    ids = []
    for start in (0, 4):  # the first job, then its requeued continuation
        log = StepLogger(cfg, 0, 1, start, 8, fp8_model=False)
        ids.append(log.wandb.id)
        log.finish(0, start == 0, None, [])
    assert ids[0] == ids[1] == (tmp_path / "run" / WANDB_RUN_ID).read_text().strip()


@pytest.mark.parametrize("what", ["truncated", "another model"])
def test_rank_errors_reach_the_parent_as_one_line(damaged, distributed, what):
    """A damaged or mismatched checkpoint read by spawned ranks (the converters, `qmm compare`):
    the parent raises that rank's one line naming the file, which the CLI prints as it is."""
    from qwen_merge_mcore.cli import is_user_error
    from qwen_merge_mcore.distributed import RankError

    run = Path(damaged["shard"]).parents[1]
    path, model = ((run / "iter_0000004.damaged", {}) if what == "truncated" else
                   (run / "iter_0000006", {"language": {"ffn_hidden_size": 128}}))
    with pytest.raises(RankError) as info:
        distributed(cases.load_pretrained, world_size=2, tp=2, args=(str(path), model))
    line = str(info.value)
    assert "\n" not in line and is_user_error(info.value), line
    if what == "truncated":
        assert line.startswith("rank ") and f"{path}/" in line and ": truncated" in line, line
    else:
        assert f"{path}: holds a different model: " in line and "(4, 128, 256) there, (4, 128, 128) here" in line, line
