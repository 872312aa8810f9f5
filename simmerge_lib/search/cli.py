"""``simmerge search``: the chapter's experiment on one pair of a profile's catalogue, from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from .. import profiles
from ..checkpoint import write_json_atomic
from ..paths import build_path
from ..predictor import predictor_path
from .experiment import run_experiment


def _cmd_search(args: argparse.Namespace) -> int:
    catalogue = Path(args.catalogue) if args.catalogue else build_path("zoo", args.profile)
    if not (catalogue / "catalogue.json").is_file():
        raise FileNotFoundError(f"{catalogue}: no catalogue.json "
                                f"(build one with `simmerge zoo --profile {args.profile}`)")
    pair = tuple(args.pair.split("|")) if args.pair else None
    if pair is not None and len(pair) != 2:
        raise ValueError(f"--pair {args.pair!r}: expected 'expertA|expertB'")
    exp = run_experiment(catalogue, args.profile, labels_file=build_path("labels", f"{args.profile}.parquet"),
                         predictor_file=predictor_path(args.profile),
                         features_file=build_path("features", f"{args.profile}.parquet"), pair=pair, seed=args.seed,
                         progress=not args.quiet)
    print(json.dumps(exp.summary))
    best = exp.best()
    print(f"# best: {best.source}, quality {best.quality:.3f}")
    text = yaml.safe_dump(best.recipe.to_dict(exp.problem.paths()), sort_keys=False)
    print(text, end="")
    if args.out:
        write_json_atomic(args.out, {**exp.summary, "best_recipe": best.recipe.to_dict(exp.problem.paths())})
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("search", help="search layer-wise / depth merge recipes for a pair (Optuna)",
                              description="Chapter 08: real searches (TPE + Hyperband, NSGA-II per task, layer "
                                          "stacks), a surrogate benchmark, and the best recipe found.")
    p.add_argument("--profile", default="default", choices=sorted(profiles.TABLES["search"]),
                   help="sizes and default catalogue")
    p.add_argument("--catalogue", help="catalogue folder (default build/zoo/<profile>)")
    p.add_argument("--pair", help="'expertA|expertB' (default: the labels' pair with the largest oracle gap)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the summary and the best recipe as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_search)
