"""Planner: refusals with reasons, the 32B plan, the override, and the calibration check."""

import dataclasses
import json
import subprocess
import sys

import pytest

from qwen_merge_mcore.config import load_config
from qwen_merge_mcore.perf.hardware import GiB, gpu_spec
from qwen_merge_mcore.perf.memory import parameter_counts
from qwen_merge_mcore.perf.models import plan_model
from qwen_merge_mcore.perf.planner import (CostModel, Layout, LayoutChoice, LayoutError, Workload, check_layout,
                                           estimate, plan)
from qwen_merge_mcore.perf.references import CALIBRATION, REFERENCES, VALIDATION, calibrate, predict

H100 = gpu_spec("h100-80gb")
QWEN32 = plan_model("qwen-merge-72bvit-32b")
WORK = Workload(seq_length=8192, global_batch_samples=2048, sample_length=2048, image_grids_per_sample=((1, 36, 36),))


def qmm(*args):
    return subprocess.run([sys.executable, "-m", "qwen_merge_mcore", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("layout, reason", [
    (Layout(tp=8, pp=4, cp=1, dp=8), "does not divide model.vision.intermediate_size=3420"),
    (Layout(tp=3, pp=1, cp=1, dp=1), "does not divide model.language.num_attention_heads=64"),
    (Layout(tp=4, pp=3, cp=1, dp=1), "num_layers=64 does not divide into 3 stages"),
    (Layout(tp=4, pp=4, cp=1, dp=4, vpp=3), "does not divide into 4 stages x 3 virtual"),
    (Layout(tp=4, pp=4, cp=1, dp=4, first_stage_layers=5), "remaining 59 decoder layers do not divide"),
    (Layout(tp=4, pp=4, cp=1, dp=4, vpp=2, first_stage_layers=4), "cannot be combined with virtual pipeline"),
    (Layout(tp=4, pp=1, cp=1, dp=4096), "2048 samples per step leave some of the micro_batch x DP = 4096 slots"),
    (Layout(tp=4, pp=1, cp=1, dp=4, micro_batch=2), "one packed sequence per micro-batch"),
    (Layout(tp=2, pp=1, cp=3, dp=1), r"not divisible by 2\*CP=6"),
    (Layout(tp=2, pp=1, cp=1, dp=1, recompute="always"), "recompute must be one of"),
])
def test_impossible_layouts_are_refused_with_reason(layout, reason):
    with pytest.raises(LayoutError, match=reason):
        check_layout(QWEN32, WORK, layout, H100)


def test_impossible_requests_are_refused_with_reason():
    with pytest.raises(LayoutError, match="no valid layout .* does not divide model.vision.intermediate_size"):
        plan(QWEN32, WORK, 256, H100, LayoutChoice(tp=8, vision="sharded"))
    with pytest.raises(LayoutError, match="replicated ViT needs a frozen ViT"):
        check_layout(QWEN32, dataclasses.replace(WORK, freeze=()), Layout(tp=8, pp=1, cp=1, dp=32,
                                                                          vision="replicated"), H100)
    with pytest.raises(LayoutError, match="fits in 79.6 GiB .* needs"):
        plan(QWEN32, WORK, 4, H100)  # 32B + ViT on 4 GPUs: 18 bytes per parameter alone exceed 80 GB
    out = qmm("plan", "--preset", "qwen-merge-72bvit-32b", "--gpus", "256", "--tp", "8", "--vision", "sharded")
    assert out.returncode == 1 and "intermediate_size=3420" in out.stderr
    out = qmm("plan", "--preset", "qwen-merge-72bvit-32b", "--gpus", "0")
    assert out.returncode == 1 and "--gpus must be > 0" in out.stderr


def test_32b_on_256_h100_fits_with_predicted_mfu(tmp_path):
    override = tmp_path / "plan.yaml"
    out = qmm("plan", "--preset", "qwen-merge-72bvit-32b", "--gpus", "256", "--gpu", "h100-80gb", "--seq-length",
              "8192", "--global-batch-samples", "512", "--json", "--top", "3", "--write-override", str(override))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    model = QWEN32.model
    assert doc["parameters"] == parameter_counts(model).total == 33_504_219_136
    best = doc["layouts"][0]
    assert best["fits"] and best["memory_gib"] <= H100.memory_bytes / GiB and best["headroom_gib"] >= 0
    assert 0.2 < best["mfu"] < 0.7  # a bf16 dense model on H100 (published runs: 0.35-0.5)
    assert best["tokens_per_s_per_gpu"] == pytest.approx(
        512 * 2048 / best["step_time_s"] / 256, rel=1e-9)  # 512 samples of 2048 tokens: 128 sequences
    assert [x["step_time_s"] for x in doc["layouts"]] == sorted(x["step_time_s"] for x in doc["layouts"])
    # The override loads as a training config with the chosen layout (schema key names).
    cfg = load_config(override, ["train.train_iters=1"], check_runtime=False, world_size=256)
    lay = best["layout"]
    assert cfg.parallel.tensor_model_parallel_size == lay["tp"]
    assert cfg.parallel.pipeline_model_parallel_size == lay["pp"]
    assert cfg.parallel.virtual_pipeline_model_parallel_size == lay["vpp"]
    assert cfg.parallel.context_parallel_size == lay["cp"]
    assert cfg.parallel.first_stage_layers == lay["first_stage_layers"]
    assert cfg.train.micro_batch_size == lay["micro_batch"] and cfg.train.global_batch_samples == 512
    assert cfg.train.recompute_granularity == lay["recompute"]
    assert cfg.model.language.num_layers == 64


def test_tiny_plan_parameters_equal_built_model(tiny):
    """`parameters` is the Megatron count (vocabulary 1000 padded to 1024);
    `parameters_unpadded` is what the built HF tiny checkpoints hold."""
    import torch
    from safetensors import safe_open

    out = qmm("plan", "--preset", "tiny", "--gpus", "8", "--seq-length", "1024", "--global-batch-samples", "16",
              "--sample-length", "256", "--image-pixels", "50176", "--json", "--top", "1")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)

    def count(folder, prefix):
        n = 0
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                n += sum(st.get_slice(k).get_shape().numel() if hasattr(st.get_slice(k).get_shape(), "numel")
                         else int(torch.tensor(st.get_slice(k).get_shape()).prod()) for k in st.keys()
                         if k.startswith(prefix))
        return n

    vision = count(tiny["qwen2_5_vl"], "visual.")  # ViT + merger (no mlp.4 in a plain Qwen2.5-VL)
    llm = count(tiny["qwen3"], "")
    lang = plan_model("tiny").model.language
    fc3 = 192 * lang.hidden_size + lang.hidden_size
    assert doc["parameters_unpadded"] == vision + fc3 + llm
    assert doc["parameters"] == doc["parameters_unpadded"] + 24 * lang.hidden_size * 2  # 1000 -> 1024, untied


def test_pipeline_model_behaves():
    lay = dict(tp=4, cp=1, dp=8)
    flat = estimate(QWEN32, WORK, Layout(pp=8, **lay), H100)
    inter = estimate(QWEN32, WORK, Layout(pp=8, vpp=4, **lay), H100)
    assert inter.step_breakdown["bubble"] < flat.step_breakdown["bubble"]  # VPP shrinks the bubble
    assert inter.memory_bytes > flat.memory_bytes  # ... and holds more micro-batches in flight
    # The first stage carries the ViT: with the ViT training, giving that stage fewer decoder
    # layers (6 + ViT vs 10 on the middle stages) balances it against them.
    qwen4, trained = plan_model("qwen-merge-72bvit-4b"), dataclasses.replace(WORK, freeze=())
    even = estimate(qwen4, trained, Layout(tp=2, pp=4, cp=1, dp=8), H100)
    uneven = estimate(qwen4, trained, Layout(tp=2, pp=4, cp=1, dp=8, first_stage_layers=6), H100)
    assert [r.layers for r in uneven.ranks] == [6, 10, 10, 10]
    gap = [abs(e.ranks[0].time_s - e.ranks[1].time_s) for e in (even, uneven)]
    assert uneven.ranks[0].time_s < even.ranks[0].time_s and gap[1] < gap[0] / 4
    full = estimate(QWEN32, WORK, Layout(pp=8, recompute="full", **lay), H100)
    assert full.memory_bytes < flat.memory_bytes and full.step_time_s > flat.step_time_s
    assert full.hardware_flops > full.model_flops == flat.model_flops


def test_calibration_reproduces_constant_and_predicts_second_point():
    """Fit the FP8 GEMM efficiency on NeMo's Llama3-70B FP8 / 64 H100 (734 TFLOP/s/GPU); the
    stored constant is that fit (rel 1%), and it predicts Llama3-8B FP8 / 8 H100 (711) within 20%."""
    fitted = calibrate(REFERENCES[CALIBRATION])
    assert fitted.linear_efficiency_fp8 == pytest.approx(CostModel().linear_efficiency_fp8, rel=0.01)
    assert predict(REFERENCES[CALIBRATION]).tflops_error == pytest.approx(0, abs=0.01)
    second = predict(REFERENCES[VALIDATION], fitted)
    assert second.reference.model != REFERENCES[CALIBRATION].model
    assert abs(second.tflops_error) < 0.20 and abs(second.tokens_error) < 0.20
    # Both published layouts ran, so the memory model must find them within 80 GB.
    for ref in REFERENCES.values():
        assert predict(ref).estimate.fits, ref.name


def test_tp8_layouts_with_the_replicated_vit(tmp_path):
    """The 72B ViT's MLP width 3420 is not divisible by 8: TP=8 only with the ViT whole per rank."""
    result = plan(QWEN32, WORK, 256, H100, LayoutChoice(tp=8))
    assert result.estimates and {e.layout.vision for e in result.estimates} == {"replicated"}
    # Memory: the replicated ViT's bf16 weights whole on the first stage, no gradients or optimizer.
    sharded, replicated = (estimate(QWEN32, WORK, Layout(tp=4, pp=1, cp=1, dp=64, vision=v), H100)
                           for v in ("sharded", "replicated"))
    vit = parameter_counts(QWEN32.model, 1).vision
    vit_tp4 = parameter_counts(QWEN32.model, 4).vision
    assert replicated.ranks[0].memory["weights"] - sharded.ranks[0].memory["weights"] == 2 * (vit - vit_tp4)
    for item in ("grads", "optimizer"):
        assert replicated.ranks[0].memory[item] == sharded.ranks[0].memory[item]
    # The override of a TP=8 plan loads as a training config.
    override = tmp_path / "tp8.yaml"
    out = qmm("plan", "--preset", "qwen-merge-72bvit-32b", "--gpus", "256", "--tp", "8", "--top", "3",
              "--write-override", str(override))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("TP8") == 3 and out.stdout.count("ViT-replicated") == 3, out.stdout
    cfg = load_config(override, ["train.train_iters=1"], check_runtime=False)
    assert cfg.parallel.tensor_model_parallel_size == 8 and cfg.model.vision.parallel == "replicated"
