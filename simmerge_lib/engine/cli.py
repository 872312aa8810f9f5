"""``simmerge merge`` and ``simmerge merge-distributed``, and ``python -m simmerge_lib.engine RECIPE OUT`` (the
merge command without importing the kit's other commands)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..documents import is_multi_document
from ..recipe import Recipe
from .distributed import BACKENDS, merge_distributed
from .driver import merge, merge_multi


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"device": args.device, "shard_size": args.shard_size, "threads": args.threads,
            "progress": not args.quiet, "compute_dtype": args.compute_dtype}


def _cmd_merge(args: argparse.Namespace) -> int:
    if is_multi_document(args.recipe):  # a multi-step plan (chapter 05): one document per step, "@name" references
        out = merge_multi(args.recipe, args.out, force=args.force, resume=args.resume, **_engine_options(args))
    else:
        out = merge(Recipe.from_yaml(args.recipe), args.out, resume=args.resume, force=args.force,
                    **_engine_options(args))
    print(out)
    return 0


def _cmd_distributed(args: argparse.Namespace) -> int:
    rep = merge_distributed(Recipe.from_yaml(args.recipe), args.out, workers=args.workers, backend=args.backend,
                            resume=args.resume, force=args.force, **_engine_options(args))
    print(rep["out"])
    return 0


def _add_merge_arguments(p: argparse.ArgumentParser, threads_default: int | None, threads_help: str) -> None:
    """The arguments ``merge`` and ``merge-distributed`` share."""
    p.add_argument("recipe", type=Path, help="recipe YAML (mergekit format)")
    p.add_argument("out", type=Path, help="output checkpoint folder")
    p.add_argument("--device", default="cpu", help="where the arithmetic runs: cpu (default) or cuda")
    p.add_argument("--resume", action="store_true", help="keep finished shards of an interrupted run")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    p.add_argument("--shard-size", default="2GB", help="maximum output shard size (default 2GB)")
    p.add_argument("--threads", type=int, default=threads_default, help=threads_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--compute-dtype", choices=["float32"], default=None,
                   help="compute in float32 whatever the recipe's dtype (more accurate; differs from mergekit by "
                        "the recipe dtype's rounding); default: the recipe's dtype, as mergekit")


def register(subparsers: Any) -> None:
    """Add ``simmerge merge RECIPE.yml OUT`` and ``simmerge merge-distributed RECIPE.yml OUT``."""
    p = subparsers.add_parser("merge", help="merge checkpoints with a mergekit-format YAML recipe (streaming)",
                              description="Merge checkpoints with a mergekit-format YAML recipe, one tensor at a "
                                          "time, into the Hugging Face folder OUT (written atomically).")
    _add_merge_arguments(p, None, "tensors merged in parallel (default: min(4, cores))")
    p.set_defaults(func=_cmd_merge)
    d = subparsers.add_parser("merge-distributed", help="merge with output shards spread over workers",
                              description="Like 'simmerge merge', with the output shards dealt to worker "
                                          "processes (or Ray tasks); one index is written at the end.")
    _add_merge_arguments(d, 1, "threads per worker (default 1)")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--backend", choices=list(BACKENDS), default="process")
    d.set_defaults(func=_cmd_distributed)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simmerge_lib.engine RECIPE OUT``: ``simmerge merge`` without importing the other commands."""
    parser = argparse.ArgumentParser(prog="python -m simmerge_lib.engine")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["merge", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"simmerge merge: error: {exc}", file=sys.stderr)
        return 2
