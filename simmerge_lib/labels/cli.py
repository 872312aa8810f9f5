"""``simmerge labels``: collect (or resume) a catalogue's labels table and print its summary."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from ..catalogue import Catalogue
from ..profiles import PROFILES
from .analysis import summarize
from .collect import _read_table, collect_labels
from .jobs import REFERENCE_COLUMNS, labels_path, make_jobs, profile_settings, reference_path


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _cmd_labels(args: argparse.Namespace) -> int:
    catalogue = Catalogue.load(args.catalogue)
    settings = profile_settings(args.profile)
    for key, value in (("n_eval", args.n), ("cross_base_sample", args.cross_base_sample), ("tasks", args.tasks)):
        if value is not None:
            settings[key] = value
    jobs = make_jobs(catalogue, seed=args.seed, **settings)
    out = Path(args.out) if args.out else labels_path(catalogue.name)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` then flushes finished rows like Ctrl-C does
    try:
        labels = collect_labels(catalogue, jobs, out, executor=args.executor, workers=args.workers,
                                address=args.address, device=args.device, num_gpus=args.num_gpus)
    except KeyboardInterrupt:
        print(f"simmerge labels: interrupted; finished rows are in {out} (rerun the same command to resume)",
              file=sys.stderr)
        return 130
    reference = _read_table(reference_path(out), REFERENCE_COLUMNS)
    print(json.dumps(summarize(labels, args.tol, reference)))
    print(f"labels: {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("labels", help="merge expert pairs on an operator grid and score them (labels table)")
    p.add_argument("catalogue", help="catalogue folder (or its catalogue.json)")
    p.add_argument("--out", help="labels Parquet file (default build/labels/<catalogue name>.parquet); resumed if "
                                 "it exists")
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--workers", type=int, default=None, help="parallel jobs (default min(4, cores))")
    p.add_argument("--address", help="Ray cluster address (executor ray; default: a local Ray runtime)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per job (executor ray)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", default="default", choices=sorted(PROFILES),
                   help="grid and sizes (smoke: one setting per operator; default: the full grid)")
    p.add_argument("--n", type=int, help="eval examples per task (default: the profile's)")
    p.add_argument("--tasks", choices=["all", "parents"], help="tasks scored per merge (default: all)")
    p.add_argument("--cross-base-sample", type=int, help="cross-base pairs sampled (default: the profile's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=0.01, help="win margin for the summary's win shares")
    p.set_defaults(func=_cmd_labels)
