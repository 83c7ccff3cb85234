"""A deterministic, resumable micro-batch source for the training-machinery tests.

Each sample is a prompt (an image's tokens, then random tokens) and an answer that follows a
fixed rule (next = 20 + (3 * cur + 7) mod 40, over a 40-token alphabet), so the loss can fall within a few steps. Sample i
of DP rank r depends only on (seed, r, i): the sampler state is the next index.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

from qwen_merge_mcore.batch import Batch, VisionInput

from .toy_model import PATCH_DIM

ALPHABET = 40


class ToyData:
    def __init__(self, cfg, dp_rank: int, dp_size: int, seq_length: int = 32, image_tokens: int = 4,
                 epoch_batches: int | None = None, signal_after: int | None = None):
        self.vocab = cfg.model.language.vocab_size
        self.image_token = cfg.model.image_token_id
        self.seed, self.rank = cfg.train.seed, dp_rank
        self.mb = cfg.train.micro_batch_size
        self.seq, self.image_tokens = seq_length, image_tokens
        self.index = 0
        self.epoch_batches = epoch_batches
        self.signal_after = signal_after  # micro-batches; then SIGUSR1 to this process (global rank 1 only)

    def __len__(self) -> int:
        if self.epoch_batches is None:
            raise TypeError("endless")
        return self.epoch_batches

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + self.index)
        self.index += 1
        if self.index == self.signal_after and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        b, s, n = self.mb, self.seq, self.image_tokens
        tokens = torch.randint(20, 20 + ALPHABET, (b, s + 1), generator=g)
        half = s // 2
        for i in range(half, s + 1):
            tokens[:, i] = 20 + (3 * tokens[:, i - 1] + 7) % ALPHABET
        tokens[:, :n] = self.image_token
        loss_mask = torch.zeros(b, s)
        loss_mask[:, half:] = 1.0
        pos = torch.arange(s).expand(3, b, s).contiguous()
        pixels = torch.randn(b * n, PATCH_DIM, generator=g)
        grid = torch.tensor([[1, 2, n // 2]] * b)
        return Batch(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), loss_mask=loss_mask,
                     position_ids=pos, images=VisionInput(pixels, grid))

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]
