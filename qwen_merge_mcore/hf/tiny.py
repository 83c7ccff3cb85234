"""A tiny exported Qwen-Merge folder built from the `make_tiny` fixtures, for tests of the HF and
vLLM integrations (the `qmm build` converter streams; this loads the tiny parts in memory)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..fixtures.tiny import PREPROCESSOR, tiny_model_config
from ..templates import chat_template
from ..utils.atomic import atomic_output_dir
from .remote import write_remote_code

_DROP = ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype")


def make_tiny_qwen_merge(out: str | Path, tiny_paths: dict, tied: bool = False, dtype: str = "bfloat16",
                         seed: int = 0, overwrite: bool = False) -> Path:
    """Write an exported Qwen-Merge folder: `visual.*` from the tiny Qwen2.5-VL, `model.*` and
    `lm_head.weight` from the tiny Qwen3 (`qwen3-tied` when `tied`), the new projector layer
    `visual.merger.mlp.4` drawn from N(0, 0.02) with bias 0, plus tokenizer, chat template,
    processor configs and the remote code."""
    from safetensors.torch import load_file

    from .remote_code.configuration_qwen2_5_vl_merge import Qwen2_5_VL_MergeConfig
    from .remote_code.modeling_qwen2_5_vl_merge import Qwen2_5_VL_MergeForConditionalGeneration

    vlm_dir, lang_dir = Path(tiny_paths["qwen2_5_vl"]), Path(tiny_paths["qwen3-tied" if tied else "qwen3"])
    preset = tiny_model_config()
    text = {k: v for k, v in json.loads((lang_dir / "config.json").read_text()).items() if k not in _DROP}
    text["rope_parameters"]["mrope_section"] = list(preset.language.mrope_section)
    vlm = json.loads((vlm_dir / "config.json").read_text())
    vision = {k: v for k, v in vlm["vision_config"].items() if k not in _DROP}
    vision["out_hidden_size2"] = text["hidden_size"]
    config = Qwen2_5_VL_MergeConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
        architectures=["Qwen2_5_VL_MergeForConditionalGeneration"],
        bos_token_id=text.get("bos_token_id"), eos_token_id=text.get("eos_token_id"),
        **{name: vlm[name] for name in ("image_token_id", "video_token_id", "vision_start_token_id",
                                        "vision_end_token_id")})

    state = {}
    for shard in sorted(vlm_dir.glob("*.safetensors")):
        state.update({k: v for k, v in load_file(shard).items() if k.startswith("visual.")})
    for shard in sorted(lang_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    generator = torch.Generator().manual_seed(seed)
    hidden, width = config.vision_config.out_hidden_size2, config.vision_config.out_hidden_size
    state["visual.merger.mlp.4.weight"] = torch.randn(hidden, width, generator=generator) * 0.02
    state["visual.merger.mlp.4.bias"] = torch.zeros(hidden)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]

    model = Qwen2_5_VL_MergeForConditionalGeneration(config)
    model.load_state_dict(state, strict=True)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model.to(getattr(torch, dtype)).save_pretrained(tmp)  # HF names are torch attribute names
        save_processor(tmp, lang_dir)
        write_remote_code(tmp)
    return Path(out)


def save_processor(folder: str | Path, tokenizer_dir: str | Path, min_pixels: int = PREPROCESSOR["min_pixels"],
                   max_pixels: int = PREPROCESSOR["max_pixels"]) -> None:
    """Save the processor parts: Qwen2.5-VL image processor config, the Qwen3 tokenizer and the
    `qwen3_vl` chat template. `write_remote_code` adds processor_config.json, after which
    `AutoProcessor.from_pretrained(folder)` loads `Qwen2_5_VL_MergeProcessor`."""
    from transformers import AutoTokenizer

    from ..fixtures.tiny import write_preprocessor_config

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = chat_template("qwen3_vl")
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(chat_template("qwen3_vl"))
    write_preprocessor_config(folder, min_pixels=min_pixels, max_pixels=max_pixels)
