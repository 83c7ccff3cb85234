"""Layout enumeration and the step-time / memory model of the scale planner.

A `Layout` (TP, PP, VPP, CP, DP, micro-batch, first-stage layers, recomputation, ViT placement)
is valid when
`ParallelConfig.validate` and `config.validate_layout` accept it (the same rules training
enforces) and every data-parallel rank gets a sample. The batch counts samples, as training does:
they pack into `Workload.sequences` full sequences, which the step spreads as M =
ceil(sequences / (DP x micro-batch)) micro-batches per rank. For each valid layout `estimate`
predicts, per pipeline rank, the memory of one GPU and the time of one micro-batch
(forward + backward), then the step:

    step = M * t_slowest_rank + (PP - 1) / VPP * t_mean_rank     (1F1B / interleaved bubble)
         + exposed data-parallel reduce-scatter / all-gather (distributed optimizer)
         + optimizer update (HBM-bound Adam over the rank's shard)

A rank's micro-batch time is its matmul FLOPs at a sustained fraction of peak (separate
fractions for FP8 and BF16 GEMMs and for fused attention) plus the exposed part of its
tensor-parallel collectives (NVLink), context-parallel KV ring (NVLink or InfiniBand) and
pipeline sends. `CostModel` holds every assumption; `calibrate` fits the FP8 GEMM fraction
to one published benchmark (see `perf.references`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from ..config import ConfigError, ModelConfig, ParallelConfig, validate_layout
from .flops import BatchStats, FlopBreakdown, Grid, backward_multipliers, forward_flops, step_flops
from .hardware import GiB, GPUSpec
from .memory import (BF16, MEGATRON_BF16, StatePolicy, decoder_layer_activation_bytes, logits_activation_bytes,
                     projector_activation_bytes, rank_parameters, state_bytes, vision_activation_bytes)
from .models import PlanModel

RECOMPUTE = (None, "selective", "full")


@dataclass(frozen=True)
class CostModel:
    """Assumptions of the performance model (documented in docs/scaling.md)."""

    # Sustained fraction of dense peak for weight GEMMs (kernel gaps, launch and scaling overheads
    # folded in), fitted by `references.calibrate` to NeMo's Llama3-70B FP8 run on 64 H100s
    # (tests/perf check the fit reproduces this value). BF16 GEMMs are assumed to reach the same
    # fraction of their own peak: no published BF16 run is calibrated.
    linear_efficiency_fp8: float = 0.499
    linear_efficiency_bf16: float = 0.499
    attention_efficiency: float = 0.45  # fused attention fwd+bwd, BF16 (FP8 leaves attention in BF16)
    collective_efficiency: float = 0.80  # achieved / nominal link bandwidth for NCCL collectives
    overlapped_comm_exposed: float = 0.30  # share of TP (userbuffer overlap) and PP sends left exposed
    hbm_efficiency: float = 0.70
    # Memory-bound work outside GEMMs and attention (norms, residual adds, rotary, SwiGLU, FP8
    # casts) moves about this many bytes per element it touches; backward moves twice forward.
    elementwise_bytes: float = 2.0
    optimizer_bytes_per_param: int = 30  # Adam update: read grad, master, m, v; write master, m, v, bf16 weight
    fp8_weight_cache_bytes: int = 2  # FP8 weight + its transpose cached per FP8 linear weight
    fixed_overhead_bytes: int = 3 * GiB  # CUDA context, NCCL communicators, cuBLAS/TE workspaces
    fragmentation: float = 0.05  # allocator slack on activations


@dataclass(frozen=True)
class Workload:
    """What one optimizer step trains."""

    seq_length: int
    global_batch_samples: int  # samples per step (train.global_batch_samples)
    sample_length: int  # mean sample length inside a packed sequence (attention is per sample)
    image_grids_per_sample: tuple[Grid, ...] = ()
    freeze: tuple[str, ...] = ("vision",)
    fp8: bool = False
    bf16_layers_at_ends: tuple[int, int] = (1, 1)  # decoder layers kept in BF16 under FP8 (start, end)
    # Megatron-LM accumulates and reduces bf16 gradients in an fp32 buffer by default
    # (DistributedDataParallelConfig.grad_reduce_in_fp32); NeMo's performance recipes turn it off.
    grad_reduce_in_fp32: bool = True

    @property
    def state_policy(self) -> StatePolicy:
        return dataclasses.replace(MEGATRON_BF16, grad_bytes=4 if self.grad_reduce_in_fp32 else 2)

    @property
    def sequences(self) -> int:
        """Packed sequences of seq_length tokens the step's samples fill."""
        return -(-self.global_batch_samples * self.sample_length // self.seq_length)

    def microbatches(self, dp: int, mbs: int) -> int:
        """M per data-parallel rank: the sequences spread over DP, rounded up."""
        return -(-self.sequences // (dp * mbs))

    def micro_batch(self, mbs: int) -> BatchStats:
        row = BatchStats.packed(self.seq_length, self.sample_length, self.image_grids_per_sample)
        return BatchStats(tokens=row.tokens * mbs, sample_lengths=row.sample_lengths * mbs,
                          image_grids=row.image_grids * mbs)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    dp: int
    vpp: Optional[int] = None
    micro_batch: int = 1
    first_stage_layers: Optional[int] = None
    recompute: Optional[str] = None
    vision: str = "sharded"  # model.vision.parallel: sharded | replicated (frozen ViT)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def virtual(self) -> int:
        return self.vpp or 1

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                              virtual_pipeline_model_parallel_size=self.vpp, context_parallel_size=self.cp,
                              sequence_parallel=self.tp > 1, first_stage_layers=self.first_stage_layers)

    def describe(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        if self.vpp:
            parts.append(f"VPP{self.vpp}")
        parts += [f"CP{self.cp}", f"DP{self.dp}", f"MBS{self.micro_batch}"]
        if self.first_stage_layers is not None:
            parts.append(f"first{self.first_stage_layers}")
        if self.vision == "replicated":
            parts.append("ViT-replicated")
        return " ".join(parts)

    def model(self, model: ModelConfig) -> ModelConfig:
        """`model` with this layout's ViT placement."""
        return dataclasses.replace(model, vision=dataclasses.replace(model.vision, parallel=self.vision))


@dataclass(frozen=True)
class RankEstimate:
    layers: int
    params: int
    memory: dict[str, float]  # bytes by item
    time: dict[str, float]  # seconds per micro-batch by item

    @property
    def memory_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def time_s(self) -> float:
        return sum(self.time.values())


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    microbatches: int
    ranks: tuple[RankEstimate, ...]
    step_time_s: float
    step_breakdown: dict[str, float]
    model_flops: float  # per step, no recompute (MFU numerator)
    hardware_flops: float  # per step, recompute included
    tokens_per_step: int
    gpu_memory_bytes: int
    peak_bf16_flops: float

    @property
    def memory_bytes(self) -> float:
        return max(r.memory_bytes for r in self.ranks)

    @property
    def headroom_bytes(self) -> float:
        return self.gpu_memory_bytes - self.memory_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    @property
    def tflops_per_gpu(self) -> float:
        return self.model_flops / self.step_time_s / self.layout.gpus / 1e12

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation against the dense BF16 peak (FP8 runs can exceed 50%)."""
        return self.tflops_per_gpu * 1e12 / self.peak_bf16_flops

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_step / self.step_time_s / self.layout.gpus

    def as_dict(self) -> dict:
        worst = max(self.ranks, key=lambda r: r.memory_bytes)
        return {
            "layout": dataclasses.asdict(self.layout), "describe": self.layout.describe(),
            "microbatches": self.microbatches, "step_time_s": self.step_time_s,
            "step_breakdown_s": self.step_breakdown, "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "model_tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu,
            "model_flops_per_step": self.model_flops, "hardware_flops_per_step": self.hardware_flops,
            "memory_gib": self.memory_bytes / GiB, "headroom_gib": self.headroom_bytes / GiB, "fits": self.fits,
            "memory_breakdown_gib": {k: v / GiB for k, v in worst.memory.items()},
            "rank_memory_gib": [r.memory_bytes / GiB for r in self.ranks],
            "rank_time_ms": [r.time_s * 1e3 for r in self.ranks],
        }


class LayoutError(ValueError):
    """A layout or request that cannot run, with the reason."""


def check_layout(target: PlanModel, workload: Workload, layout: Layout, gpu: GPUSpec) -> None:
    """Raise LayoutError naming why `layout` cannot run; the model-shape rules are the config's."""
    if layout.recompute not in RECOMPUTE:
        raise LayoutError(f"recompute must be one of {RECOMPUTE}, got {layout.recompute!r}")
    if layout.vision == "replicated" and (target.text_only or "vision" not in workload.freeze):
        raise LayoutError("a replicated ViT needs a frozen ViT (model.vision.parallel)")
    try:
        parallel = layout.parallel_config()
        parallel.validate()
        validate_layout(layout.model(target.model), parallel)
    except ConfigError as err:
        raise LayoutError(str(err)) from None
    if layout.tp > gpu.gpus_per_node:
        raise LayoutError(f"TP={layout.tp} would span nodes of {gpu.gpus_per_node} GPUs (TP needs NVLink)")
    if layout.cp > 1 and workload.seq_length % (2 * layout.cp):
        raise LayoutError(f"seq_length {workload.seq_length} is not divisible by 2*CP={2 * layout.cp} "
                          "(load-balanced context parallelism)")
    if layout.tp > 1 and (workload.seq_length // layout.cp) % layout.tp:
        raise LayoutError(f"seq_length/CP = {workload.seq_length // layout.cp} is not divisible by TP={layout.tp} "
                          "(sequence parallelism)")
    if layout.micro_batch != 1 and not target.text_only:
        raise LayoutError(f"micro_batch {layout.micro_batch}: Qwen-Merge trains one packed sequence per micro-batch "
                          "(train.micro_batch_size=1; data.seq_length sizes it)")
    per_step = layout.micro_batch * layout.dp
    if workload.global_batch_samples < per_step:
        raise LayoutError(f"{workload.global_batch_samples} samples per step leave some of the micro_batch x DP = "
                          f"{per_step} slots without a sample")
    micro = workload.microbatches(layout.dp, layout.micro_batch)
    if layout.vpp and micro % layout.pp:
        raise LayoutError(f"{micro} micro-batches are not a multiple of PP={layout.pp} (interleaved schedule)")
    layers = parallel.stage_layer_counts(target.model.language.num_layers)
    if layout.pp > 1 and min(layers[1:]) == 0:
        raise LayoutError(f"pipeline stages after the first would hold no decoder layers ({layers})")


def _rank_layer_indices(num_layers: int, layout: Layout) -> list[list[int]]:
    """Global decoder-layer indices per pipeline rank (virtual chunks interleaved)."""
    if layout.vpp:
        chunk = num_layers // (layout.pp * layout.vpp)
        return [[(c * layout.pp + r) * chunk + i for c in range(layout.vpp) for i in range(chunk)]
                for r in range(layout.pp)]
    counts = layout.parallel_config().stage_layer_counts(num_layers)
    starts = list(itertools.accumulate([0] + counts))
    return [list(range(starts[r], starts[r] + counts[r])) for r in range(layout.pp)]


def _link(gpu: GPUSpec, span: int) -> float:
    """Bandwidth of a group whose members lie within `span` consecutive ranks."""
    return gpu.nvlink_bandwidth if span <= gpu.gpus_per_node else gpu.network_bandwidth


@dataclass
class _Cache:
    fwd: dict = field(default_factory=dict)

    def forward(self, target: PlanModel, workload: Workload, mbs: int, tp: int) -> FlopBreakdown:
        key = (mbs, tp)
        if key not in self.fwd:
            self.fwd[key] = forward_flops(target.model, workload.micro_batch(mbs), tp)
        return self.fwd[key]


def estimate(target: PlanModel, workload: Workload, layout: Layout, gpu: GPUSpec, cost: CostModel = CostModel(),
             cache: Optional[_Cache] = None) -> Estimate:
    """Memory per GPU and step time of a valid layout (call `check_layout` first)."""
    cache = cache or _Cache()
    model, lang = layout.model(target.model), target.model.language
    replicated = layout.vision == "replicated"
    tp, pp, cp, dp, v = layout.tp, layout.pp, layout.cp, layout.dp, layout.virtual
    mb = workload.micro_batch(layout.micro_batch)
    micro = workload.microbatches(dp, layout.micro_batch)
    fwd = cache.forward(target, workload, layout.micro_batch, tp)
    back = backward_multipliers(workload.freeze)
    lang_passes = 1 + back["language"]  # forward + backward passes, in forward units
    recompute_lin = 1 if layout.recompute == "full" else 0
    recompute_att = 1 if layout.recompute in ("selective", "full") else 0
    patches = sum(t * h * w for t, h, w in mb.image_grids)
    # Replicated: each TP rank encodes whole images, so the slowest holds ceil(images / TP) of them.
    vit_share = (math.ceil(len(mb.image_grids) / tp) / len(mb.image_grids)
                 if replicated and mb.image_grids else 1 / tp)

    r8 = gpu.peak_fp8_flops * cost.linear_efficiency_fp8
    r16 = gpu.peak_bf16_flops * cost.linear_efficiency_bf16
    ratt = gpu.peak_bf16_flops * cost.attention_efficiency
    eff = cost.collective_efficiency
    nvlink = gpu.nvlink_bandwidth * eff
    cp_bw = _link(gpu, tp * cp) * eff
    dp_bw = _link(gpu, tp * cp * dp) * eff
    pp_bw = _link(gpu, layout.gpus) * eff

    hbm = gpu.hbm_bandwidth * cost.hbm_efficiency
    lin_layer = fwd.decoder_linear / lang.num_layers / (tp * cp)
    att_layer = fwd.decoder_attention / lang.num_layers / (tp * cp)
    tokens_local = mb.tokens / cp
    start_bf16, end_bf16 = workload.bf16_layers_at_ends if workload.fp8 else (0, 0)
    fp8_layers = set(range(start_bf16, lang.num_layers - end_bf16)) if workload.fp8 else set()

    params = rank_parameters(model, layout.parallel_config(), target.text_only)
    ranks = []
    for rank, indices in enumerate(_rank_layer_indices(lang.num_layers, layout)):
        first, last = rank == 0, rank == pp - 1
        n = len(indices)
        n8 = sum(1 for i in indices if i in fp8_layers)
        time: dict[str, float] = {}
        att_time = att_layer / ratt * (lang_passes + recompute_att)
        time["decoder_gemm"] = lin_layer * (n8 / r8 + (n - n8) / r16) * (lang_passes + recompute_lin)
        time["decoder_attention"] = n * att_time
        time["decoder_elementwise"] = (n * _elementwise_elements(lang, workload.fp8) * tokens_local / tp
                                       * cost.elementwise_bytes * (lang_passes + recompute_lin) / hbm)
        if first and not target.text_only:
            # The ViT runs whole on every CP rank (images are not split); TP splits heads and MLP
            # (sharded) or the images (replicated, then one all-gather of the features).
            time["vision"] = (fwd.vision_linear / r16 + fwd.vision_attention / ratt) * vit_share * (1 + back["vision"])
            if replicated and tp > 1:
                time["vision_gather"] = BF16 * patches * model.vision.hidden_size * (tp - 1) / tp / nvlink
            time["projector"] = fwd.projector / tp / r16 * (1 + back["projector"])
        if last:
            time["logits"] = fwd.logits / (tp * cp) / r16 * lang_passes
        if tp > 1:
            # Sequence parallel: 2 all-gathers + 2 reduce-scatters of the layer's activations per
            # pass, each moving (tp-1)/tp of them per GPU; the ViT all-reduces twice per block.
            act = BF16 * tokens_local * lang.hidden_size * (tp - 1) / tp
            passes = lang_passes + recompute_lin
            tp_time = n * 4 * passes * act / nvlink
            if first and not target.text_only and not replicated:
                vit_act = BF16 * patches * model.vision.hidden_size * 2 * (tp - 1) / tp
                tp_time += model.vision.depth * 2 * (1 + back["vision"]) * vit_act / nvlink
            time["tp_comm"] = tp_time * cost.overlapped_comm_exposed
        if cp > 1:
            # Ring attention: each pass sends this rank's K and V around the CP ring (backward
            # also returns dK, dV), overlapped with the attention blocks it feeds.
            kv = BF16 * tokens_local * 2 * lang.num_query_groups * lang.head_dim / tp
            ring = kv * (cp - 1) / cp_bw * (1 + 2 * back["language"] + recompute_att)
            time["cp_comm"] = n * max(0.0, ring - att_time)
        if pp > 1:
            send = BF16 * tokens_local * lang.hidden_size / tp / pp_bw
            time["pp_comm"] = 2 * v * send * cost.overlapped_comm_exposed
        ranks.append(_rank_memory(target, workload, layout, cost, params[rank], rank, n, n8, tokens_local,
                                  patches, vit_share, micro, back, time))

    t_max = max(r.time_s for r in ranks)
    t_mean = sum(r.time_s for r in ranks) / pp
    pipeline = micro * t_max + (pp - 1) / v * t_mean
    # Distributed optimizer over DP x CP: reduce-scatter fp32 grads, all-gather bf16 weights,
    # overlapped with the last micro-batch's backward / the first one's forward.
    dp_cp = dp * cp
    dp_exposed = opt = 0.0
    for r, p in zip(ranks, params):
        trainable = p.trainable(workload.freeze)
        frac = (dp_cp - 1) / dp_cp
        rs = trainable * workload.state_policy.grad_bytes * frac / dp_bw
        ag = trainable * workload.state_policy.param_bytes * frac / dp_bw
        dp_exposed = max(dp_exposed, max(0.0, rs - r.time_s * 2 / 3) + max(0.0, ag - r.time_s / 3))
        opt = max(opt, trainable / dp_cp * cost.optimizer_bytes_per_param / (gpu.hbm_bandwidth * cost.hbm_efficiency))
    step = pipeline + dp_exposed + opt
    per_step = workload.sequences / layout.micro_batch  # the step's work; M x DP slots may hold less
    model_flops = step_flops(model, mb, workload.freeze, None, tp) * per_step
    hardware_flops = step_flops(model, mb, workload.freeze, layout.recompute, tp) * per_step
    return Estimate(layout=layout, microbatches=micro, ranks=tuple(ranks), step_time_s=step,
                    step_breakdown={"pipeline": pipeline, "bubble": (pp - 1) / v * t_mean,
                                    "dp_exposed": dp_exposed, "optimizer": opt},
                    model_flops=model_flops, hardware_flops=hardware_flops,
                    tokens_per_step=workload.sequences * workload.seq_length,
                    gpu_memory_bytes=gpu.memory_bytes, peak_bf16_flops=gpu.peak_bf16_flops)


def _elementwise_elements(lang, fp8: bool) -> float:
    """Elements per token one decoder layer's memory-bound ops read or write in the forward:
    two RMSNorms (in, out), two residual adds (2 in, 1 out), rotary on q and k (in, out),
    SwiGLU (gate, up in; out), and under FP8 the casts of the four GEMM inputs (bf16 in, fp8 out)."""
    h, f = lang.hidden_size, lang.ffn_hidden_size
    q, kv = lang.num_attention_heads * lang.head_dim, lang.num_query_groups * lang.head_dim
    elements = 4 * h + 6 * h + 2 * (q + kv) + 3 * f
    if fp8:
        elements += 1.5 * (2 * h + q + f)
    return elements


def _in_flight(layout: Layout, rank: int, micro: int) -> float:
    """Micro-batches whose activations a rank holds at its peak (1F1B warm-up depth; the
    interleaved schedule adds (PP-1)/VPP, Korthikanti et al. 2022)."""
    depth = layout.pp - rank
    if layout.vpp:
        depth += (layout.pp - 1) / layout.vpp
    return min(depth, micro)


def _rank_memory(target, workload, layout, cost, params, rank, n, n8, tokens_local, patches, vit_share, micro,
                 back, time) -> RankEstimate:
    model, lang = target.model, target.model.language
    tp, pp, cp = layout.tp, layout.pp, layout.cp
    trainable = params.trainable(workload.freeze)
    states = state_bytes(params.total, trainable, workload.state_policy, layout.dp * cp)
    memory = {"weights": states.params, "grads": states.grads, "optimizer": states.optimizer}
    if workload.fp8:
        memory["fp8_weights"] = cost.fp8_weight_cache_bytes * params.fp8_linear * (n8 / n if n else 0)
    flight = _in_flight(layout, rank, micro)
    layer = decoder_layer_activation_bytes(lang, tokens_local, tp, layout.recompute, workload.fp8)
    acts = n * layer * flight
    if layout.recompute == "full" and n:
        acts += decoder_layer_activation_bytes(lang, tokens_local, tp, None, workload.fp8)  # one layer re-run
    if rank == 0 and not target.text_only and patches:
        vit_trains = back["vision"] > 0 or "vision" not in workload.freeze
        if layout.vision == "replicated":  # frozen: this rank's images through unsplit blocks
            acts += vision_activation_bytes(model.vision, math.ceil(patches * vit_share), 1, False)
        else:
            acts += vision_activation_bytes(model.vision, patches, tp, vit_trains) * (flight if vit_trains else 1)
        proj_keeps = "projector" not in workload.freeze or vit_trains
        acts += projector_activation_bytes(model, patches) * (flight if proj_keeps else 1)
    if rank == pp - 1:
        acts += logits_activation_bytes(lang, tokens_local, tp)
    memory["activations"] = acts * (1 + cost.fragmentation)
    buffers = 0.0
    if tp > 1:  # TE userbuffers for overlapped sequence-parallel GEMMs: ~3 gathered activations
        buffers += 3 * BF16 * tokens_local * lang.hidden_size
    if pp > 1:  # p2p send/recv tensors, forward and backward
        buffers += 4 * BF16 * tokens_local * lang.hidden_size / tp
    memory["comm_buffers"] = buffers
    memory["fixed_overhead"] = cost.fixed_overhead_bytes
    return RankEstimate(layers=n, params=params.total, memory=memory, time=time)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class LayoutChoice:
    """Restrictions on the enumeration (None = free)."""

    tp: Optional[int] = None
    pp: Optional[int] = None
    vpp: Optional[int] = None  # 0 = no virtual pipeline
    cp: Optional[int] = None
    micro_batch: Optional[int] = None
    first_stage_layers: Optional[int] = None
    recompute: Optional[str] = None  # "none" | "selective" | "full"; None = try none and full
    vision: Optional[str] = None  # "sharded" | "replicated"; None = both when the ViT is frozen


def enumerate_layouts(target: PlanModel, workload: Workload, gpus: int, gpu: GPUSpec,
                      choice: LayoutChoice = LayoutChoice()) -> tuple[list[Layout], Counter]:
    """All valid layouts for `gpus` GPUs, and a count of the reasons others were refused."""
    layers = target.model.language.num_layers
    refused: Counter = Counter()
    valid = []

    def pick(value, options):
        return [value] if value is not None else options

    rec_opts = {None: [None, "full"], "none": [None]}.get(choice.recompute, [choice.recompute])
    frozen_vit = not target.text_only and "vision" in workload.freeze
    vit_opts = pick(choice.vision, ["sharded", "replicated"] if frozen_vit else ["sharded"])
    for tp in pick(choice.tp, [d for d in _divisors(gpus) if d <= gpu.gpus_per_node]):
        # Training refuses CP > 1 (not implemented); the planner still models it when asked (--cp).
        for cp in pick(choice.cp, [1]):
            for pp in pick(choice.pp, _divisors(gpus // (tp * cp)) if gpus % (tp * cp) == 0 else [1]):
                if gpus % (tp * cp * pp):
                    refused[f"TP x CP x PP = {tp * cp * pp} does not divide {gpus} GPUs"] += 1
                    continue
                dp = gpus // (tp * cp * pp)
                if choice.vpp is not None:
                    vpps = [choice.vpp or None]
                else:
                    vpps = [None] + [x for x in range(2, layers + 1) if pp > 1 and layers % (pp * x) == 0
                                     and layers // (pp * x) >= 1][:6]
                for vpp in vpps:
                    if choice.first_stage_layers is not None:
                        firsts = [choice.first_stage_layers]
                    elif pp > 1 and vpp is None and not target.text_only:
                        firsts = [None] + [f for f in range(0, layers // pp)
                                           if (layers - f) % (pp - 1) == 0]
                    else:
                        firsts = [None]
                    for first in firsts:
                        for mbs in pick(choice.micro_batch, [1, 2] if target.text_only else [1]):
                            for rec, vit in itertools.product(rec_opts, vit_opts):
                                layout = Layout(tp=tp, pp=pp, cp=cp, dp=dp, vpp=vpp, micro_batch=mbs,
                                                first_stage_layers=first, recompute=rec, vision=vit)
                                try:
                                    check_layout(target, workload, layout, gpu)
                                except LayoutError as err:
                                    refused[str(err)] += 1
                                    continue
                                valid.append(layout)
    return valid, refused


@dataclass
class Plan:
    target: PlanModel
    workload: Workload
    gpus: int
    gpu: GPUSpec
    estimates: list[Estimate]  # fitting layouts, best first
    not_fitting: list[Estimate]  # valid layouts over the memory, least memory first
    refused: Counter

    @property
    def best(self) -> Estimate:
        return self.estimates[0]


def plan(target: PlanModel, workload: Workload, gpus: int, gpu: GPUSpec, choice: LayoutChoice = LayoutChoice(),
         cost: CostModel = CostModel()) -> Plan:
    """Rank every valid layout that fits in memory by predicted step time.

    Raises LayoutError with the reasons when no layout is valid or none fits."""
    if gpus <= 0:
        raise LayoutError(f"--gpus must be > 0, got {gpus}")
    layouts, refused = enumerate_layouts(target, workload, gpus, gpu, choice)
    if not layouts:
        reasons = "; ".join(f"{r} ({n}x)" for r, n in refused.most_common(5))
        raise LayoutError(f"no valid layout for {target.name} on {gpus} GPUs: {reasons}")
    cache = _Cache()
    estimates = [estimate(target, workload, lay, gpu, cost, cache) for lay in layouts]
    fitting = sorted((e for e in estimates if e.fits), key=lambda e: (e.step_time_s, -e.headroom_bytes))
    over = sorted((e for e in estimates if not e.fits), key=lambda e: e.memory_bytes)
    if not fitting:
        low = over[0]
        raise LayoutError(f"no layout of {target.name} fits in {gpu.memory_bytes / GiB:.1f} GiB on {gpus} GPUs; "
                          f"the smallest, {low.layout.describe()} recompute={low.layout.recompute}, needs "
                          f"{low.memory_bytes / GiB:.1f} GiB per GPU")
    return Plan(target=target, workload=workload, gpus=gpus, gpu=gpu, estimates=fitting, not_fitting=over,
                refused=refused)
