"""FLOP accounting against a hand count, transformers' window layout and Megatron's formula."""

import pytest
import torch

from qwen_merge_mcore.batch import Batch, VisionInput
from qwen_merge_mcore.fixtures.tiny import tiny_model_config
from qwen_merge_mcore.perf.flops import BatchStats, forward_flops, step_flops, window_lengths
from qwen_merge_mcore.perf.models import plan_model

# One 168 x 280 px image = grid (1, 12, 20) patches, in a packed row of samples 60 + 40 tokens.
GRID = (1, 12, 20)
BATCH = BatchStats(tokens=100, sample_lengths=(60, 40), image_grids=(GRID,))


def test_forward_flops_match_hand_count():
    """Tiny preset, every GEMM counted by hand (2*m*n*k):
    ViT: patch embed 2*240*1176*128 = 72,253,440; per block and patch 2*(3*128^2 + 128^2 + 3*128*172)
    = 263,168, x 4 blocks x 240 patches = 252,641,280. Merged grid 6 x 10 in windows of 4 x 4 merged
    tokens -> windows of 64, 64, 32, 32, 32, 16 patches; attention 4*128*(2 full blocks * 240^2
    + 2 window blocks * 11,520) = 70,778,880.
    Projector on 60 merged tokens: 2*60*(512*512 + 512*192 + 192*128) = 46,202,880.
    Decoder, 4 layers x 100 tokens x 2*(128*(256+2*128) + 256*128 + 3*128*256) = 157,286,400;
    causal attention 4 layers x 4*256*(60^2 + 40^2)/2 = 10,649,600.
    Logits over the vocabulary padded 1000 -> 1024: 2*100*128*1024 = 26,214,400."""
    f = forward_flops(tiny_model_config(), BATCH)
    assert f.vision_linear == 72_253_440 + 252_641_280
    assert f.vision_attention == 70_778_880
    assert f.projector == 46_202_880
    assert f.decoder_linear == 157_286_400
    assert f.decoder_attention == 10_649_600
    assert f.logits == 26_214_400
    # 3x forward when everything trains; a frozen ViT (first part, nothing before it) costs 1x.
    total = 636_026_880
    assert step_flops(tiny_model_config(), BATCH) == 3 * total
    assert step_flops(tiny_model_config(), BATCH, freeze=["vision"]) == 395_673_600 + 3 * 240_353_280
    # Frozen LLM behind a trained projector: forward + input gradients only (2x).
    assert step_flops(tiny_model_config(), BATCH, freeze=["vision", "language"]) == (
        395_673_600 + 3 * 46_202_880 + 2 * (240_353_280 - 46_202_880))
    # Full recompute adds one decoder forward, selective one attention forward.
    assert step_flops(tiny_model_config(), BATCH, recompute="full") == 3 * total + 157_286_400 + 10_649_600
    assert step_flops(tiny_model_config(), BATCH, recompute="selective") == 3 * total + 10_649_600


def test_window_lengths_match_transformers():
    """Window segments equal those transformers' Qwen2.5-VL vision tower derives (cu_window_seqlens)."""
    from transformers.vision_utils import get_vision_window_index

    vis = tiny_model_config().vision
    for grid in [(1, 12, 20), (2, 16, 16), (1, 4, 6), (1, 34, 18)]:
        _, cu = get_vision_window_index(torch.tensor([grid]), vis.spatial_merge_size, vis.window_size, vis.patch_size)
        cu = torch.as_tensor(cu)
        assert window_lengths(grid, vis) == [n for n in torch.diff(cu).tolist() if n > 0]


def test_decoder_flops_match_megatron_formula():
    """Llama3-8B, 8192-token rows: our count with the full s x s attention equals Megatron-LM's
    `num_floating_point_operations` (GQA, SwiGLU, logits; its pre-causal version), exactly up
    to float rounding (rel 1e-12)."""
    target = plan_model("llama3-8b")
    lang = target.model.language
    s, batch = 8192, BatchStats(tokens=2 * 8192, sample_lengths=(8192, 8192))
    h, L = lang.hidden_size, lang.num_layers
    ratio = lang.num_attention_heads * lang.head_dim / h
    megatron = 12 * 2 * s * L * h * h * (
        (1 + lang.num_query_groups / lang.num_attention_heads + s / h) * ratio
        + lang.ffn_hidden_size / h * 1.5  # gated linear unit: 3 GEMMs, not 2
        + lang.padded_vocab_size(1) / (2 * L * h))
    ours = step_flops(target.model, batch, causal=False)
    assert ours == pytest.approx(megatron, rel=1e-12)
    # The causal count halves exactly the score/value products.
    att = forward_flops(target.model, batch, causal=False).decoder_attention
    assert ours - step_flops(target.model, batch) == pytest.approx(3 * att / 2, rel=1e-12)


def test_batch_stats_from_packed_batch():
    tokens = torch.zeros(1, 12, dtype=torch.long)
    batch = Batch(tokens=tokens, labels=tokens, loss_mask=tokens, position_ids=torch.zeros(3, 1, 12, dtype=torch.long),
                  cu_seqlens=torch.tensor([0, 5, 9, 12], dtype=torch.int32),
                  images=VisionInput(torch.zeros(4 * 6 + 8 * 4, 1176), torch.tensor([[1, 4, 6], [2, 2, 4]])))
    stats = BatchStats.from_batch(batch)
    assert stats == BatchStats(tokens=12, sample_lengths=(5, 4, 3), image_grids=((1, 4, 6), (2, 2, 4)))
    unpacked = Batch(tokens=torch.zeros(2, 6, dtype=torch.long), labels=tokens, loss_mask=tokens,
                     position_ids=torch.zeros(3, 2, 6, dtype=torch.long))
    assert BatchStats.from_batch(unpacked).sample_lengths == (6, 6)
    with pytest.raises(ValueError, match="sum to"):
        BatchStats(tokens=10, sample_lengths=(4, 4))
