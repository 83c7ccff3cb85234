"""Named model shapes. `qwen-merge-72bvit-<size>`: the Qwen2.5-VL-72B ViT and merger joined to a
Qwen3 LLM of that size, with the published shapes. `tiny`: the shapes of `qmm make-tiny`'s fixtures.

A preset is a plain dict in the layout of `ModelConfig`; YAML values given next to
`model.preset` override it.
"""

from __future__ import annotations

import copy

from .errors import ConfigError

# Qwen2.5-VL-72B-Instruct `vision_config`.
VIT_72B = {
    "depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420, "patch_size": 14,
    "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
}

# Qwen3 dense models: (layers, hidden, heads, kv heads, ffn, tied embeddings).
QWEN3_SHAPES = {
    "0.6b": (28, 1024, 16, 8, 3072, True),
    "1.7b": (28, 2048, 16, 8, 6144, True),
    "4b": (36, 2560, 32, 8, 9728, True),
    "8b": (36, 4096, 32, 8, 12288, False),
    "14b": (40, 5120, 40, 8, 17408, False),
    "32b": (64, 5120, 64, 8, 25600, False),
}

# Special tokens of the tiny tokenizer, in id order (the trainer puts them first).
TINY_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<think>", "</think>",
]

TINY = {
    "vision": {
        # head_dim 64 keeps vLLM's CPU attention usable; MLP width 172 is, like 3420, not a
        # multiple of 16; blocks 1 and 3 use full attention, 0 and 2 window attention.
        "depth": 4, "hidden_size": 128, "num_heads": 2, "intermediate_size": 172, "patch_size": 14,
        "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3, "window_size": 112,
        "fullatt_block_indexes": [1, 3], "tokens_per_second": 2,
    },
    "projector": {"merger_out_size": 192},
    "language": {
        # GQA 4:2, head_dim 64 with heads*head_dim != hidden (as in Qwen3-0.6B), and a vocabulary
        # of 1000, which is not a multiple of the 128 padding unit.
        "num_layers": 4, "hidden_size": 128, "num_attention_heads": 4, "num_query_groups": 2,
        "head_dim": 64, "ffn_hidden_size": 256, "vocab_size": 1000, "tie_word_embeddings": False,
        "mrope_section": [8, 12, 12], "max_position_embeddings": 4096,
    },
    "image_token_id": TINY_SPECIAL_TOKENS.index("<|image_pad|>"),
    "video_token_id": TINY_SPECIAL_TOKENS.index("<|video_pad|>"),
    "vision_start_token_id": TINY_SPECIAL_TOKENS.index("<|vision_start|>"),
    "vision_end_token_id": TINY_SPECIAL_TOKENS.index("<|vision_end|>"),
}


def _qwen_merge_72bvit(size: str) -> dict:
    layers, hidden, heads, groups, ffn, tied = QWEN3_SHAPES[size]
    return {
        "vision": dict(VIT_72B),
        "projector": {"merger_out_size": 8192},
        "language": {
            "num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_query_groups": groups, "head_dim": 128, "ffn_hidden_size": ffn, "vocab_size": 151936,
            "tie_word_embeddings": tied, "mrope_section": [16, 24, 24], "max_position_embeddings": 40960,
        },
    }


PRESETS: dict[str, dict] = {"tiny": TINY}
PRESETS.update({f"qwen-merge-72bvit-{size}": _qwen_merge_72bvit(size) for size in QWEN3_SHAPES})


def model_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError("model.preset", f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return {"preset": name, **copy.deepcopy(PRESETS[name])}
