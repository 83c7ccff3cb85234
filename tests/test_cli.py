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
