"""What Transformer Engine 2.10 needs of an FP8 GEMM's input, per recipe (pure arithmetic).

Every FP8 GEMM input is flattened to [tokens, width] on each rank:

| recipe | tokens | width | where TE checks it |
| --- | --- | --- | --- |
| delayed, tensorwise | % 8 | % 16 | `pytorch/utils.py` `assert_dim_for_fp8_exec` |
| blockwise | % 8; % 128 under sequence parallelism | % 16 | the same, and for the all-gathered input `assert_dim_for_all_gather` -> `Float8BlockQuantizer.is_quantizable` (128-blocks) |
| mxfp8 | % 32 | % 32 | `pytorch/csrc/quantizer.cpp` (MXFP8 blocks of 32) |

Under sequence parallelism a rank holds seq/TP tokens of a sequence, so a packed sequence must
be padded to the per-rank alignment x TP. The recipes also need a recent GPU
(`pytorch/quantization.py` `check_fp8_support`, `check_fp8_block_scaling_support`,
`check_mxfp8_support`).
"""

from __future__ import annotations

from typing import Optional


def fp8_token_alignment(recipe: str, sequence_parallel: bool) -> int:
    """Tokens per rank that an FP8 GEMM input must be a multiple of."""
    if recipe == "mxfp8":
        return 32
    if recipe == "blockwise" and sequence_parallel:
        return 128
    return 8


def fp8_width_alignment(recipe: str) -> int:
    return 32 if recipe == "mxfp8" else 16


def fp8_sequence_multiple(recipe: str, tensor_parallel_size: int, sequence_parallel: bool) -> int:
    """What a packed sequence's length must be a multiple of for its forwards to run FP8."""
    return fp8_token_alignment(recipe, sequence_parallel) * (tensor_parallel_size if sequence_parallel else 1)


def fp8_unsupported(recipe: str, capability: tuple[int, int], cuda_version: Optional[str]) -> Optional[str]:
    """Why a GPU of this compute capability and CUDA version cannot run the recipe, or None."""
    cc = f"{capability[0]}.{capability[1]}"
    if recipe == "mxfp8" and not (10, 0) <= tuple(capability) < (12, 0):
        return f"mxfp8 runs on compute capability 10.x (Blackwell) only; this GPU is {cc}"
    if recipe == "blockwise":
        cuda = tuple(int(x) for x in (cuda_version or "0.0").split(".")[:2])
        if tuple(capability) < (9, 0) or cuda < (12, 9):
            return f"blockwise FP8 needs compute capability 9.0+ and CUDA 12.9+; this GPU is {cc}, CUDA {cuda_version}"
    if recipe in ("delayed", "tensorwise") and tuple(capability) < (8, 9):
        return f"FP8 needs compute capability 8.9+; this GPU is {cc}"
    return None
