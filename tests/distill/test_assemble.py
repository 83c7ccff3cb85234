"""`qmm distill assemble`: text questions rendered and joined with their teacher answers,
multimodal rows with their images; `qmm data check` passes on the written data section, and a
tiny stage-3 run trains on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_assembled_stage3_mix_checks_and_trains(offline, tiny, tmp_path, capsys):
    from qwen_merge_mcore.cli import main
    from qwen_merge_mcore.distill.assemble import MULTIMODAL, TEXT
    from qwen_merge_mcore.distill.store import read_rows

    gen, _ = offline
    out = tmp_path / "data"
    assert main(["distill", "assemble", "--input", str(gen), "--out", str(out)]) == 0
    generated = read_rows(gen)
    text, multimodal = _lines(out / TEXT / "data.jsonl"), _lines(out / MULTIMODAL / "data.jsonl")
    assert len(text) == sum(not r["images"] for r in generated) and len(multimodal) == len(generated) - len(text)
    for row in text:  # the question drawn as pages, the teacher's answer and reasoning kept
        user, bot = row["messages"]
        assert user["content"].startswith("<image>" * len(row["images"])) and row["images"]
        assert user["content"].endswith(" /no_think") == (row["mode"] == "nothink")
        assert bot["content"] == row["answer"] and bot["reasoning_content"] == row["reasoning"]
        assert all((out / TEXT / name).is_file() for name in row["images"])
    for row in multimodal:  # the same image bytes as the generated rows hold
        assert row["images"] and all((out / MULTIMODAL / n).read_bytes() == (gen / n).read_bytes()
                                     for n in row["images"])
    section = yaml.safe_load((out / "stage3-data.yaml").read_text())["data"]
    assert [d["path"] for d in section["datasets"]] == [str(out / TEXT), str(out / MULTIMODAL)]
    assert {d["epochs"] for d in section["datasets"]} == {1.2}

    config = yaml.safe_load((REPO / "launch/tiny/stage3.yaml").read_text())
    config["parallel"]["tensor_model_parallel_size"] = 1
    config["train"].update(train_iters=2, global_batch_samples=2, engine="cpu")
    config["data"].update(section, tokenizer=str(tiny["qwen3"]), seq_length=512)
    config["checkpoint"] = {"save": str(tmp_path / "run"), "save_interval": 2}
    config["logging"] = {"log_interval": 1, "summary_json": str(tmp_path / "run" / "summary.json"),
                         "progress_bar": False}
    (tmp_path / "stage3.yaml").write_text(yaml.safe_dump(config))
    assert main(["data", "check", str(tmp_path / "stage3.yaml"), "--samples", "50"]) == 0
    report = capsys.readouterr().out
    assert "bad: 0" in report, report
    run = subprocess.run([sys.executable, "-m", "qwen_merge_mcore", "train", "--config", str(tmp_path / "stage3.yaml")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["last_iteration"] == 2 and summary["stage"] == "stage3" and summary["nan_steps"] == 0, summary
