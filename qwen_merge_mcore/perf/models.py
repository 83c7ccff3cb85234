"""What the planner plans for: a Qwen-Merge preset (ViT + projector + LLM) or, for
calibration against published LLM benchmarks, a text-only Llama-style dense decoder.

The text-only shapes are the published Llama 3 configurations; they reuse `LanguageConfig`
(no q/k norm, untied embeddings, vocabulary 128256) so every FLOP and memory rule is shared.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import LanguageConfig, ModelConfig, config_from_dict

# (layers, hidden, heads, kv heads, ffn) of Meta's Llama 3 / 3.1 releases.
LLAMA3_SHAPES = {
    "llama3-8b": (32, 4096, 32, 8, 14336),
    "llama3-70b": (80, 8192, 64, 8, 28672),
    "llama3.1-405b": (126, 16384, 128, 8, 53248),
}


@dataclass(frozen=True)
class PlanModel:
    name: str
    model: ModelConfig
    text_only: bool  # no ViT/projector: a plain decoder LLM


def llama3(name: str) -> PlanModel:
    layers, hidden, heads, groups, ffn = LLAMA3_SHAPES[name]
    lang = LanguageConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
                          head_dim=hidden // heads, ffn_hidden_size=ffn, vocab_size=128256, tie_word_embeddings=False,
                          qk_layernorm=False, rope_theta=500000.0, max_position_embeddings=131072)
    lang.validate()
    return PlanModel(name=name, model=ModelConfig(preset=name, architecture="qwen3", language=lang), text_only=True)


def plan_model(name: str) -> PlanModel:
    """A Qwen-Merge preset from `config.presets` or one of `LLAMA3_SHAPES`."""
    if name in LLAMA3_SHAPES:
        return llama3(name)
    cfg = config_from_dict({"model": {"preset": name}, "train": {"train_iters": 1}}, check_runtime=False)
    return PlanModel(name=name, model=cfg.model, text_only=not cfg.model.has_vision)


def known_models() -> list[str]:
    from ..config import PRESETS

    return list(PRESETS) + list(LLAMA3_SHAPES)
