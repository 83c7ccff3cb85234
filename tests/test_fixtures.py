"""`qmm make-tiny`: real HF layout, loads with transformers' own classes, finite logits."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from qwen_merge_mcore.config.presets import TINY_SPECIAL_TOKENS
from qwen_merge_mcore.fixtures.tiny import tiny_model_config


def test_layout(tiny):
    vlm = tiny["qwen2_5_vl"]
    index = json.loads((vlm / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and all((vlm / s).exists() for s in shards)
    names = set(index["weight_map"])
    assert "visual.blocks.0.attn.qkv.bias" in names and "visual.merger.mlp.2.weight" in names
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    for folder in tiny.values():
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            assert (folder / name).exists(), f"{folder.name}/{name}"
    assert (vlm / "preprocessor_config.json").exists()
    with safe_open(str(tiny["qwen3-tied"] / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    with safe_open(str(tiny["qwen3"] / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys() and "model.layers.0.self_attn.q_norm.weight" in f.keys()
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_structural_features(tiny):
    cfg = json.loads((tiny["qwen2_5_vl"] / "config.json").read_text())
    vision = cfg["vision_config"]
    assert vision["fullatt_block_indexes"] and len(vision["fullatt_block_indexes"]) < vision["depth"]
    assert vision["intermediate_size"] % 16 != 0
    assert cfg["text_config"]["rope_parameters"]["mrope_section"] == [8, 12, 12]
    qwen3 = json.loads((tiny["qwen3"] / "config.json").read_text())
    assert qwen3["num_key_value_heads"] < qwen3["num_attention_heads"]  # GQA
    assert qwen3["vocab_size"] % 128 != 0
    assert qwen3["head_dim"] >= 64  # vLLM's CPU attention refuses smaller heads
    assert json.loads((tiny["qwen3-tied"] / "config.json").read_text())["tie_word_embeddings"] is True


def test_qwen3_loads_with_transformers(tiny):
    from transformers import Qwen3ForCausalLM

    for name in ("qwen3", "qwen3-tied"):
        model = Qwen3ForCausalLM.from_pretrained(tiny[name], dtype=torch.float32)
        logits = model(torch.tensor([[1, 20, 30, 40, 2]])).logits
        assert logits.shape == (1, 5, 1000) and torch.isfinite(logits).all()
    tied = Qwen3ForCausalLM.from_pretrained(tiny["qwen3-tied"])
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()


def test_qwen2_5_vl_loads_with_transformers_and_sees_an_image(tiny):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny["qwen2_5_vl"], dtype=torch.float32)
    ids = tiny_model_config()
    grid = torch.tensor([[1, 4, 6]])  # 4x6 patches -> 6 merged tokens
    pixels = torch.randn(24, 3 * 2 * 14 * 14)
    tok = AutoTokenizer.from_pretrained(tiny["qwen2_5_vl"])
    text = [ids.vision_start_token_id] + [ids.image_token_id] * 6 + [ids.vision_end_token_id]
    input_ids = torch.tensor([tok.encode("Describe:") + text])
    out = model(input_ids=input_ids, pixel_values=pixels, image_grid_thw=grid)
    assert out.logits.shape[-1] == 1000 and torch.isfinite(out.logits).all()


def test_tokenizer_round_trips_special_tokens(tiny):
    from transformers import AutoTokenizer

    for folder in tiny.values():
        tok = AutoTokenizer.from_pretrained(folder)
        for expected_id, token in enumerate(TINY_SPECIAL_TOKENS):
            assert tok.convert_tokens_to_ids(token) == expected_id
            assert tok.encode(token, add_special_tokens=False) == [expected_id]
            assert tok.decode([expected_id]) == token
        text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>"
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    model = tiny_model_config()
    assert TINY_SPECIAL_TOKENS[model.image_token_id] == "<|image_pad|>"


def test_chat_template_renders_thinking_and_images(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["qwen3"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_make_tiny_cli_refuses_to_overwrite(tmp_path):
    out = tmp_path / "t"
    cmd = [sys.executable, "-m", "qwen_merge_mcore", "make-tiny", "--out", str(out)]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert subprocess.run(cmd + ["--overwrite", "--dtype", "float32"]).returncode == 0
    with safe_open(str(out / "qwen3" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.float32
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("seed", [0])
def test_deterministic(tmp_path, seed):
    from qwen_merge_mcore.fixtures import make_tiny

    a = make_tiny(tmp_path / "a", seed=seed)["qwen3"]
    b = make_tiny(tmp_path / "b", seed=seed)["qwen3"]
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
