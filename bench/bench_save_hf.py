"""Peak memory per rank of `checkpoint.save_hf` during training, against the converters' bound.

A Qwen-Merge model with the tiny ViT and a language model of real width in its largest tensors
(vocabulary 151936, untied, hidden --hidden, --layers decoder layers; fp32 parameters, AdamW)
trains one step on CPU ranks (gloo, TP --tp) started from an HF folder (`checkpoint.pretrained`),
then saves with `checkpoint.save_hf: true`. On every rank a sampler thread reads the resident set
size (/proc/self/statm) every 2 ms while the ranks write the HF folder; the rank's RSS just before
is its baseline (its model, gradients and optimizer state). In the same run, `qmm mcore2hf` of the
checkpoint just saved, in a process of its own, measured the same way (the baseline).

The bound, as the converters state it (docs/converters.md): memory for the largest load unit
(one decoder layer, or the embedding / LM head), not the model. The save_hf bound stated and
checked here is 2 x the largest unit's TP-free bytes in the model's dtype: the assembled tensors of
the unit, their converted HF copies (at most as large), and the one slice being received.

    python bench/bench_save_hf.py --tp 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Highest RSS seen (sampled every `interval` s) while the block runs, and the RSS before it."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self.before = interval, 0, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.before = self.peak = rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def model_shapes(tiny: dict, hidden: int, layers: int) -> dict:
    """The tiny Qwen-Merge HF config with a wide language model."""
    cfg = json.loads(Path(tiny).read_text())
    heads = hidden // 64
    cfg["text_config"].update(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=64,
                              vocab_size=151936)
    cfg["vision_config"]["out_hidden_size2"] = hidden
    return cfg


def make_source(meta_dir: str, out: str) -> None:
    """Rank body: an HF folder of the bench model (random initial weights) to start from."""
    from qwen_merge_mcore.checkpoint.common import model_chunks, read_model_config
    from qwen_merge_mcore.checkpoint.hf_export import export_hf
    from qwen_merge_mcore.config import ExperimentConfig

    cfg = read_model_config(Path(meta_dir) / "config.json")[1]
    cfg.backend = "local"
    export_hf(model_chunks(ExperimentConfig(model=cfg)), out, meta_dir, cfg)


def train_and_save(source: str, save: str, tp: int) -> dict:
    """Rank body: one training step from `source`, then a save with save_hf, measured."""
    from dataclasses import asdict

    from qwen_merge_mcore.checkpoint import hf_export
    from qwen_merge_mcore.checkpoint.common import read_model_config
    from qwen_merge_mcore.config import config_from_dict
    from qwen_merge_mcore.training import checkpointing
    from qwen_merge_mcore.training.loop import run_training
    from tests.train.synthetic import SyntheticData

    model = asdict(read_model_config(Path(source) / "config.json")[1])
    model.update(backend="local", preset=None)
    cfg = config_from_dict({
        "model": model, "parallel": {"tensor_model_parallel_size": tp}, "precision": {"params_dtype": "fp32"},
        "train": {"lr": 1e-4, "global_batch_samples": 2, "micro_batch_size": 1, "train_iters": 1, "freeze": ["vision"],
                  "engine": "cpu", "lr_warmup_fraction": 0.0},
        "checkpoint": {"pretrained": source, "save": save, "save_hf": True}, "logging": {"progress_bar": False}})
    measured = {}

    def measured_export(chunks, *args, **kw):
        unit = max(sum(math.prod(shape) * sh.data.element_size() for _, _, shape, sh in members)
                   for chunk in chunks for members in hf_export._units(chunk).values())
        with PeakRSS() as m:
            start = time.perf_counter()
            out = hf_export.export_hf(chunks, *args, **kw)
        measured.update(before=m.before, peak=m.peak, seconds=time.perf_counter() - start, largest_unit=unit)
        return out

    checkpointing.export_hf = measured_export
    run_training(cfg, make_data=lambda c, r, s: SyntheticData(c, r, s, seq_length=64))
    return measured


def mcore2hf_peak(ckpt: str, out: str, queue) -> None:
    from qwen_merge_mcore.checkpoint.mcore2hf import mcore_to_hf

    with PeakRSS() as m:
        mcore_to_hf(ckpt, out, progress=False)
    queue.put((m.before, m.peak))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    import multiprocessing as mp

    from qwen_merge_mcore.checkpoint.build import build_qwen_merge
    from qwen_merge_mcore.checkpoint.common import copy_hf_meta
    from qwen_merge_mcore.distributed import run_distributed
    from qwen_merge_mcore.fixtures import make_tiny
    from qwen_merge_mcore.training.checkpointing import HF_DIR, iter_dir

    root = Path(tempfile.mkdtemp(prefix="bench-save-hf-", dir=args.workdir))
    try:
        tiny = make_tiny(root / "tiny")
        merge = build_qwen_merge(tiny["qwen2_5_vl"], tiny["qwen3"], root / "merge", progress=False).out
        meta = root / "meta"
        copy_hf_meta(merge, meta)
        (meta / "config.json").write_text(json.dumps(model_shapes(meta / "config.json", args.hidden, args.layers)))
        run_distributed(make_source, world_size=1, args=(str(meta), str(root / "source")), timeout=1800)
        ranks = run_distributed(train_and_save, world_size=args.tp, tp=args.tp,
                                args=(str(root / "source"), str(root / "run"), args.tp), timeout=1800)
        ckpt = iter_dir(root / "run", 1)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=mcore2hf_peak, args=(str(ckpt), str(root / "exported"), queue))
        proc.start()
        conv_before, conv_peak = queue.get(timeout=1800)
        proc.join()
        unit = max(r["largest_unit"] for r in ranks)
        gb = 1e9
        weights = sum(f.stat().st_size for f in (ckpt / HF_DIR).glob("*.safetensors"))
        extra = [r["peak"] - r["before"] for r in ranks]
        result = {
            "model": f"Qwen-Merge, tiny ViT, LLM hidden {args.hidden}, {args.layers} layers, vocab 151936 untied, "
                     f"fp32; HF folder {weights / gb:.3f} GB bf16",
            "tp": args.tp,
            "largest_unit_gb": round(unit / gb, 3),
            "bound_gb (2 x largest unit)": round(2 * unit / gb, 3),
            "save_hf_rss_before_gb_per_rank": [round(r["before"] / gb, 3) for r in ranks],
            "save_hf_peak_rss_gb_per_rank": [round(r["peak"] / gb, 3) for r in ranks],
            "save_hf_extra_rss_gb_per_rank": [round(e / gb, 3) for e in extra],
            "save_hf_seconds": round(max(r["seconds"] for r in ranks), 2),
            "mcore2hf_extra_rss_gb (baseline)": round((conv_peak - conv_before) / gb, 3),
            "ratio_save_hf_extra_to_mcore2hf_extra": round(max(extra) / max(conv_peak - conv_before, 1), 3),
            "within_bound": all(e <= 2 * unit for e in extra),
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
