"""What a Hugging Face config says the weights must look like.

Shapes come from the transformers model classes themselves, built on the meta device (no memory,
instant even for 72B), so a config/weights mismatch is caught by the reference implementation's
own idea of the layout rather than by a hand-written shape table.
"""

from __future__ import annotations

import torch

from .safetensors_io import CheckpointError, SafetensorsFolder


def qwen3_shapes(text_config: dict) -> dict[str, tuple[int, ...]]:
    """File names and shapes of a Qwen3ForCausalLM checkpoint (`model.*`, `lm_head.weight` when untied)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**{k: v for k, v in text_config.items() if k != "model_type"})
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def qwen2_5_vl_vision_shapes(vision_config: dict) -> dict[str, tuple[int, ...]]:
    """File names and shapes of the `visual.*` part of a Qwen2.5-VL checkpoint."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    cfg = Qwen2_5_VLVisionConfig(**{k: v for k, v in vision_config.items() if k != "out_hidden_size2"})
    with torch.device("meta"):
        model = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg)
    return {f"visual.{k}": tuple(v.shape) for k, v in model.state_dict().items()}


def check_shapes(folder: SafetensorsFolder, expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Every expected tensor present with the shape the config implies."""
    missing = sorted(n for n in expected if n not in folder)
    wrong = [f"{n}: file {folder.spec(n).shape}, config implies {s}"
             for n, s in expected.items() if n in folder and folder.spec(n).shape != s]
    if missing or wrong:
        lines = ([f"missing tensors: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else "")]
                 if missing else [])
        if wrong:
            lines.append("config/weights shape mismatch: " + "; ".join(wrong[:10]))
        raise CheckpointError(f"{folder.folder} ({what}): " + " | ".join(lines))
