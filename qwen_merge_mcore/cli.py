"""`qmm`: the one command-line front for the project.

Each subcommand is a module in `qwen_merge_mcore.commands` (found automatically) that defines
NAME, HELP, EXAMPLES, `add_arguments(parser)` and `run(args) -> int`. Heavy imports (torch,
Megatron) happen inside `run`, so `qmm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands
from .config import ConfigError

# Errors whose message says what is wrong and where: printed as one line, exit status 1. Anything
# else is a bug and keeps its traceback. The project's own error types derive from ValueError
# (ConfigError, CheckpointError, MergeValidationError, ...), except the stops of the data pipeline and
# of training and the one-line errors of spawned ranks below.
USER_ERRORS = (ConfigError, OSError, ValueError)
RUNTIME_USER_ERRORS = {f"{__package__}.data.errors": "TooManyBadSamples",
                       f"{__package__}.training.errors": "NonFiniteError",
                       f"{__package__}.distributed": "RankError"}
COMMAND_MODULES = sorted(m.name for m in pkgutil.iter_modules(commands.__path__))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmm", description="Qwen-Merge on Megatron-Core: build, convert, train, export, merge, plan.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `qmm <command> --help` for a command's options and an example.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"{__package__}.commands.{name}")
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP,
                           epilog="example:\n" + "\n".join(f"  {e}" for e in module.EXAMPLES),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .utils import quiet

    quiet.install()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides may follow options: `qmm data check c.yaml --samples 10 train.seed=3`
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    name = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
    try:
        return args._run(args) or 0
    except KeyboardInterrupt:
        print(f"qmm {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"qmm {name}: error: {error_line(err)}", file=sys.stderr)
        return 1


def is_user_error(err: BaseException) -> bool:
    # Looked up in sys.modules: a module that raised is loaded, and importing the data pipeline
    # here would import torch for every `qmm --help`.
    extra = tuple(getattr(sys.modules[m], name) for m, name in RUNTIME_USER_ERRORS.items() if m in sys.modules)
    return isinstance(err, USER_ERRORS + extra)


def error_line(err: BaseException) -> str:
    """The one line a user sees: OS errors as `path: cause`, the project's errors as their message."""
    from .utils.atomic import os_error_message

    return os_error_message(err) if isinstance(err, OSError) else str(err)


if __name__ == "__main__":
    sys.exit(main())
