"""hf2mcore / mcore2hf refuse bad input with a message naming the problem and leave no output."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from qwen_merge_mcore.cli import main


@pytest.fixture
def copy_of(tiny, tmp_path):
    def make(name):
        dst = tmp_path / f"src-{name}"
        shutil.copytree(tiny[name], dst)
        return dst
    return make


def _refused(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["hf2mcore", *argv, "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written


def test_truncated_safetensors(copy_of, tmp_path, capsys):
    src = copy_of("qwen3")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:-1000])
    _refused(tmp_path, capsys, ["--hf", str(src)], "model.safetensors: truncated safetensors file")


def test_tp_must_divide_kv_heads(tiny, tmp_path, capsys):
    _refused(tmp_path, capsys, ["--hf", str(tiny["qwen3"]), "--tp", "4"],
             "4 does not divide model.language.num_query_groups=2 (KV heads)")
    _refused(tmp_path, capsys, ["--hf", str(tiny["qwen2_5_vl"]), "--tp", "2"],
             "2 does not divide model.language.num_attention_heads=3")


def test_leftover_and_missing_tensors(copy_of, tmp_path, capsys):
    src = copy_of("qwen3")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.extra.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, src / "model.safetensors")
    _refused(tmp_path, capsys, ["--hf", str(src)],
             "1 tensors the config requires are missing: model.layers.1.mlp.up_proj.weight; "
             "1 tensors would be left over (not in the qwen3 mapping): model.layers.0.extra.weight")


def test_existing_output_needs_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metadata.json").write_text("{}")
    assert main(["hf2mcore", "--hf", str(tiny["qwen3"]), "--out", str(out)]) == 1
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "metadata.json").read_text() == "{}"


def test_config_weights_shape_mismatch(copy_of, tmp_path, capsys):
    """Found by the ranks against the shapes Megatron builds (a real spawned conversion)."""
    src = copy_of("qwen3")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 320
    (src / "config.json").write_text(json.dumps(cfg))
    _refused(tmp_path, capsys, ["--hf", str(src)],
             "config/weights shape mismatch for language_model.decoder.layers.0.mlp.linear_fc1.weight: the config "
             "implies [640, 128], the HF tensors give [512, 128]")


def test_mcore2hf_refuses_a_non_checkpoint(tiny, tmp_path, capsys):
    assert main(["mcore2hf", "--mcore", str(tiny["qwen3"]), "--out", str(tmp_path / "o")]) == 1
    assert "is neither a torch_dist checkpoint (no metadata.json), a run folder" in capsys.readouterr().err
