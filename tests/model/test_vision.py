"""The Megatron ViT + projector against transformers' Qwen2.5-VL vision tower (CPU, gloo, float32).

One spawned pair of ranks runs TP=2 and then TP=1 on the same inputs; the reference comes from
transformers in the test process.
"""

from __future__ import annotations

import pytest
import torch

from qwen_merge_mcore.fixtures.tiny import tiny_model_config
from qwen_merge_mcore.models.vision import frame_cu_seqlens, vision_position_ids, window_index

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
    state = {k: v.clone() for k, v in visual.state_dict().items()}
    return {"pixels": pixels, "grid": grid, "expected": merged, "state": state}


@pytest.fixture(scope="module")
def hf_reference(tiny):
    return _hf_vision_reference(tiny, GRIDS)


def _shard(t: torch.Tensor, dim: int, rank: int, tp: int) -> torch.Tensor:
    return t.chunk(tp, dim=dim)[rank].clone()


def _load_hf_visual(vision_model, projector, hf: dict, rank: int, tp: int) -> None:
    """Temporary HF -> Megatron copy (TP-sharded) until checkpoint/mapping.py lands on main."""
    cfg = tiny_model_config().vision
    heads, head_dim, hidden = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    ours = {"patch_embed.proj.weight": hf["patch_embed.proj.weight"].reshape(hidden, -1)}
    for i in range(cfg.depth):
        src, dst = f"blocks.{i}.", f"decoder.layers.{i}."
        # [q; k; v] of all heads -> per head [q_h, k_h, v_h], then heads split across ranks.
        qkv_w = hf[src + "attn.qkv.weight"].reshape(3, heads, head_dim, hidden).transpose(0, 1)
        qkv_b = hf[src + "attn.qkv.bias"].reshape(3, heads, head_dim).transpose(0, 1)
        gate_up = {part: torch.cat([_shard(hf[f"{src}mlp.{p}_proj.{part}"], 0, rank, tp) for p in ("gate", "up")])
                   for part in ("weight", "bias")}
        ours.update({
            dst + "input_layernorm.weight": hf[src + "norm1.weight"],
            dst + "self_attention.linear_qkv.weight": _shard(qkv_w, 0, rank, tp).reshape(-1, hidden),
            dst + "self_attention.linear_qkv.bias": _shard(qkv_b, 0, rank, tp).reshape(-1),
            dst + "self_attention.linear_proj.weight": _shard(hf[src + "attn.proj.weight"], 1, rank, tp),
            dst + "self_attention.linear_proj.bias": hf[src + "attn.proj.bias"],
            dst + "pre_mlp_layernorm.weight": hf[src + "norm2.weight"],
            dst + "mlp.linear_fc1.weight": gate_up["weight"],
            dst + "mlp.linear_fc1.bias": gate_up["bias"],
            dst + "mlp.linear_fc2.weight": _shard(hf[src + "mlp.down_proj.weight"], 1, rank, tp),
            dst + "mlp.linear_fc2.bias": hf[src + "mlp.down_proj.bias"],
        })
    vision_model.load_state_dict(ours, strict=True)
    merger = {
        "ln_q.weight": hf["merger.ln_q.weight"],
        "linear_fc1.weight": _shard(hf["merger.mlp.0.weight"], 0, rank, tp),
        "linear_fc1.bias": _shard(hf["merger.mlp.0.bias"], 0, rank, tp),
        "linear_fc2.weight": _shard(hf["merger.mlp.2.weight"], 1, rank, tp),
        "linear_fc2.bias": hf["merger.mlp.2.bias"],
    }
    missing, unexpected = projector.load_state_dict(merger, strict=False)
    assert not unexpected and set(missing) <= {"linear_fc3.weight", "linear_fc3.bias"}, (missing, unexpected)


def _build(extra_layer: bool):
    from megatron.core import parallel_state

    from qwen_merge_mcore.config import ParallelConfig, PrecisionConfig
    from qwen_merge_mcore.models.projector import QwenMergeProjector
    from qwen_merge_mcore.models.transformer_config import vision_transformer_config
    from qwen_merge_mcore.models.vision import QwenVisionModel

    model = tiny_model_config()
    model.projector.extra_layer = extra_layer
    parallel = ParallelConfig(tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size())
    config = vision_transformer_config(model.vision, parallel, PrecisionConfig(params_dtype="fp32"))
    return model, QwenVisionModel(config, model.vision, "local").eval(), QwenMergeProjector(config, model, "local")


def _parity_case(ref: dict) -> dict:
    """Max |ours - HF| up to mlp.2, and the extra GELU + mlp.4 against a hand computation."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    _, vision_model, projector = _build(extra_layer=False)
    assert projector.linear_fc3 is None
    _load_hf_visual(vision_model, projector, ref["state"], rank, tp)
    with torch.no_grad():
        merged = projector(vision_model(ref["pixels"], ref["grid"]))
    result = {"mlp2_diff": (merged - ref["expected"]).abs().max().item()}

    model, vision_model, projector = _build(extra_layer=True)
    fc3 = projector.linear_fc3
    result["fc3_init"] = (fc3.weight.std().item(), fc3.bias.abs().max().item(), tuple(fc3.weight.shape))
    _load_hf_visual(vision_model, projector, ref["state"], rank, tp)
    generator = torch.Generator().manual_seed(1)  # the same full weight on every rank
    weight = torch.randn(model.language.hidden_size, model.projector.merger_out_size, generator=generator) * 0.02
    bias = torch.randn(model.language.hidden_size, generator=generator) * 0.1
    with torch.no_grad():
        fc3.weight.copy_(_shard(weight, 1, rank, tp))
        fc3.bias.copy_(bias)
        out = projector(vision_model(ref["pixels"], ref["grid"]))
    by_hand = torch.nn.functional.gelu(ref["expected"]) @ weight.T + bias
    result["fc3_diff"] = (out - by_hand).abs().max().item()
    return result


def _parity_tp2_then_tp1(ref: dict) -> dict:
    from megatron.core import parallel_state

    results = {"tp2": _parity_case(ref)}
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    results["tp1"] = _parity_case(ref)
    return results


def test_vision_and_projector_match_transformers_tp1_tp2(hf_reference, distributed):
    per_rank = distributed(_parity_tp2_then_tp1, world_size=2, tp=2, args=(hf_reference,))
    model = tiny_model_config()
    for rank, results in enumerate(per_rank):
        print(f"rank {rank}: " + "; ".join(f"{tp} max|ours-HF| up to mlp.2 = {r['mlp2_diff']:.2e}, "
                                           f"mlp.4 vs hand = {r['fc3_diff']:.2e}" for tp, r in results.items()))
        for tp, r in results.items():
            assert r["mlp2_diff"] < TOLERANCE, (rank, tp, r)
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
