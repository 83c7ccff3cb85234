NAME = "merge"
HELP = ("Merge the language models of Hugging Face checkpoints (Qwen-Merge, Qwen3, Qwen2.5-VL) "
        "tensor by tensor; vision tower, projector, embeddings and lm_head come from the first model.")
EXAMPLES = [
    "qmm merge --method ties --model work/qwen-merge-4b --model Qwen3-4B-math --base Qwen3-4B "
    "--density 0.2 --out work/merged",
    "qmm merge --method linear --model A --model B --weights 0.9,0.1 --out work/merged --overwrite",
    "qmm merge --method layerswap --model A --model B --layers 0-5 --out work/swapped",
    "qmm merge --method dare_linear --model A --model B --base BASE --density 0.3 --seed 1 --out work/dare",
]


def add_arguments(p) -> None:
    from ..merging.spec import METHODS

    p.add_argument("--method", required=True, choices=METHODS, help="merging rule (see docs/merging.md)")
    p.add_argument("--model", action="append", required=True, dest="models", metavar="DIR",
                   help="a Hugging Face model folder; repeat for each model. The first one is the primary: "
                        "its vision tower, projector, embeddings, lm_head, config and tokenizer are kept")
    p.add_argument("--base", metavar="DIR", help="common ancestor for task vectors (ties, dare_ties, dare_linear)")
    p.add_argument("--weights", help="one weight per model, comma separated (default: linear 1/n each; "
                                     "ties/dare 1.0 each; layerswap 0,1 = other layers taken from the second model); "
                                     "linear and layerswap weights must sum to 1")
    p.add_argument("--any-weight-sum", action="store_true",
                   help="allow linear/layerswap weights that do not sum to 1 (they scale every merged tensor)")
    p.add_argument("--density", type=float, default=0.2,
                   help="ties: fraction of each task vector kept by magnitude; dare: keep probability (default 0.2)")
    p.add_argument("--layers", help="layerswap: layers kept from the first model, e.g. 0-5,8")
    p.add_argument("--seed", type=int, default=0, help="seed of the DARE drop masks (default 0)")
    p.add_argument("--include-embeddings", action="store_true",
                   help="also merge model.embed_tokens and lm_head (default: copied from the first model); "
                        "refused when some models tie lm_head to the embeddings and others do not")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument("--out", required=True, help="output folder (written to a temp folder, renamed at the end)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..checkpoint.safetensors_io import parse_size
    from ..merging import MergeSpec, merge_folders
    from ..merging.names import parse_layers

    weights = None
    if args.weights:
        try:
            weights = tuple(float(w) for w in args.weights.split(","))
        except ValueError:
            raise ValueError(f"--weights {args.weights!r}: give numbers separated by commas, e.g. 0.9,0.1") from None
    spec = MergeSpec(method=args.method, models=tuple(args.models), base=args.base, weights=weights,
                     density=args.density, layers=parse_layers(args.layers) if args.layers else frozenset(),
                     seed=args.seed, include_embeddings=args.include_embeddings,
                     any_weight_sum=args.any_weight_sum)
    out = merge_folders(spec, args.out, overwrite=args.overwrite, max_shard_bytes=parse_size(args.max_shard_size),
                        progress=not args.no_progress)
    print(f"merged ({args.method}) -> {out}")
    return 0
