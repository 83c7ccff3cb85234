"""Samples -> packed THD sequences (`Batch` with B = 1 and cu_seqlens).

A step's samples become exactly DP x M micro-batches (`assign_micro_batches`): M is the fewest
rounds that first-fit-decreasing needs for them, so any data-parallel size works; the samples go to
ranks and slots either as the FFD bins fall or balancing the ranks' FLOPs. First-fit-decreasing
puts samples into bins of `capacity` tokens; each bin becomes one sequence,
padded to a multiple of `pad_to_multiple_of` (FP8 GEMMs need it) and, when asked, to the full
capacity (fixed shapes for pipeline parallelism). Positions restart at 0 for every sample, labels are
the next token within the sample, and the loss mask is 0 on prompts, sample ends and padding.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..batch import Batch, VisionInput
from ..perf.flops import BatchStats, Grid, step_flops


@dataclass
class PackedSample:
    row_id: str
    input_ids: list[int]
    target_mask: list[int]
    position_ids: torch.Tensor  # [3, L]
    images: list = field(default_factory=list)  # encoded media (bytes)
    image_grids: list[tuple[int, int, int]] = field(default_factory=list)
    videos: list = field(default_factory=list)
    video_grids: list[tuple[int, int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins whose lengths sum to <= capacity. Ties keep input order, so the
    result depends only on the lengths. Every length must be <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            if n > capacity:
                raise ValueError(f"length {n} exceeds the capacity {capacity}")
            bins.append([i])
            room.append(capacity - n)
    return bins


def assign_micro_batches(lengths: Sequence[int], capacity: int, dp_size: int,
                         policy: str = "first_fit_decreasing", multiple: int = 1,
                         costs: Optional[Sequence[float]] = None) -> list[list[list[int]]]:
    """The step's samples (indices into `lengths`) as [DP rank][micro-batch slot] lists: exactly
    DP x M micro-batches, M the same for every rank, each sample in exactly one, none over
    `capacity` tokens (a slot may be empty when the step has too few samples). M is the fewest
    rounds the FFD bins need, rounded up to a `multiple` (the interleaved pipeline schedule wants M
    divisible by PP). Depends only on the arguments, so every rank computes the same assignment
    from the same sample list.

    first_fit_decreasing: the FFD bins, dealt to the ranks in turn (slot s of rank r is bin s*DP + r).
    flop_balanced: `costs` (each sample's training FLOPs, perf/flops.py; they add up over the
    samples of a rank) balanced over the ranks, see `balance_by_cost`; M grows by `multiple` in
    the rare step where the balanced placement does not fit into M rounds."""
    bins = first_fit_decreasing(lengths, capacity)
    rounds = -(-max(1, -(-len(bins) // dp_size)) // multiple) * multiple
    if policy == "first_fit_decreasing":
        bins += [[] for _ in range(rounds * dp_size - len(bins))]
        return [[bins[s * dp_size + r] for s in range(rounds)] for r in range(dp_size)]
    if policy != "flop_balanced":
        raise ValueError(f"unknown packing policy {policy!r}")
    if costs is None or len(costs) != len(lengths):
        raise ValueError("flop_balanced packing needs one cost per sample")
    while True:
        plan = balance_by_cost(lengths, costs, capacity, dp_size, rounds)
        if plan is not None:
            return plan
        rounds += multiple


def balance_by_cost(lengths: Sequence[int], costs: Sequence[float], capacity: int, dp_size: int,
                    rounds: int) -> Optional[list[list[list[int]]]]:
    """Longest-processing-time first under a token limit: samples by decreasing cost, each to the
    least-loaded rank that still has a slot with room for it, into the fullest such slot (best fit
    keeps room for the long samples still to come). None when a sample finds no room anywhere.
    Ties break by index, so the result depends only on the arguments."""
    slots = [[[] for _ in range(rounds)] for _ in range(dp_size)]
    room = [[capacity] * rounds for _ in range(dp_size)]
    ranks = [(0.0, r) for r in range(dp_size)]  # (load, rank), a heap
    for i in sorted(range(len(lengths)), key=lambda i: (-costs[i], i)):
        n, full = lengths[i], []
        while ranks:
            load, r = heapq.heappop(ranks)
            fits = [s for s in range(rounds) if room[r][s] >= n]
            if fits:
                break
            full.append((load, r))
        else:
            return None
        s = min(fits, key=lambda s: (room[r][s], s))
        slots[r][s].append(i)
        room[r][s] -= n
        heapq.heappush(ranks, (load + costs[i], r))
        for item in full:
            heapq.heappush(ranks, item)
    return slots


def sample_flops(model_cfg, length: int, grids: Sequence[Grid], freeze: Sequence[str] = ()) -> float:
    """Training FLOPs of one sample alone (the planner's model). They add up over the samples of a
    micro-batch up to its padding: attention is per sample, everything else per token or image."""
    return step_flops(model_cfg, BatchStats(tokens=length, sample_lengths=(length,), image_grids=tuple(grids)),
                      freeze=freeze)


def micro_batch_flops(model_cfg, lengths: Sequence[int], grids: Sequence[Grid], pad_to_multiple_of: int,
                      freeze: Sequence[str] = ()) -> float:
    """Training FLOPs of one packed micro-batch as `collate_packed` lays it out (padding joins the
    last segment; an empty slot is one padding segment)."""
    total = sum(lengths)
    pad = padded_length(max(total, 1), pad_to_multiple_of) - total
    segments = tuple(lengths[:-1]) + (lengths[-1] + pad,) if lengths else (pad,)
    return step_flops(model_cfg, BatchStats(tokens=total + pad, sample_lengths=segments, image_grids=tuple(grids)),
                      freeze=freeze)


def padded_length(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate_packed(samples: Sequence[PackedSample], pad_id: int, pad_to_multiple_of: int,
                   pad_to: Optional[int] = None, images: Optional[VisionInput] = None,
                   videos: Optional[VisionInput] = None) -> Batch:
    """One packed sequence. `images`/`videos`: the samples' media in order of appearance."""
    total = sum(len(s) for s in samples)
    length = padded_length(max(total, 1), pad_to_multiple_of)
    if pad_to is not None:
        if total > pad_to:
            raise ValueError(f"{total} tokens do not fit in {pad_to}")
        length = pad_to
    tokens = torch.full((length,), pad_id, dtype=torch.long)
    labels = torch.full((length,), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(length, dtype=torch.float32)
    positions = torch.zeros(3, length, dtype=torch.long)
    cu = [0]
    for s in samples:
        start, n = cu[-1], len(s)
        ids = torch.tensor(s.input_ids, dtype=torch.long)
        tokens[start:start + n] = ids
        labels[start:start + n - 1] = ids[1:]
        loss_mask[start:start + n - 1] = torch.tensor(s.target_mask[1:], dtype=torch.float32)
        positions[:, start:start + n] = s.position_ids
        cu.append(start + n)
    if length > total:
        # Padding joins the last segment; its positions go on counting so they stay distinct.
        base = int(samples[-1].position_ids.max()) + 1 if total else 0
        positions[:, total:] = torch.arange(base, base + length - total)
        if len(cu) > 1:
            cu[-1] = length
        else:
            cu.append(length)
    return Batch(tokens=tokens[None], labels=labels[None], loss_mask=loss_mask[None],
                 position_ids=positions[:, None], cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                 images=images, videos=videos)


def packing_efficiency(lengths: Sequence[int], capacity: int, pad_to_multiple_of: int, window: int) -> float:
    """Real tokens / tokens computed when each step's `window` samples are packed FFD."""
    computed = 0
    for start in range(0, len(lengths), window):
        chunk = lengths[start:start + window]
        for b in first_fit_decreasing(chunk, capacity):
            computed += padded_length(sum(chunk[i] for i in b), pad_to_multiple_of)
    return sum(lengths) / computed


def batch_max_efficiency(lengths: Sequence[int], batch_size: int) -> float:
    """The baseline: consecutive batches of `batch_size` samples, each padded to the batch maximum."""
    computed = sum(max(lengths[i:i + batch_size]) * len(lengths[i:i + batch_size])
                   for i in range(0, len(lengths), batch_size))
    return sum(lengths) / computed
