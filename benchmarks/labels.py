"""Cost and diversity of the label grid (chapter 03) on a profile's catalogue.

Collects (or resumes) the profile's labels table at ``build/labels/<profile>.parquet`` with the local process pool,
then reports: jobs and rows in the table, ``seconds_total`` (sum of per-job wall seconds: merge + evaluation),
``seconds_per_job``, ``wall_seconds`` and ``jobs_run`` of this invocation, ``workers``, the share of same-base pairs
each operator wins (a win is a margin > ``--tol`` over every other operator at its best setting; ``tie`` otherwise)
with ``max_win_share`` (goal: <= 0.6, otherwise choosing an operator is trivial), the best fixed choice and the mean
oracle - best fixed gap on same-base pairs. ``--fresh`` starts from an empty table under build/bench/ instead.
Usage: ``python benchmarks/labels.py [--profile default] [--workers 2] [--catalogue DIR] [--fresh]``.
Prints one JSON line and writes it to ``build/bench/labels.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    from simmerge_lib import labels
    from simmerge_lib.catalogue import Catalogue
    from simmerge_lib.paths import build_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", choices=sorted(labels.PROFILES))
    parser.add_argument("--catalogue", help="catalogue folder (default: the profile's, built or loaded by the zoo)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--tol", type=float, default=0.01)
    parser.add_argument("--fresh", action="store_true", help="time a run from an empty table (build/bench/)")
    args = parser.parse_args()

    if args.catalogue:
        catalogue = Catalogue.load(args.catalogue)
    else:
        from simmerge_lib.zoo import build_catalogue

        catalogue = build_catalogue(args.profile, progress=False)
    jobs = labels.make_jobs(catalogue, **labels.profile_settings(args.profile))
    out = labels.labels_path(args.profile)
    if args.fresh:
        out = build_path("bench", "labels_work", f"{args.profile}.parquet")
        for path in (out, labels.reference_path(out)):
            path.unlink(missing_ok=True)
    ran = []
    start = time.perf_counter()
    table = labels.collect_labels(catalogue, jobs, out, workers=args.workers, progress=False,
                                  callback=lambda job, rows: ran.append(job.key))
    wall = time.perf_counter() - start
    summary = labels.summarize(table, args.tol)
    result = {"benchmark": "labels", "profile": args.profile, "catalogue": catalogue.name,
              "jobs": summary["jobs"], "rows": summary["rows"], "seconds_total": summary["seconds_total"],
              "seconds_per_job": summary["seconds_per_job"], "wall_seconds": round(wall, 2), "jobs_run": len(ran),
              "workers": args.workers, "tol": args.tol, "win_share": summary["win_share"],
              "max_win_share": summary["max_win_share"], "best_fixed": summary["best_fixed"],
              "oracle_minus_best_fixed": summary["oracle_minus_best_fixed"], "labels": str(out)}
    line = json.dumps(result)
    build_path("bench", "labels.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":  # the local pool's workers re-import this file under spawn
    main()
