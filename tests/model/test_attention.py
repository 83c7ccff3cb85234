"""The local SDPA core attention: packed sequences equal separate ones; GQA; causal."""

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from qwen_merge_mcore.models.attention import SDPACoreAttention, block_diagonal_mask


def _attn(mask_type):
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            use_cpu_initialization=True)
    return SDPACoreAttention(cfg, 1, mask_type, "self").eval()  # no attention dropout


def _reference(q, k, v, causal):
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / q.shape[-1] ** 0.5
    if causal:
        s = q.shape[0]
        scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)
    return out.reshape(out.shape[0], out.shape[1], -1)


def test_packed_equals_separate_causal_and_bidirectional():
    torch.manual_seed(0)
    lengths = [5, 3, 7]
    for mask_type, causal in ((AttnMaskType.causal, True), (AttnMaskType.no_mask, False)):
        attn = _attn(mask_type)
        qs = [torch.randn(n, 1, 4, 8) for n in lengths]
        ks = [torch.randn(n, 1, 2, 8) for n in lengths]
        vs = [torch.randn(n, 1, 2, 8) for n in lengths]
        cu = torch.tensor([0, 5, 8, 15], dtype=torch.int32)
        params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
        packed = attn(torch.cat(qs), torch.cat(ks), torch.cat(vs), None, packed_seq_params=params)
        separate = torch.cat([_reference(q, k, v, causal) for q, k, v in zip(qs, ks, vs)])
        assert (packed - separate).abs().max() < 1e-5


def test_thd_layout():
    attn = _attn(AttnMaskType.no_mask)
    q, k, v = torch.randn(6, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    out = attn(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu))
    assert out.shape == (6, 4, 8)
    first = _reference(q[:2, None], k[:2, None], v[:2, None], False).reshape(2, 4, 8)
    assert (out[:2] - first).abs().max() < 1e-5


def test_block_diagonal_mask():
    m = block_diagonal_mask(torch.tensor([0, 2, 3]), 3, causal=True, device="cpu")
    assert m.tolist() == [[True, False, False], [True, True, False], [False, False, True]]
