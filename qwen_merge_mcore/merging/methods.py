"""Merging rules on single tensors: no I/O, no names, float32 in and out.

Task-vector methods work on deltas `d_i = model_i - base` and return the merged delta; the
caller adds it back to the base. Weights scale each model's contribution.

- linear:      sum_i w_i * x_i
- TIES:        trim each d_i to its top-`density` fraction by magnitude, elect per entry the sign
               of sum_i w_i * trimmed_i (the larger total mass wins), then average only the entries
               that agree with the elected sign: sum_i w_i t_i [agree_i] / sum_i w_i [agree_i]
               (the "disjoint mean"; 0 where no model agrees).
- DARE:        keep each entry of d_i with probability `density` and divide the kept ones by
               `density`, so E[dare(d)] = d. The VLM-merging seed drops the 1/density rescale,
               which shrinks every task vector to `density` times its size; this does not.
- dare_linear: sum_i w_i * dare(d_i)
- dare_ties:   TIES sign election and disjoint mean over dare(d_i) instead of magnitude trimming.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    _check(tensors, weights)
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        out.add_(t, alpha=w)
    return out


def magnitude_threshold(magnitudes: torch.Tensor, density: float) -> float | None:
    """The smallest |d| among the ceil(density * numel) largest; None when everything is kept."""
    _check_density(density)
    k = math.ceil(density * magnitudes.numel())
    if k >= magnitudes.numel():
        return None
    flat = magnitudes.reshape(-1)
    return torch.kthvalue(flat, flat.numel() - k + 1).values.item()


def magnitude_threshold_sliced(slices: Callable[[], Iterable[torch.Tensor]], numel: int,
                               density: float) -> float | None:
    """`magnitude_threshold` of a tensor seen only slice by slice, exactly, in memory for one slice.

    `slices()` yields the magnitudes (>= 0) slice after slice and is called twice. Non-negative
    float32 values order like their bit patterns read as integers, so the k-th largest is found
    by a histogram of the high 16 bits, then one of the low 16 bits inside the chosen bucket.
    """
    _check_density(density)
    k = math.ceil(density * numel)
    if k >= numel:
        return None
    high = torch.zeros(1 << 16, dtype=torch.int64)
    for m in slices():
        high += torch.bincount(_bits(m) >> 16, minlength=1 << 16)
    bucket, above = _kth_from_top(high, k)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for m in slices():
        bits = _bits(m)
        low += torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    low_bits, _ = _kth_from_top(low, k - above)
    return torch.tensor([(bucket << 16) | low_bits], dtype=torch.int32).view(torch.float32).item()


def _bits(magnitudes: torch.Tensor) -> torch.Tensor:
    return magnitudes.float().contiguous().reshape(-1).view(torch.int32)


def _kth_from_top(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest value, and how many values lie in higher bins."""
    from_top = counts.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor([k])).item())
    return counts.numel() - 1 - i, int(from_top[i - 1]) if i else 0


def trim_at(delta: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Zero the entries with |d| below the threshold (entries equal to it are kept)."""
    if threshold is None:
        return delta
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def trim_top_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ceil(density * numel) largest-magnitude entries (ties at the cut are kept), zero the rest."""
    return trim_at(delta, magnitude_threshold(delta.abs(), density))


def dare(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Drop And REscale: keep each entry with probability `density`, scale survivors by 1/density."""
    _check_density(density)
    if density == 1.0:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def elect_and_average(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES sign election by total mass, then the weighted mean of the agreeing entries only."""
    _check(deltas, weights)
    weighted = [d * w for d, w in zip(deltas, weights)]
    elected = torch.sign(sum(weighted))
    numerator = torch.zeros_like(deltas[0])
    denominator = torch.zeros_like(deltas[0])
    for d, wd, w in zip(deltas, weighted, weights):
        agree = (torch.sign(wd) == elected) & (d != 0)
        numerator += torch.where(agree, wd, 0.0)
        denominator += agree.to(d.dtype) * w
    return torch.where(denominator != 0, numerator / torch.where(denominator != 0, denominator, 1.0), 0.0)


def ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    return elect_and_average([trim_top_magnitude(d, density) for d in deltas], weights)


def dare_linear(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
                generators: Sequence[torch.Generator]) -> torch.Tensor:
    return linear([dare(d, density, g) for d, g in zip(deltas, generators)], weights)


def dare_ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
              generators: Sequence[torch.Generator]) -> torch.Tensor:
    return elect_and_average([dare(d, density, g) for d, g in zip(deltas, generators)], weights)


def _check(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"need one weight per tensor, got {len(tensors)} tensors and {len(weights)} weights")
    if any(t.shape != tensors[0].shape for t in tensors):
        raise ValueError(f"shapes differ: {[tuple(t.shape) for t in tensors]}")


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
