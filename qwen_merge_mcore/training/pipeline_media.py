"""Only the first pipeline stage decodes images and videos: the ViT lives there, the other
stages need tokens, positions and labels only. They read the same sample stream, and a sample
whose media fail to decode is dropped from its bin, so the first stage tells the others of its
pipeline, per bin, which samples it dropped (gloo point-to-point, a few bytes per micro-batch)
and every stage packs the same sequence.

The message for a bin is posted before the first stage runs that micro-batch's forward; a later
stage waits for it only when its schedule reaches that micro-batch, after the first stage's
activations for it have arrived, so it is always already sent.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..data.errors import REASONS


def _pipeline_groups_gloo() -> tuple[dist.ProcessGroup, list[int]]:
    """A gloo group for this rank's pipeline (every rank creates every pipeline's group, in the
    same order) and its global ranks, first stage first."""
    mine = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    group = None
    for ranks in sorted(set(map(tuple, everyone))):
        created = dist.new_group(list(ranks), backend="gloo")
        if tuple(mine) == ranks:
            group = created
    return group, mine


class PipelineKeptSamples:
    """The data loader's `KeptSamples` across the stages of one pipeline."""

    def __init__(self):
        self.group, ranks = _pipeline_groups_gloo()
        self.first, self.later = ranks[0], ranks[1:]
        self.pending: list = []  # sends in flight (their tensors must stay alive)

    def publish(self, dropped: list[Optional[str]]) -> None:
        codes = torch.tensor([0 if r is None else 1 + REASONS.index(r) for r in dropped], dtype=torch.int32)
        self.pending = [(work, t) for work, t in self.pending if not work.is_completed()]
        for dst in self.later:
            self.pending.append((dist.isend(codes, dst, group=self.group), codes))

    def receive(self, count: int) -> list[Optional[str]]:
        codes = torch.empty(count, dtype=torch.int32)
        dist.recv(codes, self.first, group=self.group)
        return [None if c == 0 else REASONS[c - 1] for c in codes.tolist()]
