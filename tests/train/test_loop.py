"""The training loop on CPU ranks (gloo) with the CPU engine."""

from __future__ import annotations

import math

import pytest

from . import cases


@pytest.fixture(scope="module")
def results(distributed, tmp_path_factory):
    """One 2-rank process group (TP=2 on gloo) runs every case; each test checks one."""
    return distributed(cases.all_cases, world_size=2, tp=2, args=(str(tmp_path_factory.mktemp("loop")), 2))[0]


@pytest.fixture
def resume_tp2(results):
    return [results["resume"]]


def test_resume_is_bit_identical(resume_tp2):
    r = resume_tp2[0]
    assert r["interrupted"] and len(r["stopped"]) == 4, r["stopped"]
    assert r["resumed_from"] == 4
    # Exact equality: same data order, optimizer state, LR step and RNG after the resume.
    # The resumed run's summary holds the whole curve, the steps before the stop included.
    assert r["stopped"] == r["full"][:4] and r["resumed"] == r["full"]


def test_loss_goes_down(resume_tp2):
    losses = resume_tp2[0]["full"]
    assert losses[-1] < losses[0] - 0.1, losses


def test_keep_last_and_atomic_save(resume_tp2):
    r = resume_tp2[0]
    assert r["kept"] == ["iter_0000006", "iter_0000007"]  # saves at 3, 6 and the end; keep_last=2
    # Resumed at 4 and saved at 5, 6, 7 with keep_last=2: each carries hf_meta on.
    assert r["with_meta"] == ["iter_0000006", "iter_0000007"], r["with_meta"]
    assert "killed mid-save" in r["failed"]
    latest, names = r["after_failure"]
    assert latest == 7  # the dead save at iteration 8 never became the latest
    assert "iter_0000008" not in names and ".tmp_iter_0000008" in names


def test_checkpoint_size_estimate(resume_tp2):
    """What `qmm train` checks free space against at start (from the parameter counts)."""
    from qwen_merge_mcore.training.checkpointing import checkpoint_bytes

    from .helpers import tiny_config

    estimate = checkpoint_bytes(tiny_config(tp=2))
    assert 0.9 < resume_tp2[0]["written"] / estimate < 1.1, (resume_tp2[0]["written"], estimate)


def test_freezing_is_real(results):
    r = results["freeze"]
    assert r["stage1"] == {"vision_model": False, "projector": True, "language_model": False}
    assert r["stage3"] == {"vision_model": False, "projector": True, "language_model": True}
    assert r["stage1_differs_from_init"]  # so that the next line could fail
    assert r["loaded_pretrained"]  # stage 3 starts from stage 1's checkpoint


def test_non_finite_steps_are_skipped_then_abort(results):
    r = results["nan"]
    assert r["nan_steps"] == 2
    assert [math.isnan(x) for x in r["losses"]] == [False, True, True, False]
    assert "3 steps had a non-finite loss" in r["aborted"]


def test_non_finite_weights_are_never_saved(results):
    r = results["nan"]
    assert r["inf"] and r["inf"].startswith("iteration 1: the weights are not finite"), r["inf"]
    assert "none was saved" in r["inf"]
    assert r["inf_saved"] == (None, []), r["inf_saved"]


def _check_averaging(r):
    assert r["tokens"] == r["expected_tokens"]
    # Same float64 reduction of the same fp32 per-token losses: equal to rounding.
    assert abs(r["loss"] - r["expected"]) < 1e-9, r
    assert abs(r["naive"] - r["expected"]) > 1e-4, r  # the micro-batches' token counts differ
    # The engine's accumulated, all-reduced, token-normalised gradients equal the gradients of the
    # global mean; 1e-6 absorbs fp32 summation-order differences on grads of order 1e-2.
    assert r["grad_diff"] < 1e-6, r


def test_loss_is_averaged_over_tokens_of_all_microbatches(results):
    _check_averaging(results["averaging"])


def test_loss_is_averaged_over_tokens_of_all_dp_ranks(distributed):
    r = distributed(cases.averaging_case, world_size=2, tp=1, args=(1,))
    _check_averaging(r[0])
    assert r[0]["loss"] == r[1]["loss"]
