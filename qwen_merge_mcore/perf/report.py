"""Plan output: the ranked table, the JSON document and the training-config override."""

from __future__ import annotations

import dataclasses

from .hardware import GiB
from .memory import parameter_counts
from .planner import CostModel, Estimate, Plan


def override_dict(plan: Plan, est: Estimate) -> dict:
    """The chosen layout as an `ExperimentConfig` fragment (key names of config/schema.py)."""
    lay = est.layout
    train = {"global_batch_samples": plan.workload.global_batch_samples, "micro_batch_size": lay.micro_batch,
             "recompute_granularity": lay.recompute}
    if lay.recompute == "full":
        train.update(recompute_method="uniform", recompute_num_layers=1)
    out = {
        "model": {"preset": plan.target.name},
        "parallel": {
            "tensor_model_parallel_size": lay.tp, "pipeline_model_parallel_size": lay.pp,
            "virtual_pipeline_model_parallel_size": lay.vpp, "context_parallel_size": lay.cp,
            "sequence_parallel": lay.tp > 1, "first_stage_layers": lay.first_stage_layers,
        },
        "train": train,
        "data": {"seq_length": plan.workload.seq_length},
    }
    if lay.vision != "sharded":
        out["model"]["vision"] = {"parallel": lay.vision}
    if plan.workload.fp8:
        out["precision"] = {"fp8": "hybrid"}
    return out


def override_yaml(plan: Plan, est: Estimate) -> str:
    import yaml

    head = (f"# qmm plan: {plan.target.name} on {plan.gpus} x {plan.gpu.name}, {est.layout.describe()}, "
            f"predicted MFU {est.mfu:.1%}, {est.tokens_per_s_per_gpu:.0f} tokens/s/GPU, "
            f"{est.memory_bytes / GiB:.1f} GiB per GPU\n")
    return head + yaml.safe_dump(override_dict(plan, est), sort_keys=False)


def plan_dict(plan: Plan, top: int, cost: CostModel) -> dict:
    model, text_only = plan.target.model, plan.target.text_only
    padded = parameter_counts(model, 1, padded=True, text_only=text_only)
    unpadded = parameter_counts(model, 1, padded=False, text_only=text_only)
    w = plan.workload
    return {
        "model": plan.target.name,
        "parameters": padded.total,  # the Megatron model at TP=1 (vocabulary padded to make_vocab_size_divisible_by)
        "parameters_unpadded": unpadded.total,  # the HF checkpoint
        "parameters_by_part": {"vision": padded.vision, "projector": padded.projector,
                               "language": padded.language},
        "gpus": plan.gpus, "gpu": plan.gpu.name,
        "workload": {**dataclasses.asdict(w), "sequences_per_step": w.sequences,
                     "tokens_per_step": w.sequences * w.seq_length},
        "cost_model": dataclasses.asdict(cost),
        "valid_layouts": len(plan.estimates) + len(plan.not_fitting),
        "fitting_layouts": len(plan.estimates),
        "refused": dict(plan.refused.most_common(10)),
        "layouts": [e.as_dict() for e in plan.estimates[:top]],
    }


def plan_table(plan: Plan, top: int) -> str:
    header = ("#", "layout", "recompute", "MFU", "TFLOP/s/GPU", "tok/s/GPU", "step s", "bubble", "mem GiB",
              "headroom")
    rows = []
    for i, e in enumerate(plan.estimates[:top], 1):
        rows.append((str(i), e.layout.describe(), e.layout.recompute or "none", f"{e.mfu:.1%}",
                     f"{e.tflops_per_gpu:.0f}", f"{e.tokens_per_s_per_gpu:.0f}", f"{e.step_time_s:.2f}",
                     f"{e.step_breakdown['bubble'] / e.step_time_s:.1%}", f"{e.memory_bytes / GiB:.1f}",
                     f"{e.headroom_bytes / GiB:.1f}"))
    return markdown_table(header, rows)


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plan_summary(plan: Plan) -> str:
    model, text_only = plan.target.model, plan.target.text_only
    padded = parameter_counts(model, 1, padded=True, text_only=text_only)
    unpadded = parameter_counts(model, 1, padded=False, text_only=text_only)
    w = plan.workload
    images = len(w.image_grids_per_sample)
    return (f"{plan.target.name}: {padded.total:,} parameters ({unpadded.total:,} unpadded, HF); "
            f"{plan.gpus} x {plan.gpu.name}, {w.global_batch_samples} samples per step (~{w.sequences} sequences of "
            f"{w.seq_length} tokens), samples of "
            f"{w.sample_length} tokens with {images} image(s) each, {'FP8' if w.fp8 else 'BF16'}, "
            f"frozen: {', '.join(w.freeze) or 'nothing'}; {len(plan.estimates)} of "
            f"{len(plan.estimates) + len(plan.not_fitting)} valid layouts fit")
