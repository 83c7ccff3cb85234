"""`qmm build`: the Qwen-Merge HF checkpoint from a Qwen2.5-VL and a Qwen3, and its refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qwen_merge_mcore.checkpoint.build import build_qwen_merge
from qwen_merge_mcore.checkpoint.safetensors_io import CheckpointError, SafetensorsFolder
from qwen_merge_mcore.cli import main


@pytest.fixture(scope="module")
def merged(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "merge"
    assert main(["build", "--vlm", str(tiny["qwen2_5_vl"]), "--llm", str(tiny["qwen3"]), "--out", str(out),
                 "--max-shard-size", "1MB"]) == 0
    return out


def test_weights_come_from_their_parts(tiny, merged):
    out, vlm, llm = SafetensorsFolder(merged), SafetensorsFolder(tiny["qwen2_5_vl"]), SafetensorsFolder(tiny["qwen3"])
    visual = [n for n in vlm.names() if n.startswith("visual.")]
    assert sorted(out.names()) == sorted(visual + llm.names() + ["visual.merger.mlp.4.weight",
                                                                  "visual.merger.mlp.4.bias"])
    for n in visual:
        assert torch.equal(out.get(n), vlm.get(n)), n
    for n in llm.names():  # the LLM's, not the VLM's language model of the same name
        assert torch.equal(out.get(n), llm.get(n)), n
    assert len(json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"]) == len(out.names())


def test_new_projector_layer_init(merged):
    out = SafetensorsFolder(merged)
    w, b = out.get("visual.merger.mlp.4.weight").float(), out.get("visual.merger.mlp.4.bias")
    assert w.shape == (128, 192) and not b.any()
    # 24576 samples of N(0, 0.02): the sample std is within 2% of 0.02 (about 4 standard errors).
    assert abs(w.std().item() - 0.02) < 0.0004 and abs(w.mean().item()) < 0.0005


def test_config_and_side_files(tiny, merged):
    cfg = json.loads((merged / "config.json").read_text())
    vlm = json.loads((tiny["qwen2_5_vl"] / "config.json").read_text())
    llm = json.loads((tiny["qwen3"] / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl_merge"
    assert cfg["architectures"] == ["Qwen2_5_VL_MergeForConditionalGeneration"]
    assert cfg["text_config"]["hidden_size"] == llm["hidden_size"] == cfg["vision_config"]["out_hidden_size2"]
    assert cfg["text_config"]["rope_parameters"]["mrope_section"] == vlm["text_config"]["rope_parameters"]["mrope_section"]
    assert cfg["vision_config"]["out_hidden_size"] == vlm["vision_config"]["out_hidden_size"]
    assert all(cfg[k] == vlm[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id"))
    from qwen_merge_mcore.templates import chat_template

    assert (merged / "chat_template.jinja").read_text() == chat_template("qwen3_vl")
    assert (merged / "tokenizer.json").read_bytes() == (tiny["qwen3"] / "tokenizer.json").read_bytes()
    assert (merged / "preprocessor_config.json").exists() and (merged / "generation_config.json").exists()


def test_seeded(tiny, merged, tmp_path):
    again = build_qwen_merge(tiny["qwen2_5_vl"], tiny["qwen3"], tmp_path / "again", progress=False,
                             max_shard_bytes=10**6).out
    name = "visual.merger.mlp.4.weight"
    assert torch.equal(SafetensorsFolder(again).get(name), SafetensorsFolder(merged).get(name))


def test_refusals(tiny, merged, tmp_path, capsys):
    def fails(vlm, llm, match, out=None):
        with pytest.raises((CheckpointError, FileExistsError), match=match):
            build_qwen_merge(vlm, llm, out or tmp_path / "o", progress=False)
        assert not (tmp_path / "o").exists()  # nothing half-written
        assert not list(tmp_path.glob(".o.tmp-*"))

    fails(tiny["qwen3"], tiny["qwen3"], "--vlm must be a Qwen2.5-VL")
    fails(tiny["qwen2_5_vl"], tiny["qwen2_5_vl"], "--llm must be a Qwen3")
    fails(tiny["qwen2_5_vl"], tiny["qwen3"], "already exists", out=merged)
    broken = tmp_path / "vlm"
    shutil.copytree(tiny["qwen2_5_vl"], broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    fails(broken, tiny["qwen3"], f"{shard.name}: truncated")
    shard.unlink()
    fails(broken, tiny["qwen3"], f"missing shard.*{shard.name}")
    # A head_dim the VLM's MRoPE sections do not cover.
    llm = tmp_path / "llm"
    shutil.copytree(tiny["qwen3"], llm)
    cfg = json.loads((llm / "config.json").read_text())
    cfg["head_dim"] = 32
    (llm / "config.json").write_text(json.dumps(cfg))
    fails(tiny["qwen2_5_vl"], llm, r"mrope_section \[8, 12, 12\] covers 64 rotary dims.*head_dim is 32")
    # Config/weights disagreement.
    cfg["head_dim"], cfg["intermediate_size"] = 64, 300
    (llm / "config.json").write_text(json.dumps(cfg))
    fails(tiny["qwen2_5_vl"], llm, r"config/weights shape mismatch: model.layers.0.mlp.gate_proj.weight: file \(256, 128\), "
                                   r"config implies \(300, 128\)")
    assert main(["build", "--vlm", str(tiny["qwen3"]), "--llm", str(tiny["qwen3"]), "--out", str(tmp_path / "o")]) == 1
    assert "Qwen2.5-VL" in capsys.readouterr().err
