"""The ``simmerge`` command. Each chapter module adds its own sub-commands through ``register(subparsers)``.

Sub-commands are imported lazily: ``simmerge --help`` lists them from :data:`COMMANDS` without importing any
chapter module, and ``simmerge merge ...`` imports only the engine (torch, no scikit-learn, optuna or
transformers), so a merge starts working about as soon as torch is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__

#: Sub-commands in the order ``simmerge --help`` lists them: (module that registers it, one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "zoo": ("simmerge_lib.zoo", "build (or load from cache) the model catalogue of a profile"),
    "eval": ("simmerge_lib.evaluate", "score a checkpoint folder on tasks (exact match of greedy answers)"),
    "features": ("simmerge_lib.features", "compute the pair features table of a catalogue"),
    "merge": ("simmerge_lib.engine.cli", "merge checkpoints with a mergekit-format YAML recipe (streaming)"),
    "merge-distributed": ("simmerge_lib.engine.cli", "merge with output shards spread over workers"),
    "labels": ("simmerge_lib.labels", "merge expert pairs on an operator grid and score them (labels table)"),
    "recommend": ("simmerge_lib.predictor", "rank merge candidates for two experts by predicted quality"),
    "plan-merge": ("simmerge_lib.scale.cli", "what a merge of checkpoints of one config costs (no weights)"),
    "bandit": ("simmerge_lib.bandit", "replay a profile's labels through contextual bandits (regret summary)"),
    "plan": ("simmerge_lib.planner", "plan a multi-way merge (subset, order, operators) with the predictor"),
    "search": ("simmerge_lib.search", "search layer-wise / depth merge recipes for a pair (Optuna)"),
}
#: Modules that contribute sub-commands (each once, in :data:`COMMANDS` order).
COMMAND_MODULES = list(dict.fromkeys(module for module, _ in COMMANDS.values()))


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def _top_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog="simmerge", description="Predictive model merging (SimMerge kit).")
    parser.add_argument("--version", action="version", version=f"simmerge {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser, subparsers


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser of the given sub-commands (all by default), importing the modules that define them."""
    parser, subparsers = _top_parser()
    wanted = list(COMMANDS) if commands is None else list(commands)
    modules = list(dict.fromkeys(COMMANDS[c][0] for c in wanted))
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def _listing_parser() -> argparse.ArgumentParser:
    """A parser that knows every sub-command's name and help but none of its options (no module imported)."""
    parser, subparsers = _top_parser()
    for name, (_, text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=text, add_help=False)
        sub.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:  # --help, --version, no command or an unknown one: answered from the table
        _listing_parser().parse_args(argv)
        return 2
    parser = build_parser([command])
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
