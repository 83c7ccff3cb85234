"""The batch that flows from the data pipeline into the model and the training step."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch


@dataclass
class VisionInput:
    """Patches of several images (or videos) in one flat tensor, as the ViT consumes them."""

    pixel_values: torch.Tensor  # [total_patches, in_channels * temporal_patch * patch * patch]
    grid_thw: torch.Tensor  # [n, 3] long: patches along (t, h, w) of each image, before the 2x2 merge
    # With a ViT feature cache (data.vision_cache): each image's cache key, and the cached ViT
    # output of the images found there ([their patches, vision hidden], image order, in `cached`);
    # `pixel_values` then holds the other images' patches only.
    keys: Optional[tuple[str, ...]] = None
    cached: Optional[torch.Tensor] = None  # [n] bool
    features: Optional[torch.Tensor] = None


@dataclass
class Batch:
    """Token tensors are [B, S]. A packed batch has B = 1, several samples laid end to end
    (THD), their boundaries in `cu_seqlens`, positions restarting per sample.

    `labels[b, s]` is the token that should follow `tokens[b, s]` (already shifted);
    `loss_mask` is 1 on assistant tokens and 0 on prompts, padding and sample ends.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor  # [3, B, S] MRoPE (t, h, w)
    cu_seqlens: Optional[torch.Tensor] = None  # [n_samples + 1] int32, packed boundaries incl. padding
    images: Optional[VisionInput] = None
    videos: Optional[VisionInput] = None

    def to(self, device: torch.device | str) -> "Batch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=True)
            elif isinstance(value, VisionInput):
                features = None if value.features is None else value.features.to(device, non_blocking=True)
                value = VisionInput(value.pixel_values.to(device, non_blocking=True), value.grid_thw.to(device),
                                    value.keys, value.cached, features)
            moved[f.name] = value
        return Batch(**moved)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())
