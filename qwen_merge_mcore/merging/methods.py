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
from typing import Sequence

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
