"""Is the catalogue a world where merging behaves realistically? The label grid of a profile (chapter 03), judged.

Collects (or resumes) the profile's labels table at ``build/labels/<profile>.parquet`` with the local process pool and
reports, on same-base pairs unless named otherwise (see :func:`simmerge_lib.labels.summarize`):

* ``mean_best_quality_same_base`` / ``_cross_base``: the best candidate's merge quality, averaged over pairs;
* ``mean_keep_parent_quality`` and ``frac_merge_beats_parent``: keeping the better expert alone (no merge), and how
  often the best merge beats it (also ``frac_merge_beats_parent_cross_base``);
* ``win_share`` per operator family (a win is a margin > ``--tol``; ``tie`` otherwise), ``max_win_share``,
  ``min_family_win_share``;
* ``oracle_minus_best_fixed`` beside ``split_half_gain`` (choose on half the evaluation examples, score on the other
  half: the part of the gap that is real) and ``noise_gap`` (what binomial noise alone would give: pessimistic);
* ``base_skill_ratio`` (mean over tasks of base score / expert score) and the experts' own-task scores;
* ``build_seconds_smoke`` / ``_default`` / ``_transfer``: the wall time of the last build of each catalogue *from
  empty* as recorded in its ``catalogue.json`` (null when it was resumed or not built); ``--fresh-builds`` rebuilds
  all three from empty under ``build/bench/zoo/`` first, so the figures are this machine's.

Usage: ``python benchmarks/labels.py [--profile default] [--workers 2] [--fresh-builds]``.
Prints one JSON line and writes it to ``build/bench/labels.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pandas as pd

from simmerge_lib import labels, zoo
from simmerge_lib.catalogue import Catalogue
from simmerge_lib.paths import build_path
from simmerge_lib.profiles import PROFILES


def _build_seconds(profile: str, fresh: bool) -> float | None:
    recipe = zoo.recipe_for_profile(profile)
    if fresh:
        root = build_path("bench", "zoo", recipe.name)
        catalogue = zoo.build_catalogue(recipe.name, root=root, recipe=recipe, force=True, progress=False)
    else:
        file = zoo.catalogue_dir(recipe.name) / "catalogue.json"
        if not file.exists():
            return None
        catalogue = Catalogue.load(file)
    build = catalogue.build
    return None if not build or build.get("resumed", True) else float(build["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", choices=sorted(PROFILES))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tol", type=float, default=0.01)
    parser.add_argument("--fresh-builds", action="store_true",
                        help="rebuild the smoke, default and transfer catalogues from empty (build/bench/zoo/) and "
                             "report those times")
    args = parser.parse_args()

    builds = {f"build_seconds_{p}": _build_seconds(p, args.fresh_builds) for p in ("smoke", "default", "transfer")}
    catalogue = zoo.build_catalogue(args.profile, progress=False)
    jobs = labels.make_jobs(catalogue, **labels.profile_settings(args.profile))
    out = labels.labels_path(args.profile)
    ran: list[str] = []
    start = time.perf_counter()
    table = labels.collect_labels(catalogue, jobs, out, workers=args.workers, progress=False,
                                  callback=lambda job, rows: ran.append(job.key))
    wall = time.perf_counter() - start
    reference = pd.read_parquet(labels.reference_path(out))
    summary = labels.summarize(table, args.tol, reference)
    own = catalogue.scores_frame().query("role == 'expert' and expert_task == task").score
    result = {"benchmark": "labels", "profile": args.profile, "catalogue": catalogue.name, **summary,
              "base_skill_ratio": round(zoo.base_skill_ratio(catalogue), 4),
              "expert_own_score_mean": round(float(own.mean()), 4), "expert_own_score_min": round(float(own.min()), 4),
              "wall_seconds": round(wall, 2), "jobs_run": len(ran), "workers": args.workers, "tol": args.tol,
              **{k: (round(v, 1) if v is not None and np.isfinite(v) else None) for k, v in builds.items()},
              "labels": str(out)}
    line = json.dumps(result)
    build_path("bench", "labels.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":  # the local pool's workers re-import this file under spawn
    main()
