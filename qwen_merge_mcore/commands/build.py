NAME = "build"
HELP = "Build the Qwen-Merge HF checkpoint from a Qwen2.5-VL (ViT + merger) and a Qwen3 LLM, streaming."
EXAMPLES = ["qmm build --vlm ckpt/Qwen2.5-VL-72B-Instruct --llm ckpt/Qwen3-8B --out ckpt/qwen-merge-8b",
            "qmm build --vlm work/tiny/qwen2_5_vl --llm work/tiny/qwen3 --out work/merge --dtype fp32 --overwrite"]


def add_arguments(p) -> None:
    p.add_argument("--vlm", required=True, help="Qwen2.5-VL HF folder (its visual.* and processor are used)")
    p.add_argument("--llm", required=True, help="Qwen3 HF folder (its weights, tokenizer, generation config)")
    p.add_argument("--out", required=True, help="output folder (written to a temp dir, renamed at the end)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                   help="cast every tensor (default: keep each source dtype)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new projector layer's init")
    p.add_argument("--init-std", type=float, default=0.02, help="std of the new visual.merger.mlp.4 weight")
    p.add_argument("--max-shard-size", default="5GB", help="output shard size cap, e.g. 5GB or 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args) -> int:
    from ..checkpoint.build import build_qwen_merge
    from ..checkpoint.safetensors_io import parse_size

    res = build_qwen_merge(args.vlm, args.llm, args.out, overwrite=args.overwrite, dtype=args.dtype,
                           seed=args.seed, init_std=args.init_std,
                           max_shard_bytes=parse_size(args.max_shard_size))
    print(f"wrote {res.tensors} tensors ({res.bytes / 1e9:.2f} GB) to {res.out}")
    return 0
