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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return args._run(args) or 0
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"qmm {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
