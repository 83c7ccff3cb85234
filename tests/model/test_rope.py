"""MRoPE angles + Megatron's apply_rotary_pos_emb equal transformers' Qwen2.5-VL rotary embedding;
text-only positions equal Qwen3's 1D RoPE. Float32 on both sides; 1e-5 covers cos/sin of angles
up to ~100 rad computed in a different association order."""

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.transformer_config import TransformerConfig

from qwen_merge_mcore.config import LanguageConfig
from qwen_merge_mcore.models.rope import MultimodalRotaryEmbedding
from qwen_merge_mcore.positions import mrope_position_ids, text_position_ids
from tests.model.references import hf_mrope_cos_sin

LANG = LanguageConfig(num_layers=1, hidden_size=128, num_attention_heads=4, num_query_groups=2, head_dim=64,
                      ffn_hidden_size=256, vocab_size=100, mrope_section=[8, 12, 12])
TOL = 1e-5


def _megatron_rope(q: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """q [B, S, heads, D] -> rotated, through Megatron-Core's unfused rope."""
    config = TransformerConfig(num_layers=1, hidden_size=128, num_attention_heads=4, use_cpu_initialization=True)
    freqs = MultimodalRotaryEmbedding(LANG.head_dim, LANG.rope_theta, LANG.mrope_section)(position_ids)
    out = apply_rotary_pos_emb(q.transpose(0, 1), freqs, config, cp_group=_NoCP())
    return out.transpose(0, 1)


class _NoCP:
    """Context-parallel group of size 1 (apply_rotary_pos_emb asks for one)."""

    def size(self):
        return 1

    def rank(self):
        return 0


def _hf_rope(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    # transformers 5 recomposes the t/h/w sections inside the rotary module, so cos/sin are
    # [B, S, D] and the text-model rope applies them to [B, heads, S, D].
    qh = q.transpose(1, 2)
    out, _ = apply_rotary_pos_emb(qh, qh, cos, sin)
    return out.transpose(1, 2)


def test_mrope_equals_transformers_qwen2_5_vl():
    torch.manual_seed(0)
    ids = torch.tensor([1, 2, 3] + [6] * 6 + [4, 5, 7, 8])  # text, a 2x3 merged image grid, text
    grid = torch.tensor([[1, 4, 6]])
    pos = mrope_position_ids(ids, grid, image_token_id=6, video_token_id=99)
    assert not torch.equal(pos[0], pos[1]), "the test needs distinct t/h/w ids"
    pos = torch.stack([pos, pos.flip(-1)], dim=1)  # [3, B=2, S]
    q = torch.randn(2, pos.shape[-1], 4, LANG.head_dim)
    cos, sin = hf_mrope_cos_sin(LANG, pos)
    assert (_megatron_rope(q, pos) - _hf_rope(q, cos, sin)).abs().max() < TOL


def test_text_positions_equal_qwen3_1d_rope():
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb as hf_apply

    torch.manual_seed(0)
    seq = 50
    q = torch.randn(1, seq, 4, LANG.head_dim)
    cfg = Qwen3Config(hidden_size=128, num_attention_heads=4, head_dim=LANG.head_dim,
                      rope_parameters={"rope_type": "default", "rope_theta": LANG.rope_theta})
    cos, sin = Qwen3RotaryEmbedding(cfg)(q, torch.arange(seq)[None])
    ref, _ = hf_apply(q.transpose(1, 2), q.transpose(1, 2), cos, sin)
    ours = _megatron_rope(q, text_position_ids(seq)[:, None])
    assert (ours - ref.transpose(1, 2)).abs().max() < TOL
