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
    return {"pixels": pixels, "grid": grid, "expected": merged}


@pytest.fixture(scope="module")
def hf_reference(tiny):
    return _hf_vision_reference(tiny, GRIDS)


def _shard(t: torch.Tensor, dim: int, rank: int, tp: int) -> torch.Tensor:
    return t.chunk(tp, dim=dim)[rank].clone()


def _build_vision(tiny):
    """ViT + plain Qwen2.5-VL projector (no mlp.4) filled from the tiny HF folder via the mapping table."""
    from megatron.core import parallel_state

    from qwen_merge_mcore.checkpoint.mapping import load_hf_weights
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


def _parity_tp2_then_tp1(ref: dict, tiny) -> dict:
    from megatron.core import parallel_state

    results = {"tp2": _parity_case(ref, tiny)}
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    results["tp1"] = _parity_case(ref, tiny)
    return results


def test_vision_and_projector_match_transformers_tp1_tp2(hf_reference, tiny, distributed):
    per_rank = distributed(_parity_tp2_then_tp1, world_size=2, tp=2, args=(hf_reference, tiny))
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
