"""``simmerge zoo``: build (or load from cache) a profile's catalogue and print its score table."""

from __future__ import annotations

import argparse

from .. import profiles
from ..catalogue import CATALOGUE_FILE
from .build import build_catalogue, catalogue_dir
from .recipes import transfer_recipe


def _cmd_zoo(args: argparse.Namespace) -> int:
    if args.profile == "transfer" and args.out is None:  # the same cache as chapter 04's build_transfer_catalogue
        recipe = transfer_recipe("default")
        catalogue = build_catalogue(recipe.name, root=catalogue_dir(recipe.name), force=args.force, recipe=recipe,
                                    workers=args.workers)
    else:
        catalogue = build_catalogue(args.profile, root=args.out, force=args.force, workers=args.workers)
    frame = catalogue.scores_frame()
    table = frame.pivot_table(index="model", columns="task", values="score", sort=False)
    print(table.round(2).to_string())
    print(f"catalogue: {catalogue.root / CATALOGUE_FILE}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("zoo", help="build (or load from cache) the model catalogue of a profile")
    p.add_argument("--profile", default="default", choices=[*profiles.TABLES["zoo"], "transfer"],
                   help="'transfer' is chapter 04's larger catalogue (the default recipe at 4x the parameters)")
    p.add_argument("--out", help="catalogue folder (default build/zoo/<profile>)")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    p.add_argument("--workers", type=int, default=None,
                   help="checkpoints trained at once, one process and one torch thread each (default: one per core)")
    p.set_defaults(func=_cmd_zoo)
