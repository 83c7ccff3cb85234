"""FP8 plumbing: PrecisionConfig -> Megatron-Core's FP8 fields, and the bf16 fallback.

Megatron-Core does the FP8 work itself: `TransformerBlock` enters
`megatron.core.fp8_utils.get_fp8_context(config, layer_no)` (TE's `fp8_autocast` with the recipe
built from `config.fp8_recipe`), around the whole block for delayed scaling and per layer for the
other recipes, where `first_last_layers_bf16` keeps the first/last layers out of FP8. This module
only fills those fields and decides when a shape cannot run FP8.

Transformer Engine's alignment rules per recipe are in `qwen_merge_mcore/fp8_alignment.py`
(the config checks the packing against them). Widths are checked once at build time (the module
then trains in bf16, one warning); each forward's token count on this rank at run time (that
forward runs bf16, one warning). Never a crash.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional

import torch

from ..config import PrecisionConfig
from ..fp8_alignment import fp8_token_alignment, fp8_width_alignment

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def fp8_config_kwargs(precision: PrecisionConfig, *, num_layers: int, pipeline_size: int,
                      widths: dict[str, int], enabled: bool = True) -> dict:
    """TransformerConfig keyword arguments for FP8 (empty when FP8 is off or cannot run).

    `widths` names the GEMM widths of the module (hidden, ffn, ...) for the alignment check;
    `enabled=False` is how the ViT stays bf16 unless `precision.fp8_vision`.
    """
    if precision.fp8 is None or not enabled:
        return {}
    align = fp8_width_alignment(precision.fp8_recipe)
    bad = {name: width for name, width in widths.items() if width % align}
    if bad:
        _warn_once(f"widths:{sorted(bad.items())}", f"FP8 ({precision.fp8_recipe}) needs GEMM widths divisible "
                   f"by {align}; {bad} are not, so this module trains in bf16")
        return {}
    kwargs = dict(fp8=precision.fp8, fp8_recipe=precision.fp8_recipe, fp8_margin=precision.fp8_margin,
                  fp8_amax_history_len=precision.fp8_amax_history_len,
                  fp8_amax_compute_algo=precision.fp8_amax_compute_algo)
    start, end = precision.num_layers_at_start_in_bf16, precision.num_layers_at_end_in_bf16
    if start or end:
        per_stage = num_layers // pipeline_size
        if precision.fp8_recipe == "delayed":
            # Megatron-Core refuses it: delayed scaling reduces amaxes once around the whole block.
            _warn_once("delayed-bf16-layers", "FP8 delayed scaling cannot keep the first/last decoder layers "
                       "in bf16 (Megatron-Core limitation); all decoder layers run FP8. Use the "
                       "'tensorwise' or 'blockwise' recipe to keep them in bf16")
        elif max(start, end) > per_stage:
            _warn_once("bf16-layers-per-stage", f"num_layers_at_start/end_in_bf16 ({start}/{end}) exceed the "
                       f"{per_stage} layers per pipeline stage; all decoder layers run FP8")
        else:
            kwargs.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=start,
                          num_layers_at_end_in_bf16=end)
    return kwargs


def _first_microbatch_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Megatron's TE wrappers inside `module` (the modules `set_is_first_microbatch` sets)."""
    found = getattr(module, "_qmm_first_microbatch_modules", None)
    if found is None:
        found = [m for m in module.modules() if hasattr(m, "is_first_microbatch")]
        module._qmm_first_microbatch_modules = found
    return found


@contextlib.contextmanager
def fp8_fallback(module: torch.nn.Module, num_tokens: int) -> Iterator[None]:
    """One forward of `module` (a TransformerBlock; this rank's `num_tokens`): bf16 when the
    count is not FP8-aligned (TransformerBlock reads `config.fp8` at forward time).

    Megatron's schedules set `is_first_microbatch` on a step's first micro-batch and its TE
    wrappers clear it after every forward; TE quantises and caches the weights when it is True
    and reuses that cache while it is False. A first micro-batch in bf16 caches nothing, so the
    step's later FP8 forwards would run on the previous step's quantised weights: they run with
    the flag at None (quantise afresh, cache nothing; with fused wgrad accumulation TE keeps
    accumulating into main_grad, which True would overwrite) until the next step re-arms it.
    """
    config = module.config
    fp8: Optional[str] = getattr(config, "fp8", None)
    if not fp8:
        yield
        return
    flagged = _first_microbatch_modules(module)
    first = any(m.is_first_microbatch for m in flagged)
    if num_tokens % fp8_token_alignment(config.fp8_recipe, config.sequence_parallel) == 0:
        if first:
            module._qmm_fp8_cache_stale = False
        elif getattr(module, "_qmm_fp8_cache_stale", False):
            for m in flagged:
                m.is_first_microbatch = None
        yield
        return
    if first:
        module._qmm_fp8_cache_stale = True
    _warn_once("tokens", f"{num_tokens} tokens per rank is not a multiple of "
               f"{fp8_token_alignment(config.fp8_recipe, config.sequence_parallel)} ({config.fp8_recipe} FP8): "
               "such forwards run in bf16 (packed batches are padded to data.pad_to_multiple_of)")
    config.fp8 = None
    try:
        yield
    finally:
        config.fp8 = fp8
