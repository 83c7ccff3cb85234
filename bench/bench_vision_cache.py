"""Stage-1 step time with the ViT feature cache (`data.vision_cache`) against without, same run,
same data, and the bytes the cache stores per image.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_vision_cache.py [--images 16] [--size 224] [--steps 9]

One spawned rank (CPU, gloo, fp32, the tiny model, ViT and LLM frozen as in stage 1) trains the
same unshuffled data three times: without the cache (baseline: every image decoded and encoded
on every pass), filling an empty cache, then reading it (every image a hit: no decode, no ViT).
Step times are the trainer's own; the median of each run, its first step left out (warm-up). On the tiny
model the LLM step is cheap, so the ratio shows decode + ViT against a cache read; on a 72B-ViT
preset the ViT is a larger share of a stage-1 step (docs/training.md gives the sizes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _config(tokenizer, data, cache, size: int, steps: int):
    from qwen_merge_mcore.config import config_from_dict

    return config_from_dict({
        "model": {"preset": "tiny", "backend": "local"},
        "precision": {"params_dtype": "fp32"},
        "train": {"stage": "stage1", "freeze": ["vision", "language"], "lr": 5e-3, "global_batch_samples": 4,
                  "train_iters": steps},
        "data": {"template": "pretrain", "seq_length": 1024, "max_pixels": size * size, "num_workers": 1,
                 "shuffle": False, "tokenizer": str(tokenizer), "vision_cache": cache,
                 "datasets": [{"path": str(data), "name": "captions"}]},
    }, check_runtime=False)


def _timed(cfg) -> list[float]:
    """Seconds of each training step of one run."""
    from qwen_merge_mcore.training import observability
    from qwen_merge_mcore.training.loop import run_training

    seconds, step = [], observability.StepLogger.step

    def record(self, iteration, result, lr, elapsed, *args):
        seconds.append(elapsed)
        return step(self, iteration, result, lr, elapsed, *args)

    observability.StepLogger.step = record
    try:
        run_training(cfg)
    finally:
        observability.StepLogger.step = step
    return seconds


def _bench(tokenizer, data, cache, size: int, steps: int) -> dict:
    plain = _timed(_config(tokenizer, data, None, size, steps))
    filling = _timed(_config(tokenizer, data, cache, size, steps))
    reading = _timed(_config(tokenizer, data, cache, size, steps))
    return {"plain": plain, "filling": filling, "reading": reading}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16, help="images in the data set (default 16)")
    p.add_argument("--size", type=int, default=224,
                   help="image side in pixels, also data.max_pixels = size^2 (default 224)")
    p.add_argument("--steps", type=int, default=9, help="steps per run (default 9; 4 samples each)")
    args = p.parse_args(argv)

    from safetensors import safe_open

    from qwen_merge_mcore.fixtures import make_tiny
    from qwen_merge_mcore.fixtures.tiny_data import make_tiny_data
    from qwen_merge_mcore.testing import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = make_tiny(root / "models")["qwen2_5_vl"]
        data = make_tiny_data(root / "data", samples=args.images, size=args.size)["captions"]
        cache = root / "cache"
        (times,) = run_distributed(_bench, world_size=1, args=(tokenizer, data, str(cache), args.size, args.steps))
        shards = sorted(cache.glob("*.safetensors"))
        entries = 0
        for path in shards:
            with safe_open(str(path), framework="pt") as f:
                entries += len(list(f.keys()))
        stored = sum(path.stat().st_size for path in shards)
        with safe_open(str(shards[0]), framework="pt") as f:
            first = f.get_slice(next(iter(f.keys())))
            shape, dtype = first.get_shape(), first.get_dtype()

    median = {name: statistics.median(t[1:]) for name, t in times.items()}
    print(f"tiny model, {args.images} images of {args.size}x{args.size} px, {args.steps} steps per run "
          f"(median, first left out), CPU")
    for name in ("plain", "filling", "reading"):
        steps = ", ".join(f"{t * 1e3:.0f}" for t in times[name])
        print(f"  {name:8s} step {median[name] * 1e3:8.1f} ms  (steps: {steps})")
    print(f"step time without cache / with cache (all hits): {median['plain'] / median['reading']:.2f}x")
    print(f"cache: {entries} images in {len(shards)} shard(s), {stored:,} bytes, {stored / entries:,.0f} bytes per "
          f"image (features {shape} {dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
