"""Benchmark: automated merge search (chapter 08) on several same-base pairs of the catalogue.

Per pair (spread over the labels' ranking of the oracle − best-fixed gap, :func:`simmerge_lib.search.choose_pairs`):
the SimMerge choice of a predictor that never trained on a pair holding either expert or a sibling, the best fixed
candidate of the same training pairs and the label grid's best candidate for the pair (hindsight); real searches on
the first ``n_eval`` eval examples per task (TPE + Hyperband over the layer-wise space, warm-started with the two
baselines; TPE over layer stacks; on the first pair also NSGA-II per task and the optimizers on the surrogate); a
surrogate fitted on the real samples, with held-out R² and Kendall τ; and every winner and baseline re-scored on the
eval examples the search never saw. Reports the per-pair table, the real-merge budget, and the claims: best found ≥
SimMerge choice on every pair (in-sample, where the warm start guarantees it, and held-out, where nothing does).
Uses build/zoo/default when it exists, else the smoke catalogue (``--profile`` forces one). Prints one JSON line and
writes build/bench/search.json.
"""

from __future__ import annotations

import argparse
import json
import time

from simmerge_lib import profiles
from simmerge_lib.checkpoint import write_json_atomic
from simmerge_lib.paths import build_path
from simmerge_lib.predictor import load_tables
from simmerge_lib.search import choose_pairs, pair_study, pair_study_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["smoke", "default", "full"],
                        help="catalogue and sizes (default: 'default' if build/zoo/default exists, else 'smoke')")
    parser.add_argument("--pairs", type=int, help="pairs to search (default: the profile's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    profile = args.profile or ("default" if (build_path("zoo", "default") / "catalogue.json").is_file() else "smoke")
    start = time.perf_counter()
    features, labels, reference, catalogue = load_tables(profile, progress=False)
    settings = profiles.settings("search", profile)
    pairs = choose_pairs(catalogue, labels, args.pairs or int(settings["pairs"]))
    experiments, table = pair_study(catalogue, profile, pairs, tables=(features, labels, reference), seed=args.seed,
                                   progress=not args.quiet)
    summary = pair_study_summary(table)
    result = {"benchmark": "search", "profile": profile, "catalogue": catalogue.name, "settings":
              {k: v for k, v in settings.items() if k != "seeds"}, **summary,
              "per_pair": json.loads(table.to_json(orient="records")),
              "first_pair": experiments[0].summary, "wall_seconds": round(time.perf_counter() - start, 1)}
    write_json_atomic(build_path("bench", "search.json"), result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
