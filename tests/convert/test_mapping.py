"""The HF <-> Megatron mapping table: complete coverage of the fixtures, lossless layouts, and
slices that read only what they return."""

import os

import pytest
import torch

from qwen_merge_mcore.checkpoint.mapping import (ConvAsLinear, FusedQKV, GatedMLP, GroupedQKV, Same, VocabPadded,
                                                 param_mappings, split_layer)
from qwen_merge_mcore.checkpoint.safetensors_io import CheckpointError, SafetensorsFolder
from qwen_merge_mcore.hf_config import model_config_from_hf


@pytest.mark.parametrize("name", ["qwen3", "qwen3-tied", "qwen2_5_vl"])
def test_every_hf_tensor_is_mapped_exactly_once(tiny, name):
    folder = SafetensorsFolder(tiny[name])
    cfg = model_config_from_hf(folder.config())
    hf_names = [h for m in param_mappings(cfg) for h in m.hf]
    assert len(hf_names) == len(set(hf_names))
    assert sorted(hf_names) == sorted(folder.names())


class _Tensors:
    """A folder stand-in serving in-memory tensors, recording the rows each read asks for."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors, self.reads = tensors, []

    def spec(self, name):
        return self.tensors[name]

    def buffer(self, shape, dtype):
        return torch.empty(shape, dtype=dtype)

    def get(self, name, rows=None, out=None):
        t = self.tensors[name] if rows is None else self.tensors[name][rows]
        self.reads.append((name, t.shape[0]))
        return t if out is None else out.copy_(t)


def _cases(g):
    return [
        (GroupedQKV(8, 4, 3), [torch.randn(24, 5, generator=g), torch.randn(12, 5, generator=g),
                               torch.randn(12, 5, generator=g)]),
        (GroupedQKV(8, 4, 3), [torch.randn(24, generator=g), torch.randn(12, generator=g), torch.randn(12, generator=g)]),
        (FusedQKV(4, 4, 2), [torch.randn(24, 8, generator=g)]),
        (FusedQKV(4, 4, 2), [torch.randn(24, generator=g)]),
        (GatedMLP(), [torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)]),
        (Same(), [torch.randn(8, 6, generator=g)]),
        (VocabPadded(10, 16), [torch.randn(10, 3, generator=g)]),
        (ConvAsLinear((4, 3, 2, 2, 2)), [torch.randn(4, 3, 2, 2, 2, generator=g)]),
    ]


def test_layouts_round_trip():
    for transform, hf in _cases(torch.Generator().manual_seed(0)):
        back = transform.unmerge(transform.merge(hf))
        assert all(torch.equal(a, b) for a, b in zip(back, hf)), type(transform).__name__


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_slices_equal_the_merged_tensor(tp):
    """Each TP rank's row chunk (and, for 2-D tensors, a column chunk as row-parallel weights
    take it) read through `megatron_slice` equals that part of `merge`; row-streaming transforms
    read no more rows than the slice holds. SwiGLU's fc1 comes as 2 x TP chunks (Megatron's
    factory stores gate and up apart)."""
    for transform, hf in _cases(torch.Generator().manual_seed(1)):
        names = tuple(f"t{i}" for i in range(len(hf)))
        full = transform.merge(hf)
        dims = [0] if full.dim() == 1 or isinstance(transform, (GatedMLP, VocabPadded)) else [0, 1]
        for dim in dims:
            chunks = 2 * tp if isinstance(transform, GatedMLP) else tp
            for rank, part in enumerate(full.chunk(chunks, dim)):
                index = tuple(slice(rank * part.shape[d], (rank + 1) * part.shape[d]) if d == dim else slice(None)
                              for d in range(full.dim()))
                folder = _Tensors(dict(zip(names, hf)))
                got = transform.megatron_slice(folder, names, index)
                assert torch.equal(got, full[index]), (type(transform).__name__, tp, dim, rank)
                if isinstance(transform, (Same, GatedMLP, VocabPadded)):
                    assert sum(rows for _, rows in folder.reads) <= got.shape[0], type(transform).__name__


def test_grouped_qkv_layout_matches_megatron_split():
    """Megatron views linear_qkv output as [groups, (heads/groups + 2) * head_dim] and splits
    it into q, k, v per group; a rank's row chunk holds whole groups."""
    heads, groups, hd = 4, 2, 1
    q = torch.arange(4.0).view(4, 1)        # q heads 0..3
    k = torch.tensor([[10.0], [11.0]])       # k groups 0, 1
    v = torch.tensor([[20.0], [21.0]])
    fused = GroupedQKV(heads, groups, hd).merge([q, k, v])
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert fused.chunk(2)[1].flatten().tolist() == [2, 3, 11, 21]


def test_gated_mlp_is_gate_then_up_and_refuses_straddling_slices():
    gate, up = torch.arange(4.0).view(4, 1), torch.arange(10.0, 14.0).view(4, 1)
    assert GatedMLP().merge([gate, up]).flatten().tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
    with pytest.raises(CheckpointError, match="straddle gate and up"):
        GatedMLP().megatron_slice(_Tensors({"g": gate, "u": up}), ("g", "u"), (slice(2, 6), slice(None)))


def test_vocab_padding_and_mismatch():
    w = torch.randn(10, 2)
    full = VocabPadded(10, 16).merge([w])
    assert full.shape == (16, 2) and torch.equal(full[:10], w) and not full[10:].any()
    shard = VocabPadded(10, 16).megatron_slice(_Tensors({"w": w}), ("w",), (slice(8, 16), slice(None)))
    assert shard.shape == (8, 2) and torch.equal(shard[:2], w[8:]) and not shard[2:].any()
    with pytest.raises(CheckpointError, match="vocabulary has 9 rows"):
        VocabPadded(10, 16).merge([torch.randn(9, 2)])


def test_layer_names():
    layer = split_layer("language_model.decoder.layers.3.self_attention.linear_qkv.layer_norm_weight")
    assert (layer.head, layer.index, layer.rest) == ("language_model.decoder.layers.", 3,
                                                     "self_attention.linear_qkv.layer_norm_weight")
    assert layer.stacked == "language_model.decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    assert layer.layer == "language_model.decoder.layers.3" and layer.at(7).endswith("layers.7.self_attention."
                                                                                      "linear_qkv.layer_norm_weight")
    stacked = split_layer("vision_model.decoder.layers.mlp.linear_fc1.weight")
    assert stacked.index is None and stacked.at(2) == "vision_model.decoder.layers.2.mlp.linear_fc1.weight"
    assert split_layer("language_model.embedding.word_embeddings.weight") is None


def test_table_uses_the_te_norm_names(tiny):
    cfg = model_config_from_hf(SafetensorsFolder(tiny["qwen2_5_vl"]).config())
    names = [m.megatron for m in param_mappings(cfg)]
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "vision_model.decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in names
    assert not [n for n in names if "input_layernorm" in n or "pre_mlp_layernorm" in n]


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


def test_mapped_reads_equal_positioned_reads(tiny):
    """`mapped` (the converter's zero-copy read) gives the bytes `get` reads, for whole tensors and
    row ranges at offsets that are not page-aligned, and the view outlives the folder object."""
    import gc

    folder = SafetensorsFolder(tiny["qwen3"])
    names = folder.names()
    for name in names:
        rows = folder.spec(name).shape[0]
        for part in (None, slice(1, max(1, rows - 1)), slice(rows - 1, rows)):
            assert torch.equal(folder.mapped(name, part), folder.get(name, rows=part)), (name, part)
    name = max(names, key=lambda n: folder.spec(n).nbytes)
    view, expected = folder.mapped(name, slice(3, 7)), folder.get(name, rows=slice(3, 7))
    del folder
    gc.collect()
    assert torch.equal(view.clone(), expected)


def test_mapped_refuses_a_file_that_ends_early(tiny, tmp_path):
    import shutil

    trunc = tmp_path / "q3"
    shutil.copytree(tiny["qwen3"], trunc)
    folder = SafetensorsFolder(trunc)  # headers checked while the file was whole
    path = trunc / "model.safetensors"
    os.truncate(path, path.stat().st_size - 16)
    failed = []
    for name in folder.names():
        try:
            folder.mapped(name)
        except CheckpointError as err:
            failed.append(str(err))
    assert failed and all("ends early" in f for f in failed), failed
