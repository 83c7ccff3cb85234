"""The GPU path's rules that run on CPU: one data iterator per virtual pipeline stage, DDP's
gradient invariant held by the CPU engine, the param sync before a save, the engine and layout
refusals, the packed rotary path, the MFU peak."""

from __future__ import annotations

import itertools

import pytest
import torch

from qwen_merge_mcore.config import ConfigError, ParallelConfig, config_from_dict

from . import gpu_path_cases as cases
from .helpers import tiny_config


@pytest.fixture(scope="module")
def results(distributed, tmp_path_factory):
    # vpp=1 with PP=1: Megatron's parallel_state refused it before the config treated 1 as none.
    (out,) = distributed(cases.cpu_cases, world_size=1, vpp=1, args=(str(tmp_path_factory.mktemp("gpu_path")),))
    return out


def test_each_virtual_stage_reads_every_microbatch_in_order():
    from megatron.core.pipeline_parallel.schedules import get_schedule_table

    from qwen_merge_mcore.training.gpu_engine import chunk_iterators

    consumed = []
    stream = (consumed.append(i) or i for i in itertools.count())
    chunks, microbatches = 3, 8
    iterators = chunk_iterators(stream, chunks)
    seen = {c: [] for c in range(chunks)}
    # The interleaved schedule's forward order: next() on chunk c's iterator once per forward of c.
    for _, chunk in get_schedule_table(microbatches, chunks, microbatch_group_size_per_vp_stage=2):
        seen[chunk].append(next(iterators[chunk]))
    assert all(seen[c] == list(range(microbatches)) for c in range(chunks)), seen
    assert consumed == list(range(microbatches))  # one step consumes M micro-batches, not chunks x M
    single = iter([])
    assert chunk_iterators(single, 1) is single


def test_cpu_engine_holds_ddp_invariant_with_text_only_last_microbatch(results):
    r = results["ddp"]
    assert not r["skipped"] and r["projector_grads"] and r["loss"] > 0
    # Without the model's zero-weighted encoder pass the CPU engine refuses the step, naming the
    # parameters, as Megatron-Core DDP would stop (it used to zero-fill their gradients).
    assert r["refused"] is not None and "got no gradient in the last micro-batch" in r["refused"], r
    assert "projector.linear_fc1.weight" in r["refused"]


def test_params_are_synced_before_a_save_reads_them(results):
    order = results["save_order"]  # the finiteness check and the state dict both read the weights
    assert [e for i, e in enumerate(order) if i == 0 or e != order[i - 1]] == ["sync params", "read weights", "write"]


def test_packed_forwards_rotate_once_per_tensor(results):
    r = results["rope"]
    assert r["images"] and r["per_segment_calls"] == 0
    assert r["thd_vs_sbhd"] < 1e-5  # float32; same rotation, different attention layout


def test_engine_refusals(monkeypatch):
    from qwen_merge_mcore.training.engine import select_engine

    assert select_engine(tiny_config()) == "cpu"
    with pytest.raises(ConfigError, match="the CPU engine trains in fp32"):
        select_engine(tiny_config(precision={"params_dtype": "bf16"}))
    with pytest.raises(ConfigError, match="gpu needs CUDA"):
        select_engine(tiny_config(train={"engine": "gpu"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_engine(tiny_config(precision={"params_dtype": "bf16"}, train={"engine": "auto"})) == "gpu"
    with pytest.raises(ConfigError, match="fp16 is not supported by the GPU engine") as err:
        select_engine(tiny_config(precision={"params_dtype": "fp16"}, train={"engine": "gpu"}))
    assert err.value.key == "precision.params_dtype"


def test_layouts_that_are_not_implemented_are_refused():
    raw = {"model": {"preset": "tiny"}, "train": {"train_iters": 1}}
    with pytest.raises(ConfigError, match="context parallelism is not implemented") as err:
        config_from_dict({**raw, "parallel": {"context_parallel_size": 2}})
    assert err.value.key == "parallel.context_parallel_size"
    # One virtual stage is no interleaving: Megatron-Core takes only None for that.
    cfg = config_from_dict({**raw, "parallel": {"pipeline_model_parallel_size": 2,
                                                "virtual_pipeline_model_parallel_size": 1}})
    assert cfg.parallel.virtual_pipeline_model_parallel_size is None
    assert ParallelConfig(virtual_pipeline_model_parallel_size=1).virtual_pipeline_model_parallel_size is None
    cfg = config_from_dict({**raw, "parallel": {"virtual_pipeline_model_parallel_size": 1}})
    assert cfg.parallel.virtual_pipeline_model_parallel_size is None
    with pytest.raises(ConfigError, match="need pipeline_model_parallel_size > 1"):
        config_from_dict({**raw, "parallel": {"virtual_pipeline_model_parallel_size": 2}})


def test_wgrad_fusion_only_for_the_gpu_engine(monkeypatch):
    from qwen_merge_mcore.models import language_config

    monkeypatch.setattr(language_config, "_wgrad_fusion_available", lambda: True)
    lang = tiny_config().model.language
    for engine, fused in (("gpu", True), ("auto", False), ("cpu", False)):
        config = language_config.language_transformer_config(
            lang, ParallelConfig(), tiny_config().precision, tiny_config(train={"engine": engine}).train)
        assert config.gradient_accumulation_fusion is fused, engine
    monkeypatch.setattr(language_config, "_wgrad_fusion_available", lambda: False)
    config = language_config.language_transformer_config(lang, ParallelConfig(), tiny_config().precision,
                                                         tiny_config(train={"engine": "gpu"}).train)
    assert not config.gradient_accumulation_fusion  # Megatron's own linears need APEX's kernel


@pytest.mark.parametrize("name, key", [("NVIDIA H100 80GB HBM3", "h100-80gb"), ("NVIDIA H200", "h200-141gb"),
                                       ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None),
                                       ("NVIDIA H200 NVL", None), ("NVIDIA GH200 480GB", None)])
def test_gpu_peak_by_device_name(name, key):
    from qwen_merge_mcore.perf.hardware import gpu_spec_for_device

    spec = gpu_spec_for_device(name)
    assert (spec.name if spec else None) == key


def test_mfu_peak_is_fp8_only_when_the_model_runs_fp8():
    from qwen_merge_mcore.training.observability import peak_tflops

    cfg = config_from_dict({"model": {"preset": "tiny"}, "train": {"train_iters": 1},
                            "precision": {"fp8": "hybrid"}}, check_runtime=False)
    assert peak_tflops(cfg, "NVIDIA H100 80GB HBM3", fp8_model=False) == pytest.approx(989.4)
    assert peak_tflops(cfg, "NVIDIA H100 80GB HBM3", fp8_model=True) == pytest.approx(1978.9)
    assert peak_tflops(cfg, "NVIDIA H100 PCIe", fp8_model=False) is None
    assert peak_tflops(cfg, None, fp8_model=False) is None
    cfg.logging.peak_tflops = 500.0
    assert peak_tflops(cfg, "NVIDIA H100 PCIe", fp8_model=True) == 500.0


def test_later_pipeline_stages_skip_decoding_and_pack_what_the_first_kept(tiny, tmp_path):
    """Two iterators over one stream: the decoding one (first pipeline stage) drops the samples
    whose images fail to decode and tells the other, which decodes nothing and packs the same
    sequences."""
    import collections

    from transformers import AutoTokenizer

    from qwen_merge_mcore.config.schema import DataConfig, DatasetConfig
    from qwen_merge_mcore.data import build_train_iterator
    from qwen_merge_mcore.fixtures.tiny import tiny_model_config
    from qwen_merge_mcore.testing.media import make_image, write_rows

    class Relay:  # the loader's KeptSamples, in one process
        def __init__(self):
            self.bins = collections.deque()

        def publish(self, dropped):
            self.bins.append(list(dropped))

        def receive(self, count):
            dropped = self.bins.popleft()
            assert len(dropped) == count
            return dropped

    good = make_image(60, 90, "JPEG")
    (tmp_path / "good.jpg").write_bytes(good)
    broken = bytearray(good)  # a complete file with a corrupt Huffman table: it fails only at decode
    dht = broken.find(b"\xff\xc4")
    broken[dht + 5:dht + 21] = b"\xff" * 16
    (tmp_path / "undecodable.jpg").write_bytes(bytes(broken))
    rows = [{"id": f"r{i}", "image": "undecodable.jpg" if i in (3, 8) else "good.jpg",
             "conversations": [{"from": "human", "value": f"<image>\nCount {i}."},
                               {"from": "gpt", "value": "There are " + " ".join(["apples"] * (i % 5 + 1)) + "."}]}
            for i in range(12)]
    data = DataConfig(datasets=[DatasetConfig(path=write_rows(tmp_path / "rows.jsonl", rows))], seq_length=256,
                      max_pixels=112 * 112, max_bad_fraction=0.5)
    tokenizer, model = AutoTokenizer.from_pretrained(tiny["qwen3"]), tiny_model_config()
    relay = Relay()
    first = build_train_iterator(data, model, tokenizer, seed=1, step_samples=16, kept_samples=relay)
    later = build_train_iterator(data, model, tokenizer, seed=1, step_samples=16, decode_media=False, kept_samples=relay)
    decoded = [next(first) for _ in range(4)]
    packed = [next(later) for _ in range(4)]
    assert first.bad.counts == later.bad.counts and first.bad.counts["bad_image"] >= 2
    for a, b in zip(decoded, packed):
        assert a.images is not None and b.images is None and b.videos is None
        for field in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not hasattr(later, "images")  # no DALI pipelines built where nothing is decoded
    with pytest.raises(ValueError, match="decode_media=False needs kept_samples"):
        build_train_iterator(data, model, tokenizer, decode_media=False)


def test_pipeline_stages_exchange_dropped_samples(distributed):
    first, later = distributed(cases.kept_samples_case, world_size=2, pp=2)
    assert later == first


def test_transformer_engine_pin_is_the_range_megatron_core_supports():
    import importlib.metadata
    import re
    from pathlib import Path

    from packaging.requirements import Requirement

    ours = re.search(r'"transformer-engine\[pytorch\]([^"]+)"',
                     (Path(__file__).resolve().parents[2] / "setup.py").read_text()).group(1)
    theirs = next(Requirement(r) for r in importlib.metadata.requires("megatron-core")
                  if r.startswith("transformer-engine"))
    for version in ("2.0.0", "2.8.1", "2.9.0", "2.10.0", "2.11.3", "2.12.0"):
        assert theirs.specifier.contains(version) == (version in Requirement(f"te{ours}").specifier), version
