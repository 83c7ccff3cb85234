"""Batches in samples: the same samples per step, and the same loss curve, at DP 1, 2 and 4 (DP 4
for the steps after a resume); a run resumed at the same or at another DP continues with the next
unseen sample."""

from __future__ import annotations

import shutil

import pytest

from . import batch_cases

STEPS, HALF, SAMPLES = 4, 2, 8  # train_iters, the save, train.global_batch_samples (batch_cases.config)
# fp32 on CPU: the DP sizes pack the same samples into other micro-batches and reduce the gradients
# in another order, so the losses agree to float summation order, not bit for bit.
LOSS_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def runs(distributed, tiny, tmp_path_factory):
    """Four runs (each process group costs ~a minute here): DP 1 for all steps; DP 2 for half of
    them, saved, then resumed at DP 2 and, from a copy of the checkpoint, at DP 4."""
    from qwen_merge_mcore.fixtures.tiny_data import make_tiny_data

    root = tmp_path_factory.mktemp("batches")
    make_tiny_data(root / "data", samples=24)
    args = (str(root / "data"), str(tiny["qwen3"]))
    out = {1: distributed(batch_cases.train_case, world_size=1, args=(*args, STEPS))[0]}
    out["first_half"] = distributed(batch_cases.train_case, world_size=2, args=(*args, HALF, str(root / "run")))[0]
    shutil.copytree(root / "run", root / "run_dp4")
    out[2] = distributed(batch_cases.train_case, world_size=2, args=(*args, STEPS, str(root / "run")))[0]
    out[4] = distributed(batch_cases.train_case, world_size=4, args=(*args, STEPS, str(root / "run_dp4")))[0]
    return out


def test_every_dp_size_trains_on_the_same_samples_per_step(runs):
    steps = runs[1]["samples"]
    assert len(steps) == STEPS and all(len(s) == len(set(s)) == SAMPLES for s in steps)
    assert len({x for s in steps for x in s}) == STEPS * SAMPLES  # no sample twice within the pass
    assert runs["first_half"]["samples"] == steps[:HALF]
    assert runs[2]["samples"] == runs[4]["samples"] == steps[HALF:]


def test_every_dp_size_gives_the_same_loss_curve(runs):
    base = runs[1]["losses"]
    assert base[-1] < base[0]  # it trains, so that the comparison means something
    # A resumed run's summary holds the whole curve: the first half from the DP 2 checkpoint.
    curves = {2: runs[2]["losses"], 4: runs[4]["losses"]}
    for dp, curve in curves.items():
        assert len(curve) == len(base) and curve[:HALF] == runs["first_half"]["losses"], (dp, curve)
        assert max(abs(a - b) for a, b in zip(curve, base)) < LOSS_TOLERANCE, (dp, curve, base)


def test_a_resumed_run_continues_with_the_next_unseen_sample(runs):
    for dp in (2, 4):  # at the DP it was saved at, and at another (the checkpoint's common data position)
        assert runs[dp]["first"] == HALF and runs[dp]["position"] == STEPS * SAMPLES
