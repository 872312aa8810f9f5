"""The ``simmerge`` command. Each chapter module adds its own sub-commands through ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Modules that contribute sub-commands, in the order ``simmerge --help`` lists them.
COMMAND_MODULES = [
    "simmerge_lib.zoo",
    "simmerge_lib.evaluate",
    "simmerge_lib.features",
    "simmerge_lib.engine",
    "simmerge_lib.labels",
    "simmerge_lib.predictor",
    "simmerge_lib.scale",
    "simmerge_lib.bandit",
    "simmerge_lib.planner",
    "simmerge_lib.search",
]


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="simmerge", description="Predictive model merging (SimMerge kit).")
    parser.add_argument("--version", action="version", version=f"simmerge {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (CliError, FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"simmerge {args.command}: error: {message}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
