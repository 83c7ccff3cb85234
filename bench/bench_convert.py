"""Benchmark `qmm hf2mcore` against a plain file copy of the same bytes on the same disk.

Builds a synthetic HF checkpoint with the real Qwen3-8B shapes (hidden 4096, 32 heads, 8 KV
heads, head_dim 128, MLP 12288, vocabulary 151936, untied embeddings) but only a few layers
(--layers, default 4: about 4.5 GB in bf16), in a temporary folder that is deleted afterwards.
Then, in the same run, --repeat times each, interleaved (so that a noisy neighbour hits both):

  copy      shutil.copyfile of every safetensors file into the same temp folder (the floor)
  convert   `hf_to_mcore`, what `qmm hf2mcore` runs once its modules are imported: checks, the
            ranks (forked, one per model-parallel rank), their writes, the manifest; also its
            write phase alone (the slowest rank's `save_streaming`)
  cli       `python -m qwen_merge_mcore hf2mcore` as a user runs it: also the interpreter start
            and the imports of torch and Megatron-Core (about 3 s here, whatever the model size)

and prints medians of throughput (GB of weights per second), convert/copy ratios, the size written
(`.distcp` shards, and the whole folder) against the input's weights (target: within 1% plus
metadata), plus the peak RSS of every conversion process (getrusage, as the ranks report it in the
manifest). With --fsync all sides flush to disk (os.fsync); without, they leave it to the page cache.

    python bench/bench_convert.py --layers 2 --tp 2   # Qwen3-8B shapes, 3.3 GB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096,
    "intermediate_size": 12288, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "attention_bias": False,
    "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645, "dtype": "bfloat16",
}


def make_checkpoint(folder: Path, layers: int) -> int:
    """Random bf16 weights with Qwen3-8B shapes, written tensor by tensor; returns bytes of weights."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qwen_merge_mcore.checkpoint.safetensors_io import ShardedSafetensorsWriter, TensorSpec

    cfg = dict(QWEN3_8B, num_hidden_layers=layers)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Qwen3ForCausalLM(Qwen3Config(**cfg)).state_dict().items()}
    writer = ShardedSafetensorsWriter(folder, [TensorSpec(k, s, torch.bfloat16) for k, s in shapes.items()],
                                      max_shard_bytes=2 * 10**9)
    gen = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.write(name, torch.empty(shape, dtype=torch.bfloat16).uniform_(-0.05, 0.05, generator=gen))
    writer.close()
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return writer.total_size


def copy_files(src: Path, dst: Path, fsync: bool) -> float:
    dst.mkdir()
    start = time.perf_counter()
    for path in sorted(src.glob("*.safetensors")):
        shutil.copyfile(path, dst / path.name)
        if fsync:
            fd = os.open(dst / path.name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return time.perf_counter() - start


def run_cli(src: Path, out: Path, tp: int, pp: int, fsync: bool) -> float:
    cmd = [sys.executable, "-m", "qwen_merge_mcore", "hf2mcore", "--hf", str(src), "--out", str(out),
           "--tp", str(tp), "--pp", str(pp), "--no-progress", *([] if fsync else ["--no-fsync"])]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    shutil.rmtree(out)
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the synthetic Qwen3-8B")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="measurements of each kind; medians are printed")
    p.add_argument("--fsync", action="store_true", help="copy and conversion fsync their files")
    p.add_argument("--workdir", default=None, help="where the temp folder goes (default: the system temp dir)")
    args = p.parse_args()

    from qwen_merge_mcore.checkpoint.hf2mcore import MANIFEST, ConvertOptions, hf_to_mcore

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    try:
        src = root / "hf"
        nbytes = make_checkpoint(src, args.layers)
        copy_s, convert_s, save_s, cli_s = [], [], [], []
        # Each output is deleted before the next measurement, so that every one writes into
        # memory the kernel has just freed (on a VM, memory not touched for a while costs the
        # first writer several times more: the first of each kind is the slow one).
        for _ in range(args.repeat):
            os.sync()  # each measurement starts with no dirty pages pending
            copy_s.append(copy_files(src, root / "copy", args.fsync))
            shutil.rmtree(root / "copy")
            os.sync()
            start = time.perf_counter()
            hf_to_mcore(ConvertOptions(hf=str(src), out=str(root / "mcore"), tp=args.tp, pp=args.pp,
                                       progress=False, sync_files=args.fsync))
            convert_s.append(time.perf_counter() - start)
            manifest = json.loads((root / "mcore" / MANIFEST).read_text())
            save_s.append(max(r["save_seconds"] for r in manifest["ranks"]))
            folder = sum(p.stat().st_size for p in (root / "mcore").rglob("*") if p.is_file())
            shutil.rmtree(root / "mcore")
            os.sync()
            cli_s.append(run_cli(src, root / "cli", args.tp, args.pp, args.fsync))
        copy, convert, save, cli = (statistics.median(x) for x in (copy_s, convert_s, save_s, cli_s))
        ranks = manifest["ranks"]
        shards = sum(f["bytes"] for name, f in manifest["files"].items() if name.endswith(".distcp"))
        gb = nbytes / 1e9
        result = {
            "checkpoint": f"Qwen3-8B shapes, {args.layers} layers, {gb:.2f} GB bf16", "tp": args.tp, "pp": args.pp,
            "fsync": args.fsync, "repeat": args.repeat, "copy_gb_s": round(gb / copy, 3),
            "convert_gb_s_end_to_end": round(gb / convert, 3), "convert_gb_s_write_phase": round(gb / save, 3),
            "cli_gb_s": round(gb / cli, 3),
            "ratio_end_to_end": round(copy / convert, 3), "ratio_write_phase": round(copy / save, 3),
            "ratio_cli": round(copy / cli, 3),
            "seconds": {"copy": [round(x, 2) for x in copy_s], "convert": [round(x, 2) for x in convert_s],
                        "write_phase": [round(x, 2) for x in save_s], "cli": [round(x, 2) for x in cli_s]},
            "input_weights_gb": round(gb, 4), "written_shards_gb": round(shards / 1e9, 4),
            "written_folder_gb": round(folder / 1e9, 4), "written_shards_vs_input": round(shards / nbytes, 4),
            "peak_rss_gb_per_rank": [round(r["peak_rss_bytes"] / 1e9, 3) for r in sorted(ranks, key=lambda r: r["rank"])],
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
