"""The HF <-> Megatron mapping table: complete coverage of the fixtures and lossless transforms."""

import pytest
import torch

from qwen_merge_mcore.checkpoint.mapping import (ConvAsLinear, FusedQKV, GatedMLP, GroupedQKV, RowSplit,
                                                 VocabSplit, param_mappings, to_backend_name, to_local_name)
from qwen_merge_mcore.checkpoint.safetensors_io import CheckpointError, SafetensorsFolder
from qwen_merge_mcore.hf_config import model_config_from_hf


@pytest.mark.parametrize("name", ["qwen3", "qwen3-tied", "qwen2_5_vl"])
def test_every_hf_tensor_is_mapped_exactly_once(tiny, name):
    folder = SafetensorsFolder(tiny[name])
    cfg = model_config_from_hf(folder.config())
    hf_names = [h for m in param_mappings(cfg) for h in m.hf]
    assert len(hf_names) == len(set(hf_names))
    assert sorted(hf_names) == sorted(folder.names())


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_transforms_round_trip(tp):
    g = torch.Generator().manual_seed(0)
    cases = [
        (GroupedQKV(8, 4, 3), [torch.randn(24, 5, generator=g), torch.randn(12, 5, generator=g),
                               torch.randn(12, 5, generator=g)]),
        (GroupedQKV(8, 4, 3), [torch.randn(24, generator=g), torch.randn(12, generator=g), torch.randn(12, generator=g)]),
        (FusedQKV(4, 4, 2), [torch.randn(24, 8, generator=g)]),
        (FusedQKV(4, 4, 2), [torch.randn(24, generator=g)]),
        (GatedMLP(), [torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)]),
        (RowSplit(), [torch.randn(3, 8, generator=g)]),
        (VocabSplit(10, 16), [torch.randn(10, 3, generator=g)]),
        (ConvAsLinear((4, 3, 2, 2, 2)), [torch.randn(4, 3, 2, 2, 2, generator=g)]),
    ]
    for transform, hf in cases:
        shards = [transform.to_megatron(hf, r, tp) for r in range(tp)]
        back = transform.to_hf(shards)
        assert all(torch.equal(a, b) for a, b in zip(back, hf)), type(transform).__name__


def test_grouped_qkv_layout_matches_megatron_split():
    """Megatron views linear_qkv output as [groups, (heads/groups + 2) * head_dim] and splits
    it into q, k, v per group; a rank holds whole groups."""
    heads, groups, hd = 4, 2, 1
    q = torch.arange(4.0).view(4, 1)        # q heads 0..3
    k = torch.tensor([[10.0], [11.0]])       # k groups 0, 1
    v = torch.tensor([[20.0], [21.0]])
    fused = GroupedQKV(heads, groups, hd).to_megatron([q, k, v], 0, 1)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert GroupedQKV(heads, groups, hd).to_megatron([q, k, v], 1, 2).flatten().tolist() == [2, 3, 11, 21]


def test_gated_mlp_rank_holds_its_gate_then_up():
    gate, up = torch.arange(4.0).view(4, 1), torch.arange(10.0, 14.0).view(4, 1)
    assert GatedMLP().to_megatron([gate, up], 1, 2).flatten().tolist() == [2, 3, 12, 13]


def test_vocab_padding_and_mismatch():
    w = torch.randn(10, 2)
    shard = VocabSplit(10, 16).to_megatron([w], 1, 2)
    assert shard.shape == (8, 2) and torch.equal(shard[:2], w[8:]) and not shard[2:].any()
    with pytest.raises(CheckpointError, match="vocabulary has 9 rows"):
        VocabSplit(10, 16).to_megatron([torch.randn(9, 2)], 0, 1)


def test_te_names():
    name = "language_model.decoder.layers.3.input_layernorm.weight"
    te = to_backend_name(name, "te")
    assert te == "language_model.decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert to_local_name(te) == name and to_backend_name(name, "local") == name
    assert to_local_name(to_backend_name("x.layers.0.pre_mlp_layernorm.weight", "te")) == "x.layers.0.pre_mlp_layernorm.weight"


def test_folder_errors(tiny, tmp_path):
    import shutil

    bad = tmp_path / "vlm"
    shutil.copytree(tiny["qwen2_5_vl"], bad)
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard.*{shard.name}"):
        SafetensorsFolder(bad)
    trunc = tmp_path / "q3"
    shutil.copytree(tiny["qwen3"], trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        SafetensorsFolder(trunc).get("model.norm.weight")
