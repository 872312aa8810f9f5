"""``simmerge features``: the features table of a catalogue, written as Parquet."""

from __future__ import annotations

import argparse

from ..catalogue import Catalogue
from ..probes import load_jsonl
from ..profiles import PROFILES, settings
from .columns import FEATURE_COLUMNS, TIES_DENSITY
from .probing import ProbeCache
from .table import _table_meta, compute_features, write_table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "features", help="compute the pair features table of a catalogue",
        description="Functional (probe) and structural (weight) similarity features, one row per ordered pair of "
                    "experts × task, written as Parquet.")
    p.add_argument("catalogue", help="catalogue folder or catalogue.json")
    p.add_argument("--out", required=True, help="output .parquet file")
    p.add_argument("--profile", choices=sorted(PROFILES), default="default", help="sets the default --n-probes")
    p.add_argument("--n-probes", type=int, default=None, help="probe prompts per task (default: by profile)")
    p.add_argument("--probes", default=None, help='JSONL file of {"task": ..., "prompt": ...} to use instead')
    p.add_argument("--pairs", choices=["all", "same_base", "cross_base"], default="all", help="which expert pairs")
    p.add_argument("--tasks", choices=["parents", "all"], default="parents", help="tasks per pair")
    p.add_argument("--density", type=float, default=TIES_DENSITY, help="TIES density for the top-k overlap")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the on-disk probe-output cache")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    catalogue = Catalogue.load(args.catalogue)
    n_probes = args.n_probes or settings("probes", args.profile)["n_probes"]
    if not 0 < args.density <= 1:
        raise ValueError(f"--density must be in (0, 1], got {args.density}")
    probes = load_jsonl(args.probes, n_probes if args.n_probes else None) if args.probes else None
    if probes is not None:
        missing = sorted(set(catalogue.tasks) - set(probes.tasks))
        if missing:
            raise ValueError(f"{args.probes}: no prompts for task(s) {', '.join(missing)} of the catalogue")
    cache = ProbeCache(disk_dir=None) if args.no_cache else ProbeCache()
    df = compute_features(catalogue, n_probes=n_probes,
                          pairs=catalogue.pairs(args.pairs, ordered=True, distinct_tasks=False),
                          tasks=args.tasks, probes=probes, cache=cache, density=args.density)
    out = write_table(df, args.out, _table_meta(catalogue, n_probes, args.tasks, args.density))
    print(f"wrote {len(df)} rows × {len(FEATURE_COLUMNS)} features to {out} "
          f"({cache.forward_passes} probe passes, {cache.model_loads} model loads)")
    return 0
