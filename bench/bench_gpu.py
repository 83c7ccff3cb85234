"""Qwen-Merge training steps on the GPU engine at the 4B and 8B presets' layer shapes, reduced depth:
tokens/s, TFLOP/s and MFU against this GPU's bf16 matmul rate measured in the same run, and peak
memory against the planner's prediction for the same shapes. Writes one JSON, prints a table last.

    python bench/bench_gpu.py --out gpu-check-out/bench_gpu.json
    python bench/bench_gpu.py --presets qwen-merge-72bvit-8b --layers 8 --steps 5
    python bench/bench_gpu.py --device cpu --tiny     # the code path on CPU in seconds; no timing to read

What runs: the model as training builds it with the local layer spec (Megatron-Core's parallel
linears, torch SDPA attention; no Transformer Engine), bf16, the preset's ViT blocks (1280 wide,
16 heads, MLP 3420, window attention with a full-attention last block) and decoder layers at
their real widths, only --vit-depth and --layers of them; the ViT frozen, projector and LLM
training (stage 3). The step is the GPU engine's: Megatron-Core DDP, the distributed optimizer
and the no-pipelining schedule over --microbatches packed THD sequences of --seq-length tokens,
which the data pipeline makes from the tiny data generator's samples (templated, tokenised,
MRoPE positions, packed first-fit-decreasing). Pixels are not decoded, as the GPU check's machine
has no DALI: each image gets random patches in the grid its header gives, which costs the step
the same. Batches are prepared before the timing, so the step times are the engine's alone.

MFU is model FLOPs (the planner's count, perf/flops.py, as the training log uses) per second over
the rate of an --matmul-size cubed bf16 matmul timed in this run; "datasheet MFU" is over the GPU's
dense bf16 peak. Peak memory is torch's peak allocation over the model build and the steps; the
planner (perf/planner.py `estimate` at TP=PP=DP=1, the measured batches' shapes) predicts it
without its fixed allowance for the CUDA context and workspaces, which the allocator never sees.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, package not installed

PRESETS = ("qwen-merge-72bvit-4b", "qwen-merge-72bvit-8b")
GiB = 2**30


@dataclass(frozen=True)
class Case:
    preset: str
    layers: int | None  # decoder layers (None: the preset's)
    vit_depth: int | None  # ViT blocks, the last with full attention (None: the preset's)
    seq_length: int
    microbatches: int  # packed sequences per step (global batch at DP=1)
    warmup: int
    steps: int  # timed steps
    image_size: int  # side of the generated pictures, pixels
    samples: int  # generated samples (the data pipeline cycles through them)


# --tiny: the tiny preset's own depths, small sequences, one timed step.
TINY_CASE = Case("tiny", None, None, seq_length=512, microbatches=2, warmup=1, steps=1, image_size=112, samples=32)


def experiment_config(case: Case, data_file: Path, cuda: bool):
    from qwen_merge_mcore.config import config_from_dict
    from qwen_merge_mcore.config.presets import TINY

    model = {"preset": case.preset, "backend": "local",
             # The tiny tokenizer's vision tokens: the generated prompts use them.
             **{k: TINY[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                     "vision_end_token_id")}}
    if case.layers is not None:
        model["language"] = {"num_layers": case.layers}
    if case.vit_depth is not None:
        model["vision"] = {"depth": case.vit_depth, "fullatt_block_indexes": [case.vit_depth - 1]}
    return config_from_dict({
        "model": model,
        "precision": {"params_dtype": "bf16" if cuda else "fp32"},  # the CPU engine trains in fp32
        "train": {"stage": "bench_gpu", "engine": "gpu" if cuda else "cpu", "micro_batch_size": 1,
                  "global_batch_samples": case.microbatches, "train_iters": case.warmup + case.steps,
                  "freeze": ["vision"]},
        "data": {"template": "qwen3", "seq_length": case.seq_length, "num_workers": 1,
                 "datasets": [{"path": str(data_file), "name": "instruct"}]},
    })


class HeaderShapedImages:
    """Stands in for the data pipeline's DALI `ImageProcessor`: the grid from the image header,
    random patches in place of decoded pixels (the step's cost does not depend on their values;
    one random tensor per grid is reused)."""

    def __init__(self, spec, patch_dim: int):
        self.spec, self.patch_dim, self.pixels = spec, patch_dim, {}

    def __call__(self, images):
        import torch

        from qwen_merge_mcore.data.vision import ProcessedImage, image_size

        out = []
        for data in images:
            grid = self.spec.image_grid(*image_size(data))
            if grid not in self.pixels:
                self.pixels[grid] = torch.randn(grid[0] * grid[1] * grid[2], self.patch_dim,
                                                generator=torch.Generator().manual_seed(len(self.pixels)))
            out.append(ProcessedImage(self.pixels[grid], grid))
        return out


class Batches:
    """Packed micro-batches per data shape, made once: both presets share the ViT's patching and
    the tiny tokenizer, so they train on the same sequences."""

    def __init__(self, workdir: Path):
        self.workdir, self.made = workdir, {}  # data shape -> micro-batches

    def data_file(self, case: Case) -> Path:
        from qwen_merge_mcore.fixtures.tiny_data import make_tiny_data

        folder = self.workdir / f"data_{case.samples}x{case.image_size}"
        if not folder.is_dir():
            make_tiny_data(folder, samples=case.samples, size=case.image_size)
        return folder / "instruct.jsonl"

    def __call__(self, cfg, case: Case) -> list:
        from qwen_merge_mcore.data.loader import build_train_iterator
        from qwen_merge_mcore.fixtures.tokenizer import build_tiny_tokenizer

        v = cfg.model.vision
        key = (case.samples, case.image_size, case.seq_length, case.microbatches * (case.warmup + case.steps),
               v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.in_channels)
        if key not in self.made:
            # Full-length sequences: one shape, so Megatron's torch.compile'd fusions compile once, in warm-up.
            it = build_train_iterator(cfg.data, cfg.model, build_tiny_tokenizer(), seed=cfg.train.seed,
                                      pad_to_full=True)
            it.images = HeaderShapedImages(it.spec, v.in_channels * v.temporal_patch_size * v.patch_size ** 2)
            self.made[key] = [next(it) for _ in range(key[3])]
        return self.made[key]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device: str, n: int, reps: int = 20) -> float:
    """Dense bf16 n x n x n matmul rate on random data (mean of `reps` after 3 warm-ups)."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def predicted_memory(cfg, batches: list) -> dict:
    """The planner's per-GPU memory for these shapes: one GPU, this many micro-batches of the
    longest measured sequence, samples of the measured mean length with the usual image grid."""
    from qwen_merge_mcore.perf.flops import BatchStats
    from qwen_merge_mcore.perf.hardware import gpu_spec
    from qwen_merge_mcore.perf.models import PlanModel
    from qwen_merge_mcore.perf.planner import CostModel, Layout, Workload, estimate

    stats = [BatchStats.from_batch(b) for b in batches]
    lengths = [n for s in stats for n in s.sample_lengths]
    grids = Counter(g for s in stats for g in s.image_grids)
    images_per_sample = round(sum(grids.values()) / len(lengths))
    workload = Workload(seq_length=max(s.tokens for s in stats), global_batch_samples=len(lengths),
                        sample_length=round(statistics.mean(lengths)),
                        image_grids_per_sample=(grids.most_common(1)[0][0],) * images_per_sample if grids else (),
                        freeze=tuple(cfg.train.freeze))
    cost = CostModel()
    est = estimate(PlanModel(cfg.model.preset, cfg.model, text_only=False), workload, Layout(tp=1, pp=1, cp=1, dp=1),
                   gpu_spec("h200-141gb"), cost)
    (rank,) = est.ranks
    return {"predicted_gib": est.memory_bytes / GiB,
            "predicted_allocator_gib": (est.memory_bytes - cost.fixed_overhead_bytes) / GiB,
            "predicted_breakdown_gib": {k: v / GiB for k, v in rank.memory.items()},
            "planner_step_s": est.step_time_s, "planner_workload": dataclasses.asdict(workload)}


def run_case(case: Case, device: str, matmul: float, data: Batches) -> dict:
    import torch

    from qwen_merge_mcore.perf.flops import BatchStats, step_flops
    from qwen_merge_mcore.training.engine import build_engine
    from qwen_merge_mcore.training.loop import seed_everything
    from qwen_merge_mcore.training.model_provider import build_chunks
    from qwen_merge_mcore.training.observability import peak_tflops

    cuda = device == "cuda"
    cfg = experiment_config(case, data.data_file(case), cuda)
    batches = data(cfg, case)
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    seed_everything(cfg.train.seed)
    chunks = build_chunks(cfg)
    engine = build_engine(cfg, chunks)
    m, times, losses, skipped = case.microbatches, [], [], 0
    for step in range(case.warmup + case.steps):
        step_batches = batches[step * m:(step + 1) * m]
        _sync(device)
        start = time.perf_counter()
        result = engine.train_step(iter(step_batches), m)
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(result.loss)
        skipped += result.skipped
    timed = batches[case.warmup * m:]
    seconds = sum(times[case.warmup:])
    flops = sum(step_flops(cfg.model, BatchStats.from_batch(b), freeze=cfg.train.freeze) for b in timed)
    tflops = flops / seconds / 1e12
    # the datasheet's dense peak of this GPU, FP8 where the decoder runs FP8 (None on CPU)
    peak = peak_tflops(cfg, torch.cuda.get_device_name() if cuda else None,
                       fp8_model=chunks[0].config.fp8 is not None)
    params = [p for chunk in engine.unwrapped() for p in chunk.parameters()]
    out = {"preset": case.preset, "case": dataclasses.asdict(case), "engine": type(engine).__name__,
           "decoder_layers": cfg.model.language.num_layers, "vit_depth": cfg.model.vision.depth,
           "parameters": sum(p.numel() for p in params),
           "trainable": sum(p.numel() for p in params if p.requires_grad),
           "tokens_per_step": sum(b.tokens.numel() for b in timed) / case.steps,
           "patches_per_step": sum(int(b.images.grid_thw.prod(-1).sum()) for b in timed if b.images) / case.steps,
           "step_s": times, "losses": losses, "skipped_steps": skipped,
           "tokens_per_s": sum(b.tokens.numel() for b in timed) / seconds, "tflops": tflops, "mfu": tflops / matmul,
           "datasheet_tflops": peak, "datasheet_mfu": tflops / peak if peak else None,
           "peak_allocated_gib": None, "device_used_gib": None}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        out.update(peak_allocated_gib=(torch.cuda.max_memory_allocated() - base) / GiB,
                   device_used_gib=(total - free) / GiB)  # the CUDA context and cached blocks too
    out.update(predicted_memory(cfg, batches))
    del engine, chunks, params
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(report: dict) -> str:
    def num(value, fmt):
        return format(value, fmt) if value is not None else "-"

    rows = [f"bf16 matmul {report['matmul_size']}^3 on {report['device_name']}: {report['matmul_tflops']:.1f} TFLOP/s",
            f"{'preset':<22}{'layers':>8}{'tok/s':>10}{'TFLOP/s':>9}{'MFU':>8}{'sheet':>8}"
            f"{'peak GiB':>10}{'planner':>9}"]
    for r in report["results"]:
        if "error" in r:
            rows.append(f"{r['preset']:<22} FAILED: {r['error']}")
            continue
        rows.append(f"{r['preset']:<22}{r['decoder_layers']:>4}+{r['vit_depth']:<3}{r['tokens_per_s']:>10,.0f}"
                    f"{r['tflops']:>9.1f}{r['mfu']:>8.1%}{num(r['datasheet_mfu'], '.1%'):>8}"
                    f"{num(r['peak_allocated_gib'], '.1f'):>10}{r['predicted_allocator_gib']:>9.1f}")
    rows.append("layers: decoder+ViT blocks; MFU: over the matmul rate above; sheet: over the datasheet peak; "
                "peak GiB: allocated; planner: predicted, CUDA context excluded")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset at small sizes, a 256^3 matmul (the CPU "
                        "smoke test; the shape options below are ignored)")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated model presets")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (of the preset's 36)")
    parser.add_argument("--vit-depth", type=int, default=8, help="ViT blocks (of 32; the last has full attention)")
    parser.add_argument("--seq-length", type=int, default=8192, help="tokens per packed sequence")
    parser.add_argument("--microbatches", type=int, default=4, help="packed sequences per step")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--image-size", type=int, default=448, help="side of the generated pictures (448: 1024 "
                        "patches, 256 image tokens)")
    parser.add_argument("--samples", type=int, default=256, help="generated samples")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the timed bf16 matmul")
    parser.add_argument("--out", type=Path, default=Path("bench_gpu.json"), help="the JSON report")
    args = parser.parse_args(argv)

    from qwen_merge_mcore.config.presets import PRESETS as KNOWN

    unknown = [p for p in args.presets.split(",") if p not in KNOWN]
    if unknown:
        parser.error(f"unknown preset {', '.join(unknown)}; known: {', '.join(KNOWN)}")
    small = [f"--{k.replace('_', '-')}" for k in ("layers", "vit_depth", "seq_length", "microbatches", "steps",
                                                   "image_size", "samples", "matmul_size") if getattr(args, k) < 1]
    if small or args.warmup < 0:
        parser.error(f"{', '.join(small) or '--warmup'} must be at least {1 if small else 0}")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch first looks
    out = args.out.absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"cannot write the report to {out}: {err.strerror}")
    if not os.access(out.parent, os.W_OK):
        parser.error(f"cannot write the report to {out}: {out.parent} is not writable")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU visible (use --device cpu --tiny for the code path)")
    if args.tiny:
        cases = [TINY_CASE]
        args.matmul_size = 256
    else:
        cases = [Case(p, args.layers, args.vit_depth, args.seq_length, args.microbatches, args.warmup, args.steps,
                      args.image_size, args.samples) for p in args.presets.split(",")]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))

    from qwen_merge_mcore import distributed
    from qwen_merge_mcore.config import ParallelConfig
    from qwen_merge_mcore.utils.atomic import atomic_write_text

    device = args.device
    report = {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU",
              "torch": torch.__version__, "matmul_size": args.matmul_size,
              "matmul_tflops": matmul_tflops(device, args.matmul_size), "results": []}
    failed = False
    distributed.initialize(ParallelConfig(), seed=1234)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_gpu_") as work:
            data = Batches(Path(work))
            for case in cases:
                print(f"== {case.preset}: {case.layers or 'preset'} decoder layers, ViT depth "
                      f"{case.vit_depth or 'preset'}, {case.microbatches} x {case.seq_length} tokens/step", flush=True)
                try:
                    report["results"].append(run_case(case, device, report["matmul_tflops"], data))
                except Exception as err:  # noqa: BLE001 - report the case, go on with the next
                    traceback.print_exc()
                    failed = True
                    report["results"].append({"preset": case.preset, "error": f"{type(err).__name__}: {err}"[:300]})
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
    finally:
        distributed.destroy()
    atomic_write_text(out, json.dumps(report, indent=1))
    print(f"wrote {out}")
    print(table(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
