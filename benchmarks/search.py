"""Benchmark: automated merge search (chapter 08) on one same-base pair of the catalogue.

Real searches (TPE + Hyperband, NSGA-II per task, TPE over layer stacks), a surrogate fitted on the real samples
(held-out R² and Kendall τ), every optimizer compared on the surrogate at equal budget and its winner merged for real,
against the SimMerge predictor's choice and the best fixed operator. Uses build/zoo/default when it exists, else the
smoke catalogue (``--profile`` forces one). Prints one JSON line and writes build/bench/search.json.
"""

from __future__ import annotations

import argparse
import json

from simmerge_lib.checkpoint import write_json_atomic
from simmerge_lib.paths import build_path
from simmerge_lib.predictor import predictor_path
from simmerge_lib.search import run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["smoke", "default", "full"],
                        help="catalogue and sizes (default: 'default' if build/zoo/default exists, else 'smoke')")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    profile = args.profile or ("default" if (build_path("zoo", "default") / "catalogue.json").is_file() else "smoke")
    catalogue = build_path("zoo", profile)
    if not (catalogue / "catalogue.json").is_file():
        from simmerge_lib.zoo import build_catalogue

        build_catalogue(profile)
    experiment = run_experiment(catalogue, profile, labels_file=build_path("labels", f"{profile}.parquet"),
                                predictor_file=predictor_path(profile),
                                features_file=build_path("features", f"{profile}.parquet"), seed=args.seed,
                                progress=False)
    result = {"benchmark": "search", **experiment.summary}
    write_json_atomic(build_path("bench", "search.json"), result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
