"""Resuming a run whose checkpoints or settings changed since (CPU ranks, gloo, TP=2)."""

from __future__ import annotations

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
