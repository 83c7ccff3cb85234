NAME = "mcore2hf"
HELP = "Export a Megatron-Core torch_dist checkpoint (any TP/PP/VPP) to a Hugging Face folder, streaming."
EXAMPLES = ["qmm mcore2hf --mcore ckpt/qwen-merge-8b-mcore --out ckpt/qwen-merge-8b-hf",
            "qmm mcore2hf --mcore checkpoints/stage3 --out work/stage3-hf  # a run folder: its latest checkpoint",
            "qmm mcore2hf --mcore work/merge-mcore --out work/merge-back --dtype fp32 --overwrite"]


def add_arguments(p) -> None:
    p.add_argument("--mcore", required=True, help="torch_dist checkpoint folder written by `qmm hf2mcore` "
                   "or by training (its iter_* folder), or a training run folder (its latest checkpoint)")
    p.add_argument("--out", required=True, help="output HF folder")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                   help="output dtype (default: the dtype of the original HF config)")
    p.add_argument("--max-shard-size", default="5GB", help="output shard size cap, e.g. 5GB")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args) -> int:
    from ..checkpoint.mcore2hf import mcore_to_hf
    from ..checkpoint.safetensors_io import parse_size

    out = mcore_to_hf(args.mcore, args.out, dtype=args.dtype, overwrite=args.overwrite,
                      max_shard_bytes=parse_size(args.max_shard_size), progress=not args.no_progress)
    print(f"wrote {out}")
    return 0
