NAME = "config"
HELP = "Load, validate and print an experiment config with its overrides resolved."
EXAMPLES = ["qmm config launch/stage3.yaml train.lr=1e-4 parallel.tensor_model_parallel_size=2",
            "qmm config launch/tiny/stage1.yaml --no-runtime-check"]


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML experiment config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, key.path=value")
    p.add_argument("--no-runtime-check", action="store_true",
                   help="skip checks that depend on this machine (FP8 needs Transformer Engine, "
                        "logging.tensorboard_dir needs tensorboard): for a config meant for another machine")


def run(args) -> int:
    import sys

    import yaml

    from ..config import config_to_dict, load_config
    from ..config.loader import missing_packages

    cfg = load_config(args.config, args.overrides, check_runtime=not args.no_runtime_check)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    for key, why in missing_packages(cfg):  # only reached with --no-runtime-check: said, not refused
        print(f"qmm config: note: {key} {why}", file=sys.stderr)
    return 0
