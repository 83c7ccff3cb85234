"""The Megatron ViT + projector against transformers' Qwen2.5-VL vision tower (CPU, gloo, float32).

One spawned pair of ranks runs TP=2 and then TP=1 on the same inputs; the reference comes from
transformers in the test process.
"""

from __future__ import annotations

import pytest
import torch

from qwen_merge_mcore.fixtures.tiny import tiny_model_config
from qwen_merge_mcore.models.vision import check_vision_input, frame_cu_seqlens, vision_position_ids, window_index

# (t, h, w) in patches; window = 4x4 merged units = 8x8 patches. 8x12: non-square, its merged
# 4x6 grid pads to whole windows; 16x8: divides evenly (HF adds an empty window, deduplicated);
# 2x4x4: two frames (video), each its own full-attention segment; 6x10: smaller than a window.
GRIDS = [[1, 8, 12], [1, 16, 8], [2, 4, 4], [1, 6, 10]]
# float32 end to end: the two implementations differ only in summation order (conv vs matmul,
# fused qkv layout, SDPA kernels), about 1e-6 here; the issue asks for 1e-5.
TOLERANCE = 1e-5


def _hf_vision_reference(tiny, grids):
    from transformers import Qwen2_5_VLForConditionalGeneration

    visual = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny["qwen2_5_vl"], dtype=torch.float32).model.visual.eval()
    grid = torch.tensor(grids)
    cfg = tiny_model_config().vision
    generator = torch.Generator().manual_seed(0)
    features = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    pixels = torch.randn(int(grid.prod(-1).sum()), features, generator=generator)
    with torch.no_grad():
        merged = visual(pixels, grid_thw=grid).pooler_output
    return {"pixels": pixels, "grid": grid, "expected": merged}


@pytest.fixture(scope="module")
def hf_reference(tiny):
    return _hf_vision_reference(tiny, GRIDS)


def _shard(t: torch.Tensor, dim: int, rank: int, tp: int) -> torch.Tensor:
    return t.chunk(tp, dim=dim)[rank].clone()


def _build_vision(tiny):
    """ViT + plain Qwen2.5-VL projector (no mlp.4) filled from the tiny HF folder via the mapping table."""
    from megatron.core import parallel_state

    from qwen_merge_mcore.checkpoint.hf_source import load_hf_weights
    from qwen_merge_mcore.config import ParallelConfig, PrecisionConfig
    from qwen_merge_mcore.models.projector import QwenMergeProjector
    from qwen_merge_mcore.models.vision import QwenVisionModel

    model = tiny_model_config()
    model.projector.extra_layer = False
    parallel = ParallelConfig(tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size())
    precision = PrecisionConfig(params_dtype="fp32")
    parts = torch.nn.Module()  # the names the table knows: vision_model.*, projector.*
    parts.vision_model = QwenVisionModel(model.vision, parallel, precision, "local").eval()
    parts.projector = QwenMergeProjector(model, parallel, precision, "local")
    assert parts.projector.linear_fc3 is None
    unused = load_hf_weights(parts, tiny["qwen2_5_vl"], model)
    assert not [name for name in unused if name.startswith("visual.")], unused
    return parts, parallel, precision


def _parity_case(ref: dict, tiny) -> dict:
    """Max |ours - HF| up to mlp.2, and the extra GELU + mlp.4 against a hand computation."""
    from megatron.core import parallel_state

    from qwen_merge_mcore.models.projector import QwenMergeProjector

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    parts, parallel, precision = _build_vision(tiny)
    with torch.no_grad():
        patches = parts.vision_model(ref["pixels"], ref["grid"])
        merged = parts.projector(patches)
    result = {"mlp2_diff": (merged - ref["expected"]).abs().max().item()}
    # The te backend's packing (THD through Megatron's attention and THD rope), run here with
    # the SDPA core attention.
    parts.vision_model.qkv_format = "thd"
    with torch.no_grad():
        thd = parts.projector(parts.vision_model(ref["pixels"], ref["grid"]))
    result["thd_diff"] = (thd - ref["expected"]).abs().max().item()

    model = tiny_model_config()
    projector = QwenMergeProjector(model, parallel, precision, "local")
    fc3 = projector.linear_fc3
    result["fc3_init"] = (fc3.weight.std().item(), fc3.bias.abs().max().item(), tuple(fc3.weight.shape))
    missing, unexpected = projector.load_state_dict(parts.projector.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["linear_fc3.bias", "linear_fc3.weight"], (missing, unexpected)
    generator = torch.Generator().manual_seed(1)  # the same full weight on every rank
    weight = torch.randn(model.language.hidden_size, model.projector.merger_out_size, generator=generator) * 0.02
    bias = torch.randn(model.language.hidden_size, generator=generator) * 0.1
    with torch.no_grad():
        fc3.weight.copy_(_shard(weight, 1, rank, tp))
        fc3.bias.copy_(bias)
        out = projector(patches)
    by_hand = torch.nn.functional.gelu(ref["expected"]) @ weight.T + bias
    result["fc3_diff"] = (out - by_hand).abs().max().item()
    return result


def _rope_case(tiny) -> dict:
    """Our 2D angles through Megatron's apply_rotary_pos_emb (SBHD and per-token THD) against
    transformers' vision rope (rotate_half with cos/sin of [seq, head_dim])."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VLVisionRotaryEmbedding,
                                                                    apply_rotary_pos_emb_vision)

    from qwen_merge_mcore.models.vision import VisionRotaryEmbedding

    cfg = tiny_model_config().vision
    grid = torch.tensor(GRIDS)
    positions = vision_position_ids(grid, cfg.spatial_merge_size)
    hf_rope = Qwen2_5_VLVisionRotaryEmbedding(AutoConfig.from_pretrained(tiny["qwen2_5_vl"]).vision_config)
    q = torch.randn(positions.shape[0], cfg.num_heads, cfg.head_dim, generator=torch.Generator().manual_seed(2))
    cos, sin = hf_rope(q, positions)
    expected, _ = apply_rotary_pos_emb_vision(q, q, cos, sin)
    angles = VisionRotaryEmbedding(cfg.head_dim, cfg.rope_theta)(positions)
    config = _build_config()
    sbhd = apply_rotary_pos_emb(q[:, None], angles, config).squeeze(1)
    cu = window_index(grid, cfg.spatial_merge_size, cfg.window_size // cfg.spatial_merge_size // cfg.patch_size)[1]
    thd = apply_rotary_pos_emb(q, angles, config, cu_seqlens=cu)
    return {"sbhd": (sbhd - expected).abs().max().item(), "thd": (thd - expected).abs().max().item()}


def _build_config(params_dtype: str = "fp32"):
    from qwen_merge_mcore.config import ParallelConfig, PrecisionConfig
    from qwen_merge_mcore.models.vision import vision_transformer_config

    return vision_transformer_config(tiny_model_config().vision, ParallelConfig(),
                                     PrecisionConfig(params_dtype=params_dtype))


def _parity_tp2_then_tp1(ref: dict, tiny) -> dict:
    from megatron.core import parallel_state

    results = {"tp2": _parity_case(ref, tiny)}
    results["tp2"]["rope"] = _rope_case(tiny)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    results["tp1"] = _parity_case(ref, tiny)
    return results


def test_vision_and_projector_match_transformers_tp1_tp2(hf_reference, tiny, distributed):
    per_rank = distributed(_parity_tp2_then_tp1, world_size=2, tp=2, args=(hf_reference, tiny))
    model = tiny_model_config()
    for rank, results in enumerate(per_rank):
        print(f"rank {rank}: " + "; ".join(f"{tp} max|ours-HF| up to mlp.2 = {r['mlp2_diff']:.2e}, "
                                           f"THD packing = {r['thd_diff']:.2e}, mlp.4 vs hand = {r['fc3_diff']:.2e}"
                                           for tp, r in results.items()) + f"; rope vs HF {results['tp2']['rope']}")
        for tp, r in results.items():
            assert r["mlp2_diff"] < TOLERANCE, (rank, tp, r)
            assert r["thd_diff"] < TOLERANCE, (rank, tp, r)
            if "rope" in r:  # the same float32 formula both sides, up to the cos/sin kernels
                assert max(r["rope"].values()) < 1e-6, r["rope"]
            # fc3 adds one more float32 matmul over 192 inputs; same bound.
            assert r["fc3_diff"] < TOLERANCE, (rank, tp, r)
            std, bias_max, shape = r["fc3_init"]
            tp_size = int(tp[2:])
            assert shape == (model.language.hidden_size, model.projector.merger_out_size // tp_size)
            # 128 x 192 / tp samples of N(0, 0.02): the sample std is within 5% with margin.
            assert abs(std - model.projector.init_std) < 0.05 * model.projector.init_std, (tp, std)
            assert bias_max == 0.0


def test_layout_matches_transformers():
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    cfg = tiny_model_config().vision
    for grids in (GRIDS, [[1, 2, 2]], [[3, 8, 8], [1, 10, 4]]):
        grid = torch.tensor(grids)
        ours = window_index(grid, cfg.spatial_merge_size, cfg.window_size // cfg.spatial_merge_size // cfg.patch_size)
        theirs = get_vision_window_index(grid, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1]), grids
        assert torch.equal(frame_cu_seqlens(grid), get_vision_cu_seqlens(grid))
        assert torch.equal(vision_position_ids(grid, cfg.spatial_merge_size),
                           get_vision_position_ids(grid, cfg.spatial_merge_size))


def test_bad_input_is_named():
    cfg = tiny_model_config().vision
    features = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    grid = torch.tensor([[1, 4, 6]])
    check_vision_input(torch.zeros(24, features), grid, cfg)
    cases = [
        (torch.zeros(24, features), torch.tensor([1, 4, 6]), "grid_thw must be"),
        (torch.zeros(15, features), torch.tensor([[1, 3, 5]]), "multiples of the spatial merge size 2"),
        (torch.zeros(20, features), grid, r"pixel_values must be \[24, 1176\]"),
        (torch.zeros(24, features - 1), grid, r"pixel_values must be \[24, 1176\]"),
    ]
    for pixels, bad_grid, message in cases:
        with pytest.raises(ValueError, match=message):
            check_vision_input(pixels, bad_grid, cfg)


def _bf16_parts(tiny, backend: str):
    from qwen_merge_mcore.checkpoint.hf_source import load_hf_weights
    from qwen_merge_mcore.config import ParallelConfig, PrecisionConfig
    from qwen_merge_mcore.models.projector import QwenMergeProjector
    from qwen_merge_mcore.models.vision import QwenVisionModel

    model = tiny_model_config()
    model.projector.extra_layer = False
    precision = PrecisionConfig(params_dtype="bf16")
    parts = torch.nn.Module()
    parts.vision_model = QwenVisionModel(model.vision, ParallelConfig(), precision, backend)
    parts.projector = QwenMergeProjector(model, ParallelConfig(), precision, backend)
    load_hf_weights(parts, tiny["qwen2_5_vl"], model)
    return parts.cuda().to(torch.bfloat16).eval()


def _te_attention_case() -> float:
    """Transformer Engine's THD attention over the ViT's window segments against torch SDPA run
    segment by segment in float32. q and k have std 1.5 (logits std 2.25): peaked enough that
    one segment over all tokens differs from the reference by 3.1 (max abs, checked with the SDPA
    core attention), flat enough that bf16 inputs stay within 1.5e-2 (same check)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    cfg = tiny_model_config().vision
    config = _build_config(params_dtype="bf16")
    attention = TEDotProductAttention(config, layer_number=1, attn_mask_type=AttnMaskType.no_mask,
                                      attention_type="self")
    grid = torch.tensor(GRIDS)
    cu = window_index(grid, cfg.spatial_merge_size, cfg.window_size // cfg.spatial_merge_size // cfg.patch_size)[1]
    total, heads, dim = int(cu[-1]), cfg.num_heads, cfg.head_dim
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(total, heads, dim, generator=generator) * scale for scale in (1.5, 1.5, 1.0))
    longest = int((cu[1:] - cu[:-1]).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu.cuda(), cu_seqlens_kv=cu.cuda(),
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    with torch.no_grad():
        out = attention(*(x.cuda().bfloat16() for x in (q, k, v)), None, attn_mask_type=AttnMaskType.no_mask,
                        packed_seq_params=params).float().cpu().reshape(total, heads, dim)
    lengths = (cu[1:] - cu[:-1]).tolist()
    expected = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in seg)).squeeze(0)
        .transpose(0, 1) for seg in zip(q.split(lengths), k.split(lengths), v.split(lengths))])
    return (out - expected).abs().max().item()


def _te_case(ref: dict, tiny) -> dict:
    """bf16 on one GPU: te (THD packed attention) against local (SDPA), packed against one image
    at a time, and TE's THD attention against per-segment SDPA."""
    pixels, grid = ref["pixels"].cuda(), ref["grid"].cuda()
    outputs = {}
    with torch.no_grad():
        for backend in ("te", "local"):
            parts = _bf16_parts(tiny, backend)
            assert parts.vision_model.qkv_format == ("thd" if backend == "te" else "sbhd")
            outputs[backend] = parts.projector(parts.vision_model(pixels, grid)).float()
        te = _bf16_parts(tiny, "te")
        sizes = grid.prod(-1).tolist()
        separate = torch.cat([te.projector(te.vision_model(p, g[None]))
                              for p, g in zip(pixels.split(sizes), grid)]).float()
    scale = outputs["local"].abs().max().item()
    return {"te_vs_local": (outputs["te"] - outputs["local"]).abs().max().item() / scale,
            "packed_vs_separate": (outputs["te"] - separate).abs().max().item() / scale,
            "te_vs_hf_fp32": (outputs["te"].cpu() - ref["expected"]).abs().max().item() / scale,
            "thd_attention_abs": _te_attention_case()}


@pytest.mark.gpu
@pytest.mark.te
def test_te_backend_thd_packed_matches_local_and_separate_bf16(hf_reference, tiny, distributed):
    (result,) = distributed(_te_case, world_size=1, tp=1, args=(hf_reference, tiny))
    print(result)
    # bf16 keeps 8 mantissa bits: the local backend in bf16 on CPU is 6.7e-3 (relative to the
    # output's largest magnitude) from the float32 reference, so 2e-2 bounds bf16 rounding of
    # either backend. With these tiny random weights attention is flat, so a window/full mix-up
    # moves the output only ~2%: the sharp check of the packing is the peaked-attention one
    # (bf16 rounding 1.5e-2, wrong segments 3.1; see _te_attention_case).
    for key in ("te_vs_local", "packed_vs_separate", "te_vs_hf_fp32"):
        assert result[key] < 2e-2, result
    assert result["thd_attention_abs"] < 5e-2, result
