"""Cost of the features table against the label grid it is meant to replace, on the same pairs.

For the pairs of the profile's label grid (chapter 03: every same-base pair and the cross-base sample):

* ``features_s``: wall time of :func:`simmerge_lib.features.compute_features` for both orders of every pair × its
  parent tasks, from a cold probe-output cache (model loads and forward passes included) — everything chapter 04's
  predictor reads;
* ``labels_s``: wall time of running every job of the grid (every candidate of :data:`~simmerge_lib.labels.DEFAULT_GRID`
  at the profile's ``n_eval``) in this process, checkpoints loaded once and included — what the predictor saves.

Both run on one torch thread, so the ratio does not depend on the machine's core count.
``cost_ratio = labels_s / features_s``; the goal is >= 10 on the default catalogue.
Usage: ``python benchmarks/feature_cost.py [--profile default] [--sample-jobs N]`` (``--sample-jobs`` runs N jobs,
seeded, and scales their time to the whole grid: ``"extrapolated": true``).
Prints one JSON line and writes it to ``build/bench/feature_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from simmerge_lib import features, labels
from simmerge_lib.checkpoint import write_json_atomic
from simmerge_lib.paths import build_path
from simmerge_lib.probes import profile_n_probes
from simmerge_lib.profiles import PROFILES
from simmerge_lib.zoo import build_catalogue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", choices=sorted(PROFILES))
    parser.add_argument("--sample-jobs", type=int, default=0, help="run only this many jobs (seeded) and scale")
    args = parser.parse_args()
    torch.set_num_threads(1)
    catalogue = build_catalogue(args.profile, progress=False)
    jobs = labels.make_jobs(catalogue, **labels.profile_settings(args.profile))
    pairs = list(dict.fromkeys((j.a, j.b) for j in jobs))
    ordered = [p for a, b in pairs for p in ((a, b), (b, a))]
    n_probes = profile_n_probes(args.profile)

    start = time.perf_counter()
    cache = features.ProbeCache(disk_dir=None)
    table = features.compute_features(catalogue, n_probes=n_probes, pairs=ordered, cache=cache, progress=False)
    features_s = time.perf_counter() - start

    sample = jobs if not 0 < args.sample_jobs < len(jobs) else random.Random(0).sample(jobs, args.sample_jobs)
    root = str(catalogue.root.resolve())
    start = time.perf_counter()
    for job in sample:
        labels.run_job(root, job)
    measured_s = time.perf_counter() - start
    labels_s = measured_s * len(jobs) / len(sample)

    result = {"name": "feature_cost", "profile": args.profile, "catalogue": catalogue.name,
              "pairs": len(pairs), "feature_rows": len(table), "n_probes": n_probes,
              "forward_passes": cache.forward_passes, "features_s": round(features_s, 2),
              "jobs": len(jobs), "jobs_run": len(sample), "extrapolated": len(sample) < len(jobs),
              "n_eval": labels.profile_settings(args.profile)["n_eval"], "labels_s": round(labels_s, 2),
              "cost_ratio": round(labels_s / features_s, 2), "goal_ratio": 10.0, "torch_threads": 1}
    write_json_atomic(build_path("bench", "feature_cost.json"), result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
