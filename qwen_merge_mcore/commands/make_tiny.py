NAME = "make-tiny"
HELP = "Write tiny random Qwen2.5-VL and Qwen3 checkpoints (+ tokenizer) for tests, offline."
EXAMPLES = ["qmm make-tiny --out work/tiny", "qmm make-tiny --out work/tiny32 --dtype float32 --overwrite"]


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="output folder (gets qwen2_5_vl/, qwen3/, qwen3-tied/)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weight dtype")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args) -> int:
    from ..fixtures import make_tiny

    for name, path in make_tiny(args.out, dtype=args.dtype, seed=args.seed, overwrite=args.overwrite).items():
        print(f"{name}: {path}")
    return 0
