"""Multimodal rotary embedding (MRoPE) of Qwen2.5-VL, in Megatron-Core's rotary layout.

Computed here, on the device of the position ids, because Megatron-Core's
MultimodalRotaryEmbedding allocates on CUDA at construction. The rule is Hugging Face's
`Qwen2_5_VLRotaryEmbedding`: angles = position x inv_freq for each of the t/h/w position rows,
then the head_dim/2 frequencies are split into `mrope_section` chunks and chunk i takes its
angles from row i % 3. The output is [S, B, 1, head_dim] (the half-size angles repeated twice)
for Megatron's `apply_rotary_pos_emb` in its rotate-half (non-interleaved) convention.

Text tokens carry equal t/h/w ids, so for them every chunk sees the same position and the result
is exactly Qwen3's 1D RoPE.
"""

from __future__ import annotations

from typing import Sequence

import torch


class MultimodalRotaryEmbedding(torch.nn.Module):
    """No parameters and no buffers: a bf16 cast of the model must not round inv_freq."""

    def __init__(self, head_dim: int, rope_theta: float, mrope_section: Sequence[int]):
        super().__init__()
        if sum(mrope_section) * 2 != head_dim:
            raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim/2 = {head_dim // 2}")
        self.head_dim = head_dim
        self.rope_theta = float(rope_theta)
        self.mrope_section = list(mrope_section)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.rope_theta ** exponent)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids [3, B, S] (t, h, w) -> rotary angles [S, B, 1, head_dim] in float32."""
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"position_ids must be [3, B, S] (t, h, w), got {tuple(position_ids.shape)}")
        angles = position_ids[..., None].float() * self.inv_freq(position_ids.device)  # [3, B, S, D/2]
        chunks = angles.split(self.mrope_section, dim=-1)
        angles = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)  # [B, S, D/2]
        emb = torch.cat((angles, angles), dim=-1)  # rotate-half layout: [x1 | x2] share angles
        return emb.transpose(0, 1).unsqueeze(2).contiguous()
