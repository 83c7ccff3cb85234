"""qwen_merge_mcore: Megatron-Core training for Qwen-Merge vision-language models."""

__version__ = "0.1.0"

# Qwen-Merge checkpoints load with transformers' Auto classes once this package is imported; the
# registration waits until transformers imports its auto modules, so this import stays cheap.
from .hf import autoregister as _autoregister  # noqa: E402

_autoregister.install()
