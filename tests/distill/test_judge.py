"""`qmm distill judge`: rule verdicts on hand-made cases, the model judge's prompt token for
token against its chat template with thinking off, verdicts by row key, --keep, R1 score."""

from __future__ import annotations

import json
import logging

import pytest


@pytest.mark.parametrize("answer, reference, verdict", [
    ("so the result is \\boxed{\\frac{1}{2}}", "1/2", True),
    ("The total is \\boxed{1,200}.", "1200", True),
    ("\\boxed{12}", "\\boxed{13}", False),
    ("Adding them up gives 42", "42", True),
    ("Adding them up gives 41", "42", False),
    ("x = 5.0", "5", True),
    ("The answer is (B).", "B", True),
    ("The answer is C", "(B)", False),
    ("\\boxed{D}", "D.", True),
    ("After thinking it over:\nParis.", "paris", True),
    ("\\boxed{Lyon}", "Paris", False),
    ("It depends on many things", "7", None),  # no number to compare: the model judge decides
    ("Rome", "Paris", None),  # short but unboxed and different: not a clear mismatch
    ("anything", "A reference answer far longer than a short exact answer", None),
])
def test_rule_verdicts(answer, reference, verdict):
    from qwen_merge_mcore.distill.rules import rule_verdict

    got = rule_verdict(answer, reference)
    assert (got if got is None else got[0]) == verdict, got


def _write(folder, rows):
    folder.mkdir(parents=True)
    (folder / "data-s0000of0001-000000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _row(qid, answer, reference, mode="think", **kw):
    return {"id": qid, "mode": mode, "question": f"question {qid}", "answer": answer, "reference": reference,
            "images": [], "teacher": "tiny", **kw}


def test_rules_only_judging_keeps_passing_rows_and_honours_the_score(tmp_path):
    from qwen_merge_mcore.distill.judge import judge

    rows = [_row("a", "\\boxed{4}", "4"), _row("a", "5", "4", mode="nothink"), _row("b", "B", "B", score=5),
            _row("c", "x", None), _row("d", "The answer is A", "A", score=9)]
    _write(tmp_path / "gen", rows)
    counts = judge(tmp_path / "gen", tmp_path / "judged", None, keep="pass")
    assert counts == {"pass": 2, "fail": 1, "unverified": 2}
    kept = [json.loads(x) for x in (tmp_path / "judged" / "data-00000.jsonl").read_text().splitlines()]
    assert [(r["id"], r["mode"]) for r in kept] == [("a", "think"), ("d", "think")]
    rejected = {(r["id"], r["mode"]): r for r in map(json.loads, (tmp_path / "judged" / "rejected" / "data.jsonl")
                                                     .read_text().splitlines())}
    assert rejected[("b", "think")]["judge_reason"] == "the reference's score 5 is below --min-score 8.0"
    assert rejected[("a", "nothink")]["verdict"] == "fail" and rejected[("c", "think")]["verdict"] == "unverified"
    with pytest.raises(ValueError, match="need a judge model"):
        _write(tmp_path / "open", [_row("e", "Rome", "Paris")])
        judge(tmp_path / "open", tmp_path / "open-judged")


def test_model_judge_prompt_is_the_chat_template_with_thinking_off(engine, offline, teacher, tmp_path, caplog):
    from transformers import AutoTokenizer

    from qwen_merge_mcore.distill.judge import judge, judge_messages, row_key
    from qwen_merge_mcore.distill.store import read_rows

    out, _ = offline
    with caplog.at_level(logging.WARNING, logger="qwen_merge_mcore"):
        judge(out, tmp_path / "judged", lambda: engine, record_prompt_ids=True, max_tokens=8)
    assert "is the model that generated these rows" in caplog.text
    rows = [json.loads(x) for x in (tmp_path / "judged" / "data-00000.jsonl").read_text().splitlines()]
    assert sorted(map(row_key, rows)) == sorted(map(row_key, read_rows(out)))  # every row, matched by key
    tok = AutoTokenizer.from_pretrained(teacher)
    by_model = [r for r in rows if r["judged_by"] == teacher.name]
    assert by_model, "no row needed the model judge"
    for row in by_model:
        want = tok.apply_chat_template(judge_messages(row), add_generation_prompt=True, enable_thinking=False,
                                       tokenize=True, return_dict=False)
        assert row["judge_prompt_token_ids"] == list(want)
        assert tok.decode(want).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert row["verdict"] in ("pass", "fail", "unverified") and row["judge_reason"]
