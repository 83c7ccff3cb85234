"""HF -> Megatron torch_dist -> HF is bit-exact, the torch_dist checkpoints load at other layouts
and hold the te spec's key names, and checkpoints with the local spec's older names still load and
export (the `converted` fixture in conftest.py writes them)."""

from __future__ import annotations

import json

import pytest
import torch

from qwen_merge_mcore.checkpoint.safetensors_io import SafetensorsFolder

from .conftest import LAYOUTS, LEGACY, LEGACY_RELOADS, RELOADS


def _assert_same(src, back):
    a, b = SafetensorsFolder(src), SafetensorsFolder(back)
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        x, y = a.get(n), b.get(n)
        assert x.dtype == y.dtype and torch.equal(x, y), n  # bit-exact: no tolerance


@pytest.mark.parametrize("name,layout", [(n, l) for n, ls in LAYOUTS.items() for l in ls], ids=lambda v: str(v))
def test_hf_mcore_hf_bit_exact(converted, name, layout, tmp_path):
    from qwen_merge_mcore.checkpoint.mcore2hf import mcore_to_hf

    ckpt = converted["ckpts"][(name, layout)]
    back = mcore_to_hf(ckpt, tmp_path / "back", progress=False)
    _assert_same(converted["sources"][name], back)
    cfg_src = json.loads((converted["sources"][name] / "config.json").read_text())
    assert json.loads((back / "config.json").read_text()) == cfg_src


@pytest.mark.parametrize("i", range(len(RELOADS)), ids=[f"{n}-{w}-to-{a}" for n, w, a in RELOADS])
def test_checkpoint_loads_at_another_layout(converted, i):
    assert converted["reloaded"][i] == []  # parameters differing from the HF weights at the new layout


def test_checkpoint_keys_are_the_te_spec_names(converted):
    """The converter builds the local spec, yet writes the names Transformer Engine's fused
    layers have (the local spec's sharded_state_dict_keys_map), for the ViT and the decoder."""
    from megatron.core import dist_checkpointing

    from qwen_merge_mcore.checkpoint.common import single_process_group

    with single_process_group():
        keys = set(dist_checkpointing.load_tensors_metadata(str(converted["ckpts"][("merge", (2, 1, None, None))])))
    for part in ("language_model", "vision_model"):
        assert f"{part}.decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys
        assert f"{part}.decoder.layers.mlp.linear_fc1.layer_norm_weight" in keys
    assert not [k for k in keys if "input_layernorm" in k or "pre_mlp_layernorm" in k]


@pytest.mark.parametrize("name", list(LEGACY))
def test_older_local_names_still_export_bit_exact(converted, name, tmp_path):
    from qwen_merge_mcore.checkpoint.mcore2hf import mcore_to_hf

    back = mcore_to_hf(converted["legacy"][name], tmp_path / "back", progress=False)
    _assert_same(converted["sources"][name], back)


@pytest.mark.parametrize("i", range(len(LEGACY_RELOADS)), ids=[f"{n}-to-{a}" for n, a in LEGACY_RELOADS])
def test_older_local_names_still_load_at_another_layout(converted, i):
    assert converted["reloaded"][len(RELOADS) + i] == []


def test_every_rank_reads_only_its_shards(converted):
    """Across ranks each written (key, offset) is unique: replicas are written once, by one rank."""
    for job_index in range(sum(len(v) for v in LAYOUTS.values())):
        items = [(w["key"], tuple(w["offset"])) for rank in converted["written"] for w in rank[job_index]["written"]]
        assert len(items) == len(set(items))
