"""Checkpoint I/O and conversion between Hugging Face and Megatron-Core layouts."""
