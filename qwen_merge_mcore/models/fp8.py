"""FP8 plumbing: PrecisionConfig -> Megatron-Core's FP8 fields, and the bf16 fallback.

Megatron-Core does the FP8 work itself: `TransformerBlock` enters
`megatron.core.fp8_utils.get_fp8_context(config, layer_no)` (TE's `fp8_autocast` with the recipe
built from `config.fp8_recipe`), around the whole block for delayed scaling and per layer for the
other recipes, where `first_last_layers_bf16` keeps the first/last layers out of FP8. This module
only fills those fields and decides when a shape cannot run FP8.

FP8 GEMMs need every GEMM dimension aligned to 16: the hidden and FFN widths are checked once
at build time (the whole decoder then runs bf16, one warning), the token count of every forward
(padded to 16 by the data pipeline for packed batches) at run time (that forward runs bf16, one
warning). Never a crash.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional

from ..config import PrecisionConfig

FP8_ALIGNMENT = 16

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
    bad = {name: width for name, width in widths.items() if width % FP8_ALIGNMENT}
    if bad:
        _warn_once(f"widths:{sorted(bad.items())}", f"FP8 needs GEMM widths divisible by {FP8_ALIGNMENT}; "
                   f"{bad} are not, so this module trains in bf16")
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


@contextlib.contextmanager
def fp8_fallback(config, num_tokens: int) -> Iterator[None]:
    """Run this forward in bf16 when its token count is not FP8-aligned (TransformerBlock reads
    `config.fp8` at forward time)."""
    fp8: Optional[str] = getattr(config, "fp8", None)
    if not fp8 or num_tokens % FP8_ALIGNMENT == 0:
        yield
        return
    _warn_once("tokens", f"{num_tokens} tokens per micro-batch is not a multiple of {FP8_ALIGNMENT}: "
               "such forwards run in bf16 (pad packed batches with data.pad_to_multiple_of=16)")
    config.fp8 = None
    try:
        yield
    finally:
        config.fp8 = fp8
