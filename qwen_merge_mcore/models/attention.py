"""Attention pieces: core attention on torch `scaled_dot_product_attention` for the `local`
layer spec, and a SelfAttention that rotates packed sequences once per tensor (both specs).

`SDPACoreAttention` is a drop-in for Megatron-Core's `DotProductAttention` (which allocates on
CUDA) with the same constructor and forward. It also understands packed sequences: `packed_seq_params.cu_seqlens_q`
splits the tokens into independent sequences (a block-diagonal mask), which is how the ViT runs
window attention and full attention over many images, and how the decoder runs packed samples.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("the local SDPA core attention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        """query [s, b, heads, d] (or [t, heads, d] for THD), key/value with fewer heads under GQA.

        Returns [s, b, heads * d] (or [t, heads, d] for THD, which Megatron reshapes).
        """
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        thd = query.dim() == 3
        if thd:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        mask = None
        cu = getattr(packed_seq_params, "cu_seqlens_q", None) if packed_seq_params is not None else None
        if cu is not None:
            mask = block_diagonal_mask(cu, q.shape[2], causal=causal, device=q.device)
            causal = False
        elif attention_mask is not None and mask_type != AttnMaskType.causal:
            mask = ~attention_mask.bool()  # Megatron masks are True where attention is forbidden
        if attention_bias is not None:
            bias = attention_bias if mask is None else attention_bias.masked_fill(~mask, float("-inf"))
            mask = bias
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0, scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        out = out.permute(2, 0, 1, 3)  # [s, b, h, d]
        if thd:
            return out.squeeze(1)
        return out.reshape(out.shape[0], out.shape[1], -1)


def block_diagonal_mask(cu_seqlens: torch.Tensor, total: int, causal: bool, device) -> torch.Tensor:
    """Boolean [total, total] mask, True where a query may attend: same segment (and not ahead)."""
    lengths = torch.diff(cu_seqlens.to(device=device, dtype=torch.long))
    if int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the sequence has {total} tokens")
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    mask = segment[:, None] == segment[None, :]
    if causal:
        mask &= torch.ones(total, total, dtype=torch.bool, device=device).tril()
    return mask


class TokenRotarySelfAttention(SelfAttention):
    """Megatron-Core's SelfAttention, rotating packed (THD) queries and keys in one call.

    Given THD, Megatron's rope splits q and k per packed segment and reads each segment's start
    with `.item()` (rope_utils `_apply_rotary_pos_emb_thd`, "CASE 1": angles for every token): a
    host sync per segment, for q and k, in every layer, and the ViT's window attention has one
    segment per window. The angles here hold one row per token (MRoPE positions, the ViT's 2D
    positions), so that equals one rotation of the whole packed tensor with the same function
    Megatron ends in, done here once per tensor. Other inputs take Megatron's path unchanged.
    """

    def forward(self, hidden_states, *args, rotary_pos_emb=None, packed_seq_params=None, **kwargs):
        tokens = hidden_states.size(0) * (self.config.tensor_model_parallel_size
                                          if self.config.sequence_parallel else 1)
        per_token = (rotary_pos_emb is not None and not isinstance(rotary_pos_emb, tuple)
                     and packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
                     and rotary_pos_emb.size(0) == tokens)
        if not per_token:
            return super().forward(hidden_states, *args, rotary_pos_emb=rotary_pos_emb,
                                   packed_seq_params=packed_seq_params, **kwargs)
        self._token_angles = rotary_pos_emb
        try:
            return super().forward(hidden_states, *args, rotary_pos_emb=None, packed_seq_params=packed_seq_params,
                                   **kwargs)
        finally:
            self._token_angles = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        angles = getattr(self, "_token_angles", None)
        if angles is None:
            return out
        query, key, *rest = out  # [s, b=1, heads, d]: the THD squeeze comes later
        cp = self.pg_collection.cp
        query = apply_rotary_pos_emb(query, angles, config=self.config, cp_group=cp)
        key = apply_rotary_pos_emb(key, angles, config=self.config, cp_group=cp)
        return (query, key, *rest)
