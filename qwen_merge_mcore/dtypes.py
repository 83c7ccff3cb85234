"""Parameter dtypes, once: the short names configs and commands use (bf16, fp16, fp32), their
names in Hugging Face configs, and their torch dtypes (torch's own attribute names are the HF
names). Importing this module does not import torch, so command-line parsers can use NAMES."""

from __future__ import annotations

HF_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
NAMES = tuple(HF_NAMES)


def torch_dtype(name: str):
    """bf16 -> torch.bfloat16, and so on."""
    import torch

    return getattr(torch, HF_NAMES[name])


def from_hf_name(hf_name: str | None, default: str = "bf16") -> str:
    """A config's `dtype` ("bfloat16") -> "bf16"; `default` when it names none of ours."""
    return {hf: short for short, hf in HF_NAMES.items()}.get(hf_name, default)
