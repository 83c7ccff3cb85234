NAME = "plan"
HELP = ("Rank parallel layouts (TP/PP/VPP/CP/DP, recompute) by predicted step time, memory and MFU on a GPU "
        "cluster; write the best as a training-config override.")
EXAMPLES = [
    "qmm plan --preset qwen-merge-72bvit-32b --gpus 256 --gpu h100-80gb --seq-length 8192 --global-batch-samples 512",
    "qmm plan --preset qwen-merge-72bvit-8b --gpus 64 --fp8 --json --top 3",
    "qmm plan --preset qwen-merge-72bvit-32b --gpus 256 --write-override work/plan-32b.yaml",
    "qmm plan --preset llama3-70b --gpus 64 --fp8 --global-batch-samples 128 --sample-length 8192 --freeze",
]


def add_arguments(p) -> None:
    p.add_argument("--preset", required=True,
                   help="model: a qwen-merge-72bvit-* or tiny preset, or llama3-8b/llama3-70b/llama3.1-405b (text only)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpu", default="h100-80gb", help="GPU type: h100-80gb (default) or h200-141gb")
    p.add_argument("--seq-length", type=int, default=8192, help="packed sequence length (default 8192)")
    p.add_argument("--global-batch-samples", type=int, default=512,
                   help="samples per optimizer step, as train.global_batch_samples (default 512); they pack into "
                        "samples x sample length / seq length sequences")
    p.add_argument("--fp8", action="store_true", help="FP8 decoder GEMMs (Transformer Engine)")
    p.add_argument("--sample-length", type=int, default=2048,
                   help="mean sample length inside a packed sequence; attention is per sample (default 2048)")
    p.add_argument("--images-per-sample", type=int, default=1, help="images per sample (default 1)")
    p.add_argument("--image-pixels", type=int, default=262144,
                   help="pixels per image; a square of the largest multiple of 28 px within it (default 262144)")
    p.add_argument("--freeze", nargs="*", default=["vision"], choices=["vision", "projector", "language"],
                   help="frozen parts (default: vision, as in every training stage); give none to train all")
    p.add_argument("--tp", type=int, help="fix the tensor-parallel size")
    p.add_argument("--pp", type=int, help="fix the pipeline-parallel size")
    p.add_argument("--vpp", type=int, help="fix the virtual pipeline size (0: none)")
    p.add_argument("--cp", type=int, help="fix the context-parallel size")
    p.add_argument("--mbs", type=int, help="fix the micro-batch size")
    p.add_argument("--first-stage-layers", type=int, help="fix the decoder layers on the first stage")
    p.add_argument("--recompute", choices=["none", "selective", "full"],
                   help="fix the recomputation (default: try none and full)")
    p.add_argument("--vision", choices=["sharded", "replicated"],
                   help="fix the ViT placement (model.vision.parallel; default: both when the ViT is frozen)")
    p.add_argument("--top", type=int, default=10, help="layouts to show (default 10)")
    p.add_argument("--json", action="store_true", help="print a JSON document instead of the table")
    p.add_argument("--write-override", metavar="FILE",
                   help="write the best layout as a YAML config override (parallel:, train:, data:)")


def image_grid(pixels: int, vision) -> tuple[int, int, int]:
    """(t, h, w) patches of a square image of at most `pixels`, sides multiples of patch*merge."""
    unit = vision.patch_size * vision.spatial_merge_size
    side = int(pixels ** 0.5) // unit * unit
    if side < unit:
        raise ValueError(f"--image-pixels {pixels} is smaller than one {unit}x{unit} merged patch")
    n = side // vision.patch_size
    return (1, n, n)


def run(args) -> int:
    import json
    from pathlib import Path

    from ..perf.hardware import gpu_spec
    from ..perf.models import known_models, plan_model
    from ..perf.planner import CostModel, LayoutChoice, Workload, plan
    from ..perf.report import override_yaml, plan_dict, plan_summary, plan_table
    from ..utils.atomic import atomic_write_text

    if args.preset not in known_models():
        raise ValueError(f"unknown --preset {args.preset!r}; known: {', '.join(known_models())}")
    for name in ("gpus", "seq_length", "global_batch_samples", "sample_length", "top"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.images_per_sample < 0:
        raise ValueError("--images-per-sample must be >= 0")
    target = plan_model(args.preset)
    grids = () if target.text_only else (image_grid(args.image_pixels, target.model.vision),) * args.images_per_sample
    workload = Workload(seq_length=args.seq_length, global_batch_samples=args.global_batch_samples,
                        sample_length=min(args.sample_length, args.seq_length), image_grids_per_sample=grids,
                        freeze=tuple(args.freeze), fp8=args.fp8)
    choice = LayoutChoice(tp=args.tp, pp=args.pp, vpp=args.vpp, cp=args.cp, micro_batch=args.mbs,
                          first_stage_layers=args.first_stage_layers, recompute=args.recompute, vision=args.vision)
    cost = CostModel()
    result = plan(target, workload, args.gpus, gpu_spec(args.gpu), choice, cost)
    if args.write_override:
        if target.text_only:
            raise ValueError(f"--write-override needs a Qwen-Merge preset; {args.preset} is a text-only reference")
        Path(args.write_override).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.write_override, override_yaml(result, result.best))
    if args.json:
        print(json.dumps(plan_dict(result, args.top, cost), indent=2))
    else:
        print(plan_summary(result))
        print(plan_table(result, args.top))
        if args.write_override:
            print(f"wrote {args.write_override}")
    return 0
