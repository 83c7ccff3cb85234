"""The order in which one pass over a weighted mix of datasets visits their rows.

Each dataset contributes round(epochs x rows) samples per pass: whole epochs, each in a fresh
random order, then a random subset for the fractional part. The datasets are interleaved by
weight: sample k of dataset i is due at time (k + u) / rate_i with rate_i proportional to its
weight, u uniform in [0, 1); the pass visits samples by due time. Without weights (the default)
the rate is the sample count, which spreads every dataset evenly over the pass; a larger weight
makes a dataset come earlier and run out sooner. Everything follows from (seed, pass index).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


class Mixture:
    def __init__(self, sizes: Sequence[int], epochs: Sequence[float], weights: Sequence[Optional[float]],
                 seed: int, shuffle: bool = True):
        self.sizes = list(sizes)
        self.counts = [int(round(e * n)) for e, n in zip(epochs, sizes)]
        given = [w for w in weights if w is not None]
        if given and len(given) != len(weights):
            raise ValueError("set data.datasets[*].weight on every dataset or on none")
        self.rates = [float(w) for w in weights] if given else [float(c) for c in self.counts]
        self.seed, self.shuffle = seed, shuffle

    def __len__(self) -> int:
        return sum(self.counts)

    def order(self, pass_index: int) -> np.ndarray:
        """[len, 2] int64 rows of (dataset index, row index) for this pass."""
        rng = np.random.default_rng([self.seed, pass_index])
        total_rate = sum(r for r, c in zip(self.rates, self.counts) if c)
        chunks, times = [], []
        for i, (n, count, rate) in enumerate(zip(self.sizes, self.counts, self.rates)):
            if not count:
                continue
            rows = self._rows(rng, n, count)
            k = np.arange(count, dtype=np.float64)
            u = rng.random(count) if self.shuffle else np.full(count, 0.5)
            times.append((k + u) / (len(self) * rate / total_rate))
            chunks.append(np.stack([np.full(count, i), rows], axis=1))
        if not chunks:
            return np.zeros((0, 2), dtype=np.int64)
        entries = np.concatenate(chunks)
        return entries[np.argsort(np.concatenate(times), kind="stable")]

    def _rows(self, rng: np.random.Generator, n: int, count: int) -> np.ndarray:
        full, rest = divmod(count, n)
        if not self.shuffle:
            return np.arange(count) % n
        parts = [rng.permutation(n) for _ in range(full)]
        if rest:
            parts.append(rng.permutation(n)[:rest])
        return np.concatenate(parts)
