"""Peak memory of `qmm merge` on synthetic Qwen3-8B-shaped checkpoints: bounded by slices, not the model.

Writes, in a temporary folder that is deleted afterwards, three checkpoints (model A, model B and
a base) with the real Qwen3-8B tensor shapes (hidden 4096, ffn 12288, 32 heads, 8 KV heads,
vocab 151936) and a few layers, for each requested depth. Then, each in a fresh child process:
an idle child that only imports the merger (the RSS floor), the merge, and a plain file copy of
model A (the I/O baseline). Prints peak RSS against the size of one model and of its largest
tensor, and merge throughput against the copy. Peak RSS is the child's VmHWM (/proc/self/status),
the high-water mark of its own address space: ru_maxrss would also count the parent's RSS at
fork time, which Linux carries over through exec.

    python bench/bench_merge.py --layers 1,4 --method ties
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from qwen_merge_mcore.checkpoint.safetensors_io import ShardedSafetensorsWriter, TensorSpec  # noqa: E402

QWEN3_8B = {"hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "vocab_size": 151936, "hidden_act": "silu", "model_type": "qwen3",
            "architectures": ["Qwen3ForCausalLM"], "tie_word_embeddings": False}
GB = 10**9


def qwen3_specs(layers: int) -> list[TensorSpec]:
    h, f, v, d = QWEN3_8B["hidden_size"], QWEN3_8B["intermediate_size"], QWEN3_8B["vocab_size"], QWEN3_8B["head_dim"]
    q, kv = QWEN3_8B["num_attention_heads"] * d, QWEN3_8B["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    return [TensorSpec(n, s, torch.bfloat16) for n, s in sorted(shapes.items())]


def write_synthetic(folder: Path, layers: int, seed: int) -> None:
    """One tensor at a time, so writing the inputs needs no more memory than the merge."""
    specs = qwen3_specs(layers)
    gen = torch.Generator().manual_seed(seed)
    w = ShardedSafetensorsWriter(folder, specs, max_shard_bytes=2 * GB)
    for s in specs:
        w.write(s.name, torch.randn(s.shape, generator=gen, dtype=torch.bfloat16).mul_(0.02))
    w.close()
    (folder / "config.json").write_text(json.dumps({**QWEN3_8B, "num_hidden_layers": layers}))


def child(code: str) -> dict:
    """Run code in a fresh interpreter; it leaves a dict in `result`; add its peak RSS and wall time."""
    wrapper = (f"import json, sys, time\nsys.path.insert(0, {str(REPO)!r})\nt0 = time.time()\n{code}\n"
               "result['seconds'] = time.time() - t0\n"
               "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
               "result['peak_rss'] = int(hwm.split()[1]) * 1024\n"  # kB
               "print(json.dumps(result))")
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="1,4", help="depths to try, comma separated (default 1,4)")
    parser.add_argument("--method", default="ties", choices=["linear", "ties", "dare_ties", "dare_linear"])
    parser.add_argument("--workdir", default=None, help="where the temporary checkpoints go (default: system temp)")
    args = parser.parse_args()

    idle = child("import torch\nimport qwen_merge_mcore.merging\nresult = {}")["peak_rss"]
    print(f"idle child (python + torch + merger imported): peak RSS {idle / GB:.2f} GB")
    print(f"method {args.method}, Qwen3-8B shapes, bf16; 3 inputs (A, B, base) per run\n")
    header = (f"{'layers':>6} {'model GB':>9} {'largest GB':>10} {'peak RSS GB':>11} {'RSS-idle GB':>11} "
              f"{'peak/model':>10} {'(peak-idle)/largest':>19} {'merge s':>8} {'merge/copy speed':>16}")
    print(header)
    for layers in (int(x) for x in args.layers.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench-merge-", dir=args.workdir) as tmp:
            tmp = Path(tmp)
            for i, name in enumerate(("a", "b", "base")):
                write_synthetic(tmp / name, layers, seed=i)
            size = folder_bytes(tmp / "a")
            largest = max(s.nbytes for s in qwen3_specs(layers))
            base = f", base={str(tmp / 'base')!r}" if args.method != "linear" else ""
            merge = child(
                "from qwen_merge_mcore.merging import MergeSpec, merge_folders\n"
                f"spec = MergeSpec({args.method!r}, ({str(tmp / 'a')!r}, {str(tmp / 'b')!r}){base})\n"
                f"merge_folders(spec, {str(tmp / 'out')!r}, progress=False)\nresult = {{}}")
            copy = child(f"import shutil\nshutil.copytree({str(tmp / 'a')!r}, {str(tmp / 'copy')!r})\nresult = {{}}")
            # Bytes moved: the merge reads 3 inputs' merged tensors + A's copied ones and writes one model;
            # the copy reads and writes one model. Compare bytes per second.
            n_in = 2 if args.method == "linear" else 3
            merged_bytes = sum(s.nbytes for s in qwen3_specs(layers) if "layers." in s.name or "norm" in s.name)
            merge_io = size + (n_in - 1) * merged_bytes + size
            speed = (merge_io / merge["seconds"]) / (2 * size / copy["seconds"])
            print(f"{layers:>6} {size / GB:>9.2f} {largest / GB:>10.2f} {merge['peak_rss'] / GB:>11.2f} "
                  f"{(merge['peak_rss'] - idle) / GB:>11.2f} {merge['peak_rss'] / size:>10.2f} "
                  f"{(merge['peak_rss'] - idle) / largest:>19.2f} {merge['seconds']:>8.1f} {speed:>16.2f}")
            shutil.rmtree(tmp / "out")


if __name__ == "__main__":
    main()
