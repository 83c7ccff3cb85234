"""Hugging Face transformers integration of exported Qwen-Merge checkpoints.

The model and config classes live in `remote_code/` as self-contained files, which are both
registered with transformers' Auto classes (by `autoregister`, installed when `qwen_merge_mcore`
is imported) and copied into exported folders (`write_remote_code`). The names below load on
first use, so importing this package costs nothing until then.
"""

from __future__ import annotations

import importlib

_CONFIG = ".remote_code.configuration_qwen2_5_vl_merge"
_MODELING = ".remote_code.modeling_qwen2_5_vl_merge"
_EXPORTS = {
    "Qwen2_5_VL_MergeConfig": _CONFIG, "Qwen2_5_VL_MergeTextConfig": _CONFIG, "Qwen2_5_VL_MergeVisionConfig": _CONFIG,
    "CheckpointError": _MODELING, "Qwen2_5_VL_MergeForConditionalGeneration": _MODELING,
    "Qwen2_5_VL_MergeModel": _MODELING, "Qwen2_5_VL_MergeVisionTransformer": _MODELING,
    "validate_checkpoint_folder": _MODELING,
    "Qwen2_5_VL_MergeProcessor": ".remote_code.processing_qwen2_5_vl_merge",
    "write_remote_code": ".remote", "REMOTE_CODE_FILES": ".remote",
    "make_tiny_qwen_merge": ".tiny", "save_processor": ".tiny",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
