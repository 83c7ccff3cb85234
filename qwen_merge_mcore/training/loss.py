"""The model call and the loss, shared by both engines (Megatron's forward_step convention).

With labels the model returns the per-token loss [B, S] (vocab-parallel cross entropy). The
loss function returns the *sum* over assistant tokens and their count, so that averaging over
all tokens of all micro-batches and data-parallel ranks happens once, at the end
(Megatron-Core's `calculate_per_token_loss`).
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch

from ..batch import Batch


def model_forward(model: torch.nn.Module, batch: Batch, with_labels: bool = True) -> torch.Tensor:
    return model(tokens=batch.tokens, position_ids=batch.position_ids, images=batch.images, videos=batch.videos,
                 cu_seqlens=batch.cu_seqlens, labels=batch.labels if with_labels else None)


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """-> (loss sum, token count, {"lm loss": [sum, count]}) as Megatron's schedules expect."""
    if per_token_loss.shape != loss_mask.shape:
        raise ValueError(f"the model returned a loss of shape {tuple(per_token_loss.shape)}, the batch's loss mask "
                         f"is {tuple(loss_mask.shape)}: expected the per-token loss [B, S]")
    mask = loss_mask.to(per_token_loss.device, torch.float32)
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module):
    """Megatron-Core `forward_step_func`: one micro-batch through one model chunk."""
    device = next(model.parameters()).device
    batch = next(data_iterator).to(device)
    return model_forward(model, batch), partial(loss_func, batch.loss_mask)
