NAME = "config"
HELP = "Load, validate and print an experiment config with its overrides resolved."
EXAMPLES = ["qmm config launch/stage3.yaml train.lr=1e-4 parallel.tensor_model_parallel_size=2",
            "qmm config launch/tiny/stage1.yaml --no-runtime-check",
            "qmm config launch/stage1.yaml --world-size 64 --no-runtime-check"]


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML experiment config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, key.path=value")
    p.add_argument("--no-runtime-check", action="store_true",
                   help="skip checks that depend on this machine (FP8 needs Transformer Engine, "
                        "logging.tensorboard_dir needs tensorboard): for a config meant for another machine")
    p.add_argument("--world-size", type=int, metavar="N",
                   help="also check the layout and the batch on N GPUs and print the data-parallel size")


def run(args) -> int:
    import sys

    import yaml

    from ..config import config_to_dict, load_config
    from ..config.loader import missing_packages

    cfg = load_config(args.config, args.overrides, check_runtime=not args.no_runtime_check,
                      world_size=args.world_size)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    if args.world_size is not None:
        print(f"qmm config: {args.world_size} GPUs: data-parallel size {cfg.data_parallel_size(args.world_size)}, "
              f"{cfg.train.global_batch_samples} samples per step", file=sys.stderr)
    for key, why in missing_packages(cfg):  # only reached with --no-runtime-check: said, not refused
        print(f"qmm config: note: {key} {why}", file=sys.stderr)
    return 0
