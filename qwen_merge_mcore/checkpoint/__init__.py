"""Checkpoint formats: the HF <-> Megatron mapping and Megatron-Core distributed checkpoints."""
