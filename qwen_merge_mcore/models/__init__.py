"""Megatron-Core modules of Qwen-Merge: layer specs, ViT, projector, Qwen3 decoder, composition."""
