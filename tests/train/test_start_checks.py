"""What `qmm train` checks before it builds the model: `checkpoint.save` is writable and has
room for one checkpoint (otherwise a run trains until its first save and loses the work)."""

from __future__ import annotations

import pytest

from qwen_merge_mcore.fixtures.tiny_data import make_tiny_data

from ..test_outputs import tmpfs  # noqa: F401  (the size-limited tmpfs fixture)


class ChecksPassed(Exception):
    pass


@pytest.fixture
def train(tiny, tmp_path, monkeypatch, capsys):
    """train(save) -> (exit code, stderr) of `qmm train` with checkpoint.save=save; the process
    group is never started (reaching it means every start check passed)."""
    from qwen_merge_mcore import distributed
    from qwen_merge_mcore.cli import main

    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)

    def reached(*args, **kwargs):
        raise ChecksPassed

    monkeypatch.setattr(distributed, "initialize", reached)
    data = make_tiny_data(tmp_path / "data", samples=2)
    config = tmp_path / "train.yaml"
    config.write_text("model: {preset: tiny, backend: local}\nprecision: {params_dtype: fp32}\n"
                      "train: {train_iters: 1, global_batch_samples: 2, engine: cpu}\n"
                      f"data: {{tokenizer: {tiny['qwen3']}, datasets: [{{path: {data['captions']}}}]}}\n")

    def run(save, *overrides):
        try:
            code = main(["train", "--config", str(config), f"checkpoint.save={save}", *overrides])
        except ChecksPassed:
            code = None
        return code, capsys.readouterr().err

    return run


def test_save_folder_not_writable_or_too_small_is_refused_at_start(train, tmpfs, tmp_path):  # noqa: F811
    readonly = tmpfs("ro", "size=1m,ro")
    code, err = train(readonly / "run")
    assert code == 1 and "checkpoint.save" in err and str(readonly / "run") in err, err
    assert "Read-only file system" in err and "Traceback" not in err, err

    small = tmpfs("small", "size=1m")  # one tiny checkpoint in fp32 with Adam state: ~19 MiB
    code, err = train(small / "run")
    assert code == 1 and f"{small / 'run'} has 1.0 MiB free" in err and "one checkpoint" in err, err
    assert list((small / "run").iterdir()) == []  # the write probe left nothing behind

    code, err = train(tmp_path / "runs" / "ok")
    assert code is None, err


def test_missing_pretrained_is_named_before_the_tokenizer_is_looked_up_in_it(train, tmp_path):
    # Without data.tokenizer the tokenizer comes from the pretrained checkpoint's hf_meta/: a
    # missing checkpoint must be reported as itself, not as "no tokenizer".
    missing = tmp_path / "no_such_run"
    code, err = train(tmp_path / "run", f"checkpoint.pretrained={missing}", "data.tokenizer=null")
    assert code == 1 and "checkpoint.pretrained" in err and str(missing) in err and "does not exist" in err, err
    assert "tokenizer" not in err and "Traceback" not in err, err
