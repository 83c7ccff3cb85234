NAME = "hf2mcore"
HELP = ("Convert a Qwen-Merge, Qwen3 or Qwen2.5-VL HF folder to a Megatron-Core torch_dist checkpoint "
        "(spawns one process per model-parallel rank; under torchrun/srun, each launched process is one rank: "
        "torchrun --nproc-per-node 4 -m qwen_merge_mcore hf2mcore ... --tp 4).")
EXAMPLES = ["qmm hf2mcore --hf ckpt/qwen-merge-8b --out ckpt/qwen-merge-8b-mcore --tp 4 --pp 2",
            "qmm hf2mcore --hf work/merge --out work/merge-mcore --tp 2 --pp 2 --vpp 2 --overwrite"]


def add_arguments(p) -> None:
    p.add_argument("--hf", required=True, help="HF checkpoint folder (safetensors, config.json, tokenizer)")
    p.add_argument("--out", required=True, help="output torch_dist checkpoint folder")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per pipeline rank")
    p.add_argument("--first-stage-layers", type=int, default=None,
                   help="decoder layers on the first pipeline stage (which also holds the ViT)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default="bf16", help="parameter dtype")
    p.add_argument("--no-fsync", action="store_true", help="skip fsync of the written files")
    p.add_argument("--timeout-minutes", type=int, default=None,
                   help="how long a rank may wait for the others in one collective (default 240: a 72B model "
                        "written by few ranks to a slow shared file system)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args) -> int:
    from ..checkpoint.hf2mcore import TIMEOUT_MINUTES, ConvertOptions, hf_to_mcore

    out = hf_to_mcore(ConvertOptions(
        hf=args.hf, out=args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, first_stage_layers=args.first_stage_layers,
        dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress, sync_files=not args.no_fsync,
        timeout_minutes=TIMEOUT_MINUTES if args.timeout_minutes is None else args.timeout_minutes))
    print(f"wrote {out}")
    return 0
