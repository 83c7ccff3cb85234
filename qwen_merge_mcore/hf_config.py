"""Hugging Face `config.json` contents for the model parts, built from our typed configs."""

from __future__ import annotations

from .config import LanguageConfig, VisionConfig


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
