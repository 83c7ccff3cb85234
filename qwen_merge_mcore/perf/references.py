"""Published H100 training benchmarks the cost model is calibrated on and checked against.

NVIDIA NeMo Framework 24.12 performance summary, pre-training at FP8 (per-tensor delayed
scaling), DGX H100, sequence length 8192:
https://docs.nvidia.com/nemo-framework/user-guide/24.12/nemotoolkit/performance/performance_summary.html

Its "Model TFLOP/sec/GPU" counts the full s x s attention matrix (tokens/s x FLOPs/token match
Megatron's older formula without the causal half), so `reported_tflops` recounts the predicted
step in that convention; tokens/s/GPU carries no convention and is compared as well.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .flops import step_flops
from .hardware import GPUS
from .models import plan_model
from .planner import CostModel, Estimate, Layout, Workload, check_layout, estimate

NEMO_24_12 = "https://docs.nvidia.com/nemo-framework/user-guide/24.12/nemotoolkit/performance/performance_summary.html"


@dataclass(frozen=True)
class Reference:
    name: str
    model: str
    gpus: int
    fp8: bool
    global_batch: int
    micro_batch: int
    seq_length: int
    tp: int
    pp: int
    cp: int
    vpp: Optional[int]
    tflops_per_gpu: float  # as published
    tokens_per_s_per_gpu: float  # as published
    source: str
    causal_flops: bool = False  # the publication's FLOP convention
    gpu: str = "h100-80gb"

    def layout(self) -> Layout:
        dp = self.gpus // (self.tp * self.pp * self.cp)
        return Layout(tp=self.tp, pp=self.pp, cp=self.cp, dp=dp, vpp=self.vpp, micro_batch=self.micro_batch)

    def workload(self) -> Workload:
        # Pre-training on full 8192-token documents: one sample per row, nothing frozen, all
        # decoder layers in FP8, gradients reduced in bf16 (NeMo's performance recipes).
        return Workload(seq_length=self.seq_length, global_batch_samples=self.global_batch, sample_length=self.seq_length,
                        freeze=(), fp8=self.fp8, bf16_layers_at_ends=(0, 0), grad_reduce_in_fp32=False)


REFERENCES = {
    "llama3-70b-fp8-64gpu": Reference("llama3-70b-fp8-64gpu", "llama3-70b", gpus=64, fp8=True, global_batch=128,
                                      micro_batch=1, seq_length=8192, tp=4, pp=4, cp=2, vpp=5,
                                      tflops_per_gpu=734, tokens_per_s_per_gpu=1524, source=NEMO_24_12),
    "llama3-8b-fp8-8gpu": Reference("llama3-8b-fp8-8gpu", "llama3-8b", gpus=8, fp8=True, global_batch=128,
                                    micro_batch=1, seq_length=8192, tp=1, pp=1, cp=2, vpp=None,
                                    tflops_per_gpu=711, tokens_per_s_per_gpu=12273, source=NEMO_24_12),
}
CALIBRATION = "llama3-70b-fp8-64gpu"  # fits CostModel.linear_efficiency_fp8
VALIDATION = "llama3-8b-fp8-8gpu"  # predicted with that fit


@dataclass(frozen=True)
class Prediction:
    reference: Reference
    estimate: Estimate
    reported_tflops: float  # predicted, in the publication's FLOP convention

    @property
    def tflops_error(self) -> float:
        return self.reported_tflops / self.reference.tflops_per_gpu - 1

    @property
    def tokens_error(self) -> float:
        return self.estimate.tokens_per_s_per_gpu / self.reference.tokens_per_s_per_gpu - 1


def predict(ref: Reference, cost: CostModel = CostModel()) -> Prediction:
    target, workload, layout, gpu = plan_model(ref.model), ref.workload(), ref.layout(), GPUS[ref.gpu]
    check_layout(target, workload, layout, gpu)
    est = estimate(target, workload, layout, gpu, cost)
    batch = workload.micro_batch(layout.micro_batch)
    flops = step_flops(target.model, batch, (), None, layout.tp, causal=ref.causal_flops)
    flops *= est.microbatches * layout.dp
    return Prediction(ref, est, flops / est.step_time_s / ref.gpus / 1e12)


def calibrate(ref: Reference, cost: CostModel = CostModel(),
              fields: tuple[str, ...] = ("linear_efficiency_fp8", "linear_efficiency_bf16")) -> CostModel:
    """The cost model with its GEMM efficiency `fields` set to one value for which the predicted
    throughput of `ref` equals the published one (bisection; throughput rises with it). By
    default FP8 and BF16 GEMMs share the fitted fraction of their respective peaks."""
    lo, hi = 0.01, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if predict(ref, dataclasses.replace(cost, **dict.fromkeys(fields, mid))).reported_tflops < ref.tflops_per_gpu:
            lo = mid
        else:
            hi = mid
    return dataclasses.replace(cost, **dict.fromkeys(fields, (lo + hi) / 2))
