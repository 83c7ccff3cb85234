"""Hugging Face `config.json` contents, both ways: built from our typed configs (for fixtures and
exports), and read into them (`model_config_from_hf`). The one place that knows the layouts of
HF config dicts (nested `text_config` or flat, `rope_parameters` or `rope_scaling`, `dtype` or
`torch_dtype`)."""

from __future__ import annotations

from .config import LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig


def qwen3_config_dict(lang: LanguageConfig, eos_token_id: int, bos_token_id: int | None = None) -> dict:
    """A `Qwen3ForCausalLM` config with the shapes of `lang`."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": lang.vocab_size,
        "hidden_size": lang.hidden_size,
        "intermediate_size": lang.ffn_hidden_size,
        "num_hidden_layers": lang.num_layers,
        "num_attention_heads": lang.num_attention_heads,
        "num_key_value_heads": lang.num_query_groups,
        "head_dim": lang.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": lang.max_position_embeddings,
        "rms_norm_eps": lang.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": lang.rope_theta},
        "attention_bias": False,
        "tie_word_embeddings": lang.tie_word_embeddings,
        "bos_token_id": bos_token_id if bos_token_id is not None else eos_token_id,
        "eos_token_id": eos_token_id,
        "dtype": "bfloat16",
    }


def qwen2_5_vl_vision_dict(vision: VisionConfig, out_hidden_size: int) -> dict:
    return {
        "model_type": "qwen2_5_vl",
        "depth": vision.depth,
        "hidden_size": vision.hidden_size,
        "hidden_act": "silu",
        "intermediate_size": vision.intermediate_size,
        "num_heads": vision.num_heads,
        "in_channels": vision.in_channels,
        "patch_size": vision.patch_size,
        "spatial_merge_size": vision.spatial_merge_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "tokens_per_second": vision.tokens_per_second,
        "window_size": vision.window_size,
        "out_hidden_size": out_hidden_size,
        "fullatt_block_indexes": list(vision.fullatt_block_indexes),
    }


def text_section(hf: dict) -> dict:
    """The language model's fields: `text_config` (transformers 5, Qwen-Merge), else the top level
    (Qwen3, hub configs of Qwen2.5-VL)."""
    return hf.get("text_config") or hf


def rope_section(cfg: dict) -> dict:
    """A copy of the rotary settings: `rope_parameters` (transformers 5) or `rope_scaling`."""
    return dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})


def head_dim(text: dict) -> int:
    return text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]


def hf_dtype_name(hf: dict) -> str:
    """The weights' dtype a config names (`dtype`, formerly `torch_dtype`), bfloat16 if none."""
    return hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"


SUPPORTED_MODEL_TYPES = {"qwen2_5_vl_merge": "qwen_merge", "qwen3": "qwen3", "qwen2_5_vl": "qwen2_5_vl"}


def model_config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig from a Hugging Face config.json dict (Qwen-Merge, Qwen3 or Qwen2.5-VL).

    Reads both layouts transformers has used: text fields at the top level with
    `rope_scaling.mrope_section` (hub checkpoints of Qwen2.5-VL) or under `text_config` with
    `rope_parameters` (transformers 5).
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; expected one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    architecture = SUPPORTED_MODEL_TYPES[model_type]
    text = text_section(hf)
    rope = rope_section(text)
    heads = text["num_attention_heads"]
    lang = LanguageConfig(
        num_layers=text["num_hidden_layers"], hidden_size=text["hidden_size"], num_attention_heads=heads,
        num_query_groups=text.get("num_key_value_heads", heads),
        head_dim=head_dim(text),
        ffn_hidden_size=text["intermediate_size"], vocab_size=text["vocab_size"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        qk_layernorm=architecture != "qwen2_5_vl", add_qkv_bias=architecture == "qwen2_5_vl",
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))),
        max_position_embeddings=text.get("max_position_embeddings", 40960),
    )
    lang.mrope_section = list(rope.get("mrope_section") or _default_mrope_section(lang.head_dim))
    model = ModelConfig(architecture=architecture, language=lang)
    if architecture == "qwen3":
        return model
    v = hf["vision_config"]
    model.vision = VisionConfig(
        depth=v["depth"], hidden_size=v["hidden_size"], num_heads=v["num_heads"],
        intermediate_size=v["intermediate_size"], patch_size=v.get("patch_size", 14),
        temporal_patch_size=v.get("temporal_patch_size", 2), spatial_merge_size=v.get("spatial_merge_size", 2),
        in_channels=v.get("in_channels", v.get("in_chans", 3)), window_size=v.get("window_size", 112),
        fullatt_block_indexes=list(v.get("fullatt_block_indexes", [])),
        tokens_per_second=v.get("tokens_per_second", 2),
    )
    model.projector = ProjectorConfig(merger_out_size=v["out_hidden_size"], extra_layer=architecture == "qwen_merge")
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if name in hf:
            setattr(model, name, hf[name])
    return model


def _default_mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's [16, 24, 24] for head_dim 128, scaled to other head sizes (t gets 1/4)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]
