"""qwen_merge_mcore: Megatron-Core training for Qwen-Merge vision-language models."""

__version__ = "0.1.0"
