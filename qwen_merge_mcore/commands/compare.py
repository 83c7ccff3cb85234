NAME = "compare"
HELP = ("Run the same text and image prompts through the HF model (transformers) and the converted Megatron "
        "checkpoint; print max abs logit difference and top-5 agreement as JSON.")
EXAMPLES = ["qmm compare --hf ckpt/qwen-merge-8b --mcore ckpt/qwen-merge-8b-mcore --tp 2",
            "qmm compare --hf work/tiny/qwen3 --mcore work/qwen3-mcore --dtype fp32"]


def add_arguments(p) -> None:
    p.add_argument("--hf", required=True, help="the HF folder that was converted")
    p.add_argument("--mcore", required=True, help="the torch_dist checkpoint written by `qmm hf2mcore`")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load the checkpoint at (PP=1)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of both forward passes")
    p.add_argument("--max-abs-diff", type=float, default=None,
                   help="exit with status 1 when any prompt's max abs logit difference exceeds this")


def run(args) -> int:
    import json

    from ..checkpoint.compare import compare

    report = compare(args.hf, args.mcore, tp=args.tp, dtype=args.dtype)
    print(json.dumps(report, indent=2))
    if args.max_abs_diff is not None:
        worst = max(v["max_abs_diff"] for v in report.values() if isinstance(v, dict))
        return int(worst > args.max_abs_diff)
    return 0
