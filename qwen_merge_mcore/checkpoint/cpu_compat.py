"""Let Megatron-Core 0.16's torch_dist writer run on machines without CUDA.

Megatron-Core 0.16.1's distributed-checkpoint save calls `torch.cuda.synchronize()` after
staging tensors (filesystem_async.py) and allocates its status tensor on
`torch.cuda.current_device()` (state_dict_saver.py), unconditionally, so a CPU-only save fails
before anything is written. `cpu_save_compat()` makes `synchronize` a no-op and
`current_device` return "cpu" for the duration of one save, only when CUDA is unavailable; on a
GPU machine it changes nothing. Loading needs no patch. The trainer saves through
`save_dist_checkpoint` below, so this is the one place that knows about it; the converters'
streaming writer (dcp_stream.py) calls no CUDA API and needs none of it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def cpu_save_compat() -> Iterator[None]:
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved


def save_dist_checkpoint(sharded_state_dict: dict, directory: str, **kwargs: Any):
    """`megatron.core.dist_checkpointing.save` in torch_dist format, on GPU and on CPU."""
    from megatron.core import dist_checkpointing

    with cpu_save_compat():
        return dist_checkpointing.save(sharded_state_dict, str(directory), **kwargs)
