"""What this machine can run: CUDA, Transformer Engine."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def te_available() -> bool:
    """True where Transformer Engine's PyTorch layers import (needs CUDA)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or TE failing to find CUDA libraries
        return False
    return True


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
