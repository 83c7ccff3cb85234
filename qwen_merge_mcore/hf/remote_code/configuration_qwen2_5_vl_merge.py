# Qwen-Merge (Qwen2.5-VL vision tower + projector with an extra layer + Qwen3 decoder) for
# Hugging Face transformers. This file is self-contained (it imports only transformers), because
# it is copied next to every exported checkpoint as remote code (`auto_map` in config.json), and
# the qwen_merge_mcore package registers these very classes with the Auto classes.
"""Configuration of Qwen-Merge checkpoints (`model_type: qwen2_5_vl_merge`)."""

from __future__ import annotations

from transformers import PreTrainedConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config

MODEL_TYPE = "qwen2_5_vl_merge"


class Qwen2_5_VL_MergeVisionConfig(Qwen2_5_VLVisionConfig):
    """Qwen2.5-VL vision fields; `out_hidden_size` is the merger's `mlp.2` output (the source VLM's
    LLM width) and `out_hidden_size2` the output of the new `mlp.4`, the Qwen3 hidden size."""

    model_type = "qwen2_5_vl_merge_vision"
    base_config_key = "vision_config"

    out_hidden_size2: int = 4096


class Qwen2_5_VL_MergeTextConfig(Qwen3Config):
    """Qwen3 fields; `rope_parameters.mrope_section` splits head_dim/2 rotary frequencies over
    (t, h, w). Text-only input has equal t/h/w ids, so it rotates exactly like Qwen3."""

    model_type = "qwen2_5_vl_merge_text"
    base_config_key = "text_config"
    ignore_keys_at_rope_validation = {"mrope_section"}

    def __post_init__(self, **kwargs):
        if self.rope_parameters is None and not {"rope_scaling", "rope_theta"} & kwargs.keys():
            self.rope_parameters = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
        super().__post_init__(**kwargs)
        section = (self.rope_parameters or {}).get("mrope_section")
        if section is None:
            raise ValueError("qwen2_5_vl_merge text_config.rope_parameters needs `mrope_section` "
                             "(three ints summing to head_dim/2, e.g. [16, 24, 24] for head_dim 128)")
        if len(section) != 3 or 2 * sum(section) != self.head_dim:
            raise ValueError(f"qwen2_5_vl_merge text_config.rope_parameters.mrope_section {list(section)} "
                             f"must have 3 entries summing to head_dim/2 = {self.head_dim // 2}")


class Qwen2_5_VL_MergeConfig(PreTrainedConfig):
    """Top level: the two sub-configs, the vision placeholder token ids, tied embeddings."""

    model_type = MODEL_TYPE
    sub_configs = {"vision_config": Qwen2_5_VL_MergeVisionConfig, "text_config": Qwen2_5_VL_MergeTextConfig}
    keys_to_ignore_at_inference = ["past_key_values"]

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        for key, cls in self.sub_configs.items():
            value = getattr(self, key)
            if isinstance(value, dict):
                value = cls(**value)
            elif value is None:
                value = cls()
            setattr(self, key, value)
        # One switch for tied embeddings: the top level (where transformers v5 looks) wins, the
        # text config (what vLLM's Qwen3 reads) follows it.
        self.text_config.tie_word_embeddings = self.tie_word_embeddings
        super().__post_init__(**kwargs)
        if self.vision_config.out_hidden_size2 != self.text_config.hidden_size:
            raise ValueError(f"vision_config.out_hidden_size2 ({self.vision_config.out_hidden_size2}) must equal "
                             f"text_config.hidden_size ({self.text_config.hidden_size}): the projector's mlp.4 "
                             "ends in the LLM width")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.text_config.vocab_size:
                raise ValueError(f"{name} {value} is outside the vocabulary (size {self.text_config.vocab_size})")

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # A config.json of another model (plain Qwen2.5-VL, Qwen3, ...) would otherwise load with a
        # warning and fail later as a shape mismatch deep inside the weights.
        model_type = config_dict.get("model_type")
        if model_type != MODEL_TYPE:
            raise ValueError(f"config.json has model_type {model_type!r}, not {MODEL_TYPE!r}: this folder is not a "
                             "Qwen-Merge export (was config.json copied from another model?)")
        return super().from_dict(config_dict, **kwargs)


__all__ = ["Qwen2_5_VL_MergeConfig", "Qwen2_5_VL_MergeTextConfig", "Qwen2_5_VL_MergeVisionConfig"]
