"""Every `qmm` subcommand has --help with an example."""

import importlib
import subprocess
import sys

import pytest

from qwen_merge_mcore.cli import COMMAND_MODULES


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_subcommand_help_has_example(module):
    name = importlib.import_module(f"qwen_merge_mcore.commands.{module}").NAME
    out = subprocess.run([sys.executable, "-m", "qwen_merge_mcore", name, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "example:" in out.stdout and f"qmm {name}" in out.stdout


def test_top_level_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "qwen_merge_mcore", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "make-tiny" in out.stdout


def test_config_command_reports_bad_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny}\ntrain: {train_iters: 1, lr_warmup: 0.1}\n")
    out = subprocess.run([sys.executable, "-m", "qwen_merge_mcore", "config", str(path)], capture_output=True, text=True)
    assert out.returncode == 1 and "train.lr_warmup" in out.stderr


def test_overrides_may_follow_options(tmp_path, capsys):
    from qwen_merge_mcore.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny}\ntrain: {train_iters: 1}\n")
    assert main(["config", str(path), "--no-runtime-check", "train.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["config", str(path), "--no-runtime-check", "--bogus"])


def test_help_examples_fit_the_72b_vit_presets():
    """The ViT's MLP width 3420 allows TP 1, 2 or 4: no example may show a layout the presets refuse."""
    import re

    from qwen_merge_mcore.commands import config_cmd, hf2mcore
    from qwen_merge_mcore.config import load_config

    for example in config_cmd.EXAMPLES:
        args = example.split()[2:]
        load_config(args[0], [a for a in args[1:] if "=" in a], check_runtime=False)
    text = hf2mcore.HELP + " ".join(hf2mcore.EXAMPLES)
    for tp in re.findall(r"--tp (\d+)", text):
        load_config(None, ["model.preset=qwen-merge-72bvit-8b", f"parallel.tensor_model_parallel_size={tp}",
                           "train.train_iters=1"], check_runtime=False)


def test_data_docs_and_examples_write_where_the_stage_configs_read():
    import re
    from pathlib import Path

    import yaml

    from qwen_merge_mcore.commands import data

    repo = Path(__file__).resolve().parents[1]
    read = {ds["path"] for f in (repo / "launch").glob("stage*.yaml")
            for ds in yaml.safe_load(f.read_text())["data"]["datasets"]}
    commands = [line for line in (repo / "docs" / "data.md").read_text().splitlines()
                if re.match(r"qmm data (convert|render)", line)] + [e for e in data.EXAMPLES if "--out" in e]
    assert len(commands) >= 6
    for line in commands:
        out = re.search(r"--out (\S+)", line).group(1)
        assert out in read, f"{line!r} writes {out}, which no launch/stage*.yaml reads ({sorted(read)})"


def test_optional_packages_a_config_turns_on_are_checked_at_load(tmp_path, monkeypatch, capsys):
    import ast
    from pathlib import Path

    from qwen_merge_mcore.cli import main
    from qwen_merge_mcore.config import ConfigError, load_config
    from qwen_merge_mcore.config.loader import OPTIONAL_PACKAGES

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as where it is not installed
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny}\ntrain: {train_iters: 1}\nlogging: {tensorboard_dir: tb}\n")
    with pytest.raises(ConfigError, match=r"logging.tensorboard_dir.*pip install tensorboard"):
        load_config(path)
    assert main(["config", str(path), "--no-runtime-check"]) == 0
    assert "note: logging.tensorboard_dir needs the tensorboard package" in capsys.readouterr().err
    # The cluster extra installs what the shipped configs turn on.
    repo = Path(__file__).resolve().parents[1]
    setup = ast.parse((repo / "setup.py").read_text())
    extras = next(ast.literal_eval(k.value) for node in ast.walk(setup) if isinstance(node, ast.Call)
                  for k in node.keywords if k.arg == "extras_require")
    for config in sorted((repo / "launch").glob("stage*.yaml")):
        cfg = load_config(config, check_runtime=False)
        for key, module, requirement in OPTIONAL_PACKAGES:
            section, name = key.split(".")
            if getattr(getattr(cfg, section), name):
                assert any(r.startswith(requirement) for r in extras["gpu"]), (config.name, key)


def _train_config(tmp_path, tiny, datasets, tp=1):
    path = tmp_path / "train.yaml"
    path.write_text(f"model: {{preset: tiny, backend: local}}\nparallel: {{tensor_model_parallel_size: {tp}}}\n"
                    f"train: {{train_iters: 1, global_batch_samples: 1}}\n"
                    f"data: {{tokenizer: {tiny['qwen3']}, datasets: {datasets}}}\n")
    return str(path)


def test_train_says_how_to_launch_and_checks_data_before_building(tiny, tmp_path, monkeypatch, capsys):
    from qwen_merge_mcore import distributed
    from qwen_merge_mcore.cli import main

    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)

    def no_model(*args, **kwargs):
        raise AssertionError("the process group and the model came before the data check")

    monkeypatch.setattr(distributed, "initialize", no_model)
    assert main(["train", "--config", _train_config(tmp_path, tiny, "[{path: x.jsonl}]", tp=2)]) == 1
    assert "qwen_merge_mcore.torchrun --nproc-per-node 2 -m qwen_merge_mcore train" in capsys.readouterr().err
    missing = tmp_path / "missing.jsonl"
    assert main(["train", "--config", _train_config(tmp_path, tiny, f"[{{path: {missing}}}]")]) == 1
    err = capsys.readouterr().err
    assert "data.datasets[0].path" in err and str(missing) in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["train", "--config", _train_config(tmp_path, tiny, f"[{{path: {empty}}}]")]) == 1
    assert f"{empty} holds no rows" in capsys.readouterr().err
    assert main(["train", "--config", _train_config(tmp_path, tiny, "[]")]) == 1
    assert "data.datasets': is empty" in capsys.readouterr().err


def test_a_single_process_run_does_not_need_port_29500(tmp_path):
    import os
    import socket

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "SLURM_PROCID")}
    script = ("from qwen_merge_mcore import distributed\nfrom qwen_merge_mcore.config import ParallelConfig\n"
              "distributed.initialize(ParallelConfig(), timeout_minutes=1)\nprint('ok')\ndistributed.destroy()\n")
    with socket.socket() as other_run:  # another single-process run holds the default port
        other_run.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            other_run.bind(("127.0.0.1", 29500))
            other_run.listen()
        except OSError:
            pass  # something else holds it already: the same situation
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


QUIET = """
import multiprocessing as mp

def child():
    import megatron.core.optimizer, megatron.core.models.backends  # noqa: F401

if __name__ == "__main__":
    from qwen_merge_mcore.utils import quiet
    quiet.install()
    import megatron.core.optimizer, megatron.core.models.backends  # noqa: F401
    p = mp.get_context("spawn").Process(target=child)
    p.start()
    p.join()
"""


def test_known_third_party_warnings_become_one_line(tmp_path):
    import importlib.util
    import os

    if importlib.util.find_spec("transformer_engine") and importlib.util.find_spec("apex"):
        pytest.skip("Transformer Engine and Apex are installed: nothing is missing")
    script = tmp_path / "quiet.py"
    script.write_text(QUIET)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "RANK", "SLURM_PROCID")}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr
    notes = [line for line in done.stderr.splitlines() if line.startswith("qmm: note:")]
    assert len(notes) == 1 and "not installed" in notes[0] and "torch optimizers" in notes[0], done.stderr


def test_training_stops_are_one_line():
    """A run stopped for non-finite weights or losses reads as one line, not a traceback."""
    from qwen_merge_mcore import cli
    from qwen_merge_mcore.training.errors import NonFiniteError

    assert cli.is_user_error(NonFiniteError("iteration 1: the weights are not finite"))
