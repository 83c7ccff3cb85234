"""Checkpoint formats: Hugging Face safetensors folders, the HF<->Megatron mapping table, converters."""
