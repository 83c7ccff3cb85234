"""`qmm compare`: transformers and the converted Megatron checkpoint agree on a text and an image prompt."""

from __future__ import annotations

import json


from qwen_merge_mcore.cli import main

# fp32 on both sides, same weights: only summation order differs (SDPA vs eager attention, fused
# vs separate projections), which stays around 1e-6 here; 1e-4 is the acceptance bound.
TOL = 1e-4


def _compare(capsys, hf, mcore, tp):
    assert main(["compare", "--hf", str(hf), "--mcore", str(mcore), "--tp", str(tp), "--max-abs-diff", str(TOL)]) == 0
    return json.loads(capsys.readouterr().out)


def test_compare_qwen2_5_vl_text_and_image(tiny, converted, capsys):
    """Written at TP=1/PP=2, loaded at TP=1 for the forward pass."""
    report = _compare(capsys, tiny["qwen2_5_vl"], converted["ckpts"][("qwen2_5_vl", (1, 2, None, None))], 1)
    for prompt in ("text", "image"):
        assert report[prompt]["max_abs_diff"] <= TOL and report[prompt]["top5_agreement"] == 1.0, report


def test_compare_qwen3_tp2_from_pp2_checkpoint(tiny, converted, capsys):
    """Written at TP=2/PP=2, resharded by Megatron to TP=2/PP=1 for the forward pass."""
    report = _compare(capsys, tiny["qwen3"], converted["ckpts"][("qwen3", (2, 2, None, None))], 2)
    assert set(report) >= {"text"} and "image" not in report
    assert report["text"]["max_abs_diff"] <= TOL and report["text"]["top5_agreement"] == 1.0, report


def test_compare_qwen_merge(converted, capsys):
    report = _compare(capsys, converted["sources"]["merge"], converted["ckpts"][("merge", (2, 1, None, None))], 2)
    for prompt in ("text", "image"):
        assert report[prompt]["max_abs_diff"] <= TOL and report[prompt]["top5_agreement"] == 1.0, report
