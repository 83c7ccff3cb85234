"""A deterministic, resumable micro-batch source with the tiny model's real shapes.

Each sample: `<|vision_start|>`, one image's `<|image_pad|>` tokens (grid 1x4x4 patches -> 4
merged tokens), `<|vision_end|>`, random prompt tokens, then an answer that follows a fixed rule
(next = 20 + (cur - 20 + 3) mod 8, over an 8-token alphabet), so the loss falls within a few steps. Positions are the
real MRoPE ids. Sample i of DP rank r depends only on (seed, r, i): the sampler state is i. A step
is train.global_batch_samples samples, micro_batch_size per micro-batch, shared out over DP.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

from qwen_merge_mcore.batch import Batch, VisionInput
from qwen_merge_mcore.positions import mrope_position_ids

ALPHABET = 8
GRID = (1, 4, 4)


class SyntheticData:
    def __init__(self, cfg, dp_rank: int, dp_size: int, seq_length: int = 48, signal_after: int | None = None):
        m = cfg.model
        self.m, self.seed, self.rank, self.seq = m, cfg.train.seed, dp_rank, seq_length
        self.mb = cfg.train.micro_batch_size
        self.per_step, rest = divmod(cfg.train.global_batch_samples, self.mb * dp_size)
        assert not rest, "synthetic data: global_batch_samples must be a multiple of micro_batch_size x DP"
        v = m.vision
        self.patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        self.image_tokens = GRID[0] * GRID[1] * GRID[2] // v.spatial_merge_size ** 2
        self.index = 0
        self.signal_after = signal_after  # micro-batches; then SIGUSR1 to this process (global rank 1 only)

    def __iter__(self):
        return self

    def next_step(self) -> int:
        return self.per_step

    def __next__(self) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + self.index)
        self.index += 1
        if self.index == self.signal_after and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        m, s, n = self.m, self.seq, self.image_tokens
        rows = []
        for _ in range(self.mb):
            t = torch.randint(20, 20 + ALPHABET, (s + 1,), generator=g)
            for i in range(s // 2, s + 1):
                t[i] = 20 + (t[i - 1] - 20 + 3) % ALPHABET
            t[0], t[1:n + 1], t[n + 1] = m.vision_start_token_id, m.image_token_id, m.vision_end_token_id
            rows.append(t)
        tokens = torch.stack(rows)
        grid = torch.tensor([GRID] * self.mb)
        pos = torch.stack([mrope_position_ids(r[:-1], grid[:1], image_token_id=m.image_token_id,
                                              video_token_id=m.video_token_id,
                                              spatial_merge_size=m.vision.spatial_merge_size) for r in rows], dim=1)
        loss_mask = torch.zeros(self.mb, s)
        loss_mask[:, s // 2 + 6 * (self.index % 3):] = 1.0  # micro-batches differ in loss tokens
        pixels = torch.randn(self.mb * GRID[0] * GRID[1] * GRID[2], self.patch_dim, generator=g)
        return Batch(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), loss_mask=loss_mask,
                     position_ids=pos, images=VisionInput(pixels, grid))

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]
