"""Benchmark `qmm hf2mcore` against a plain file copy of the same bytes on the same disk.

Builds a synthetic HF checkpoint with the real Qwen3-8B shapes (hidden 4096, 32 heads, 8 KV
heads, head_dim 128, MLP 12288, vocabulary 151936, untied embeddings) but only a few layers
(--layers, default 4: about 4.5 GB in bf16), in a temporary folder that is deleted afterwards.
Then, in the same run:

  copy      shutil.copyfile of every safetensors file into the same temp folder
  convert   `hf2mcore` (spawned ranks, as `qmm hf2mcore` runs), end to end and its write phase

and prints throughput (GB of weights per second) and convert/copy ratios, the size written
(`.distcp` shards, and the whole folder) against the input's weights (target: within 1% plus
metadata), plus the peak RSS of every conversion process (getrusage, as the ranks report it in the
manifest). With --fsync both
sides flush to disk (os.fsync); without, both leave it to the page cache.

    python bench/bench_convert.py --layers 2 --tp 2   # Qwen3-8B shapes, 3.3 GB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the synthetic Qwen3-8B")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--fsync", action="store_true", help="both copy and conversion fsync their files")
    p.add_argument("--workdir", default=None, help="where the temp folder goes (default: the system temp dir)")
    args = p.parse_args()

    from qwen_merge_mcore.checkpoint.hf2mcore import MANIFEST, ConvertOptions, hf_to_mcore

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    try:
        src = root / "hf"
        nbytes = make_checkpoint(src, args.layers)
        os.sync()  # both measurements start with no dirty pages pending
        copy_s = copy_files(src, root / "copy", args.fsync)
        shutil.rmtree(root / "copy")
        os.sync()
        start = time.perf_counter()
        hf_to_mcore(ConvertOptions(hf=str(src), out=str(root / "mcore"), tp=args.tp, pp=args.pp,
                                   progress=False, sync_files=args.fsync))
        convert_s = time.perf_counter() - start
        manifest = json.loads((root / "mcore" / MANIFEST).read_text())
        ranks = manifest["ranks"]
        shards = sum(f["bytes"] for name, f in manifest["files"].items() if name.endswith(".distcp"))
        folder = sum(p.stat().st_size for p in (root / "mcore").rglob("*") if p.is_file())
        save_s = max(r["save_seconds"] for r in ranks)
        gb = nbytes / 1e9
        result = {
            "checkpoint": f"Qwen3-8B shapes, {args.layers} layers, {gb:.2f} GB bf16", "tp": args.tp, "pp": args.pp,
            "fsync": args.fsync, "copy_gb_s": round(gb / copy_s, 3),
            "convert_gb_s_end_to_end": round(gb / convert_s, 3),
            "convert_gb_s_write_phase": round(gb / save_s, 3),
            "ratio_end_to_end": round(copy_s / convert_s, 3), "ratio_write_phase": round(copy_s / save_s, 3),
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
