"""``simmerge plan-merge CONFIG``, and ``python -m simmerge_lib.scale features A B BASE`` (the rehearsal's measured
child that streams the structural features of a pair)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..features import structural_features
from .estimate import plan_from_config
from .measure import measure_throughput


def _cmd_plan(args: argparse.Namespace) -> int:
    rate, source = args.gb_per_s, "given"
    if rate is None and args.calibrate:
        cal = measure_throughput(threads=args.threads)
        rate, source = cal["gb_per_s"], f"measured here ({cal['input_gb']:.2f} GB calibration merge)"
    plan = plan_from_config(args.config, n_models=args.models, method=args.method, dtype=args.dtype,
                            out_dtype=args.out_dtype, shard_size=args.shard_size, workers=args.workers,
                            gb_per_s=rate, throughput_source=source)
    if args.json:
        print(json.dumps(plan.summary()))
    else:
        print(plan.describe())
        if args.per_layer:
            print(plan.per_layer().to_string(index=False))
    return 0


def register(subparsers: Any) -> None:
    """Add ``simmerge plan-merge CONFIG`` (``merge-distributed`` is the engine's: :mod:`simmerge_lib.engine.cli`)."""
    p = subparsers.add_parser("plan-merge", help="what a merge of checkpoints of one config costs (no weights)",
                              description="Plan a merge from a config.json alone: tensor inventory on the meta "
                                          "device, bytes read and written, output shards, peak memory and time.")
    p.add_argument("config", type=Path, help="config.json (or its folder)")
    p.add_argument("--models", type=int, default=3, help="input checkpoints, base included (default 3)")
    p.add_argument("--method", default="ties", help="merge method (default ties)")
    p.add_argument("--dtype", default=None, help="input dtype (default: the config's, else bfloat16)")
    p.add_argument("--out-dtype", default=None, help="output dtype (default: the input dtype)")
    p.add_argument("--shard-size", default="5GB", help="output shard size (default 5GB)")
    p.add_argument("--workers", type=int, default=1, help="merge workers (time divides, memory is per worker)")
    p.add_argument("--gb-per-s", type=float, default=None, help="input read rate of one worker, GB/s")
    p.add_argument("--calibrate", action="store_true", help="measure the rate on this machine (~1 GB merge)")
    p.add_argument("--threads", type=int, default=None, help="threads of the calibration merge")
    p.add_argument("--per-layer", action="store_true", help="also print bytes per layer")
    p.add_argument("--json", action="store_true", help="one JSON line instead of text")
    p.set_defaults(func=_cmd_plan)


def main(argv: Sequence[str]) -> int:
    """``python -m simmerge_lib.scale features A B BASE``: structural features of a pair, streamed (measured child)."""
    if len(argv) == 4 and argv[0] == "features":
        print(json.dumps(structural_features(argv[1], argv[2], argv[3], argv[3])))
        return 0
    print("usage: python -m simmerge_lib.scale features A B BASE", file=sys.stderr)
    return 2
