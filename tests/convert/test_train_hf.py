"""Training straight from and to Hugging Face folders (CPU, gloo, the tiny Qwen-Merge).

- `checkpoint.pretrained` = an HF folder: each rank reads its own slices through the mapping
  table; the first step's loss equals that of a run started from the folder's `qmm hf2mcore`
  conversion, at TP 2 and TP 1.
- `checkpoint.save_hf`: the HF folder written by the ranks beside a checkpoint equals `qmm mcore2hf`
  of that checkpoint, tensor for tensor, config and other files byte for byte.
- Export written half way and failed: no output folder, no temp folder left.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from . import train_hf_workers


@pytest.fixture(scope="module")
def merge_hf(tiny, tmp_path_factory):
    from qwen_merge_mcore.checkpoint.build import build_qwen_merge

    return build_qwen_merge(tiny["qwen2_5_vl"], tiny["qwen3"], tmp_path_factory.mktemp("hf") / "merge",
                            progress=False).out


@pytest.fixture(scope="module")
def runs(merge_hf, tiny, distributed, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-hf")
    result = distributed(train_hf_workers.train_from_hf, world_size=2, tp=2,
                         args=(str(merge_hf), str(tiny["qwen3"]), str(root)), timeout=900)[0]
    return root, result


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.endswith(".safetensors")}


@pytest.mark.parametrize("tp", [2, 1])
def test_first_step_loss_from_hf_equals_from_conversion(runs, tp):
    r = runs[1]
    # The same weights in the same model on the same data: equal to the bit.
    assert r[tp]["hf"] == r[tp]["mcore"], r[tp]
    assert r[tp]["hf"] != r["scratch"]  # so that ignoring checkpoint.pretrained fails the line above


def test_bad_pretrained_folders_are_one_clear_line(runs):
    r = runs[1]
    assert "the Hugging Face model (qwen3) is not the configured model: architecture: 'qwen3' != 'qwen_merge'" \
        in r["wrong_model"], r["wrong_model"]
    assert r["missing"].endswith("no-such-folder does not exist"), r["missing"]
    assert "checkpoint.save_hf needs the Hugging Face files" in r["save_hf_without_meta"]
    for message in (r["wrong_model"], r["missing"], r["save_hf_without_meta"]):
        assert "\n" not in message


@pytest.mark.parametrize("tp", [2, 1])
def test_saved_hf_equals_mcore2hf(runs, merge_hf, tmp_path, tp):
    from qwen_merge_mcore.checkpoint.mcore2hf import mcore_to_hf

    ckpt = runs[0] / f"from-hf-tp{tp}" / "iter_0000001"
    saved = ckpt / "hf"
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".hf.")]  # no temp folder left
    exported = mcore_to_hf(ckpt, tmp_path / "exported", progress=False)
    a, b = _tensors(saved), _tensors(exported)
    assert sorted(a) == sorted(b)
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, bad
    assert _files(saved) == _files(exported)  # config (with its dtype), tokenizer, processor, remote code
    assert json.loads((saved / "config.json").read_text())["dtype"] == "bfloat16"
    source = _tensors(Path(merge_hf))
    assert sorted(source) == sorted(a)
    frozen = [k for k in a if k.startswith("visual.blocks.")]
    assert frozen and all(torch.equal(a[k], source[k]) for k in frozen)  # the ViT is frozen
    assert not torch.equal(a["visual.merger.mlp.4.weight"], source["visual.merger.mlp.4.weight"])  # trained


@pytest.mark.parametrize("vpp", [None, 2])
def test_pipeline_stages_export_into_one_folder(runs, merge_hf, vpp):
    """Each pipeline stage (and virtual stage) writes its own layers into the shared output: the
    folder equals the source (HF -> model -> HF through the table is lossless)."""
    out = _tensors(runs[0] / f"export-pp2-vpp{vpp}")
    source = _tensors(Path(merge_hf))
    assert sorted(out) == sorted(source)
    assert not [k for k in out if not torch.equal(out[k], source[k])]


def test_failed_export_leaves_no_folder(merge_hf, tmp_path, monkeypatch):
    """A write that fails half way leaves neither the output nor a temp folder; a rerun writes
    the folder, equal to the source (HF -> model -> HF through the table is lossless)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from qwen_merge_mcore.checkpoint import hf_export
    from qwen_merge_mcore.checkpoint.common import converter_experiment, model_chunks, single_process_group
    from qwen_merge_mcore.checkpoint.hf2mcore import converter_model_config
    from qwen_merge_mcore.checkpoint.hf_source import load_hf_weights
    from qwen_merge_mcore.checkpoint.safetensors_io import SafetensorsFolder
    from qwen_merge_mcore.config import ParallelConfig

    cfg = converter_model_config(SafetensorsFolder(merge_hf))
    out = tmp_path / "ckpt" / "hf"
    out.parent.mkdir()
    real, calls = hf_export.write_unit, []

    def dying_write(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed mid-write")
        return real(*args, **kw)

    with single_process_group():
        ps.initialize_model_parallel(1)
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        try:
            chunks = model_chunks(converter_experiment(cfg, ParallelConfig(), "bf16"))
            load_hf_weights(chunks[0], merge_hf, cfg)
            monkeypatch.setattr(hf_export, "write_unit", dying_write)
            with pytest.raises(RuntimeError, match="killed mid-write"):
                hf_export.export_hf(chunks, out, merge_hf, cfg)
            assert list(out.parent.iterdir()) == []
            monkeypatch.setattr(hf_export, "write_unit", real)
            hf_export.export_hf(chunks, out, merge_hf, cfg)
        finally:
            ps.destroy_model_parallel()
    a, source = _tensors(out), _tensors(Path(merge_hf))
    assert sorted(a) == sorted(source) and all(torch.equal(a[k], source[k]) for k in a)
    assert (out / "model.safetensors.index.json").exists() == (Path(merge_hf) / "model.safetensors.index.json").exists()
