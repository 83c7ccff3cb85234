"""FLOP-balanced packing vs first-fit-decreasing (CPU, about a minute): per-rank compute balance and
packing efficiency of one step's DP x M micro-batches.

    .venv/bin/python bench/bench_balance.py [--steps 3] [--per-rank 4]

Two synthetic distributions shaped like the stage data, with image sizes (smart-resized by the
loader's own VisionSpec, max_pixels 262144, so the ViT work varies per image):
  - ReCap-like (stage 1): one image of 200-1000 px sides each + a detailed caption
    (lognormal, median ~190 tokens); ViT and LLM frozen.
  - stage-3-like: 0-3 images of 300-1200 px sides + a long reasoning trace (lognormal, median
    ~1800 tokens); ViT frozen. Samples longer than the sequence are dropped, as the loader does.
For each at DP 8, 64 and 512, the step holds DP x `--per-rank` sequences' worth of samples (at least
the recipe's 256 / 128 samples), then the recipe's own batch at the DP sizes it can feed; each step
is assigned by both policies of data/packing.py. Per-rank
compute is the planner's FLOP model (perf/flops.py) summed over the rank's micro-batches as they
are padded; max/mean is the straggler factor (1.0 is perfect balance). Packing efficiency is real
tokens / tokens computed (padding to x16 included), as `packing_efficiency` defines it. `bound`:
the largest sample's FLOPs over the mean per rank (no assignment can do better than it, or 1.0).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qwen_merge_mcore.config.schema import DataConfig  # noqa: E402
from qwen_merge_mcore.data.packing import (assign_micro_batches, micro_batch_flops, padded_length,  # noqa: E402
                                           sample_flops)
from qwen_merge_mcore.data.vision import VisionSpec  # noqa: E402
from qwen_merge_mcore.perf.models import plan_model  # noqa: E402

SEQ_LENGTH, PAD = 8096, 16
PRESET = "qwen-merge-72bvit-8b"
POLICIES = ("first_fit_decreasing", "flop_balanced")


def recap(n: int, rng, spec: VisionSpec) -> list[tuple[int, list]]:
    grids = [[spec.image_grid(int(h), int(w))] for h, w in zip(rng.integers(200, 1001, n), rng.integers(200, 1001, n))]
    text = rng.lognormal(np.log(190), 0.45, n).astype(int) + 20
    return [(int(t) + spec.merged_tokens(g[0]), g) for t, g in zip(text, grids)]


def stage3(n: int, rng, spec: VisionSpec) -> list[tuple[int, list]]:
    out = []
    while len(out) < n:
        images = int(rng.choice([0, 1, 1, 1, 2, 3]))
        grids = [spec.image_grid(int(rng.integers(300, 1201)), int(rng.integers(300, 1201))) for _ in range(images)]
        length = int(rng.lognormal(np.log(1800), 0.75)) + 180 + sum(spec.merged_tokens(g) for g in grids)
        if length <= SEQ_LENGTH:
            out.append((length, grids))
    return out


def evaluate(model, samples, dp: int, policy: str, freeze, costs) -> tuple[float, float, int]:
    """(max/mean per-rank FLOPs, packing efficiency, M) of one step."""
    lengths = [n for n, _ in samples]
    plan = assign_micro_batches(lengths, SEQ_LENGTH, dp, policy, costs=costs if policy == "flop_balanced" else None)
    ranks, computed = [], 0
    for slots in plan:
        ranks.append(sum(micro_batch_flops(model, [lengths[i] for i in slot], [g for i in slot for g in samples[i][1]],
                                           PAD, freeze) for slot in slots))
        computed += sum(padded_length(max(sum(lengths[i] for i in slot), 1), PAD) for slot in slots)
    return max(ranks) / (sum(ranks) / dp), sum(lengths) / computed, len(plan[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="steps (independent draws) per case; worst is shown")
    parser.add_argument("--per-rank", type=int, default=4, help="sequences' worth of samples per DP rank")
    args = parser.parse_args()
    model = plan_model(PRESET).model
    spec = VisionSpec.from_configs(DataConfig(max_pixels=262144), model)
    cases = (("ReCap-like (stage 1)", recap, 256, ("vision", "language")),
             ("stage-3-like", stage3, 128, ("vision",)))
    start = time.perf_counter()
    print(f"{PRESET}, seq_length {SEQ_LENGTH}, padded to x{PAD}; worst of {args.steps} steps per case; "
          f"baseline first_fit_decreasing (FFD), same samples")
    print("| data | DP | samples/step | M FFD | M bal | max/mean FFD | max/mean balanced | bound | eff FFD | eff balanced |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, draw, recipe, freeze in cases:
        rng = np.random.default_rng(0)
        mean_length = np.mean([n for n, _ in draw(2000, rng, spec)])
        loads = [(dp, max(recipe, int(dp * args.per_rank * SEQ_LENGTH / mean_length))) for dp in (8, 64, 512)]
        loads += [(dp, recipe) for dp in (8, 64) if recipe >= dp and (dp, recipe) not in loads]  # the recipe's batch
        for dp, count in loads:
            worst, bound = {p: (0.0, 1.0, 0) for p in POLICIES}, 0.0
            for _ in range(args.steps):
                samples = draw(count, rng, spec)
                costs = [sample_flops(model, n, grids, freeze) for n, grids in samples]
                bound = max(bound, max(costs) / (sum(costs) / dp), 1.0)  # no policy beats the largest sample
                for p in POLICIES:
                    ratio, eff, m = evaluate(model, samples, dp, p, freeze, costs)
                    w = worst[p]
                    worst[p] = (max(w[0], ratio), min(w[1], eff), max(w[2], m))
            f, b = worst["first_fit_decreasing"], worst["flop_balanced"]
            print(f"| {name} | {dp} | {count} | {f[2]} | {b[2]} | {f[0]:.3f} | {b[0]:.3f} | {bound:.3f} | {f[1]:.4f} | {b[1]:.4f} |",
                  flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
