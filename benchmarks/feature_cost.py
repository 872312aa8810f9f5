"""Cost of the features table against the merge-and-evaluate grid it is meant to replace.

For every pair of experts of a catalogue:

* ``features_s``: wall time of :func:`simmerge_lib.features.compute_features` over all ordered pairs × parent tasks,
  from a cold probe-output cache (model loads and forward passes included);
* ``merge_and_eval_s``: wall time of merging each unordered pair with linear (w = 0.5, 0.5), SLERP (t = 0.5) and
  TIES (density 0.2, weights 1) in memory and scoring the result on the pair's tasks (``--n-eval`` examples a task),
  state dicts loaded once and included. TIES of a cross-base pair uses a's base (the grid has no better choice).

``cost_ratio = merge_and_eval_s / features_s``; the goal is >= 10 on the default catalogue. One hyper-parameter
setting per operator is the smallest grid a label needs, so the ratio is a lower bound for a real grid.

Usage: ``python benchmarks/feature_cost.py [--profile default] [--catalogue PATH] [--n-eval 100]``;
``--sample-pairs N`` merges and evaluates N pairs only (seeded) and scales that time to all pairs
(``"extrapolated": true`` in the output).
Prints one JSON line and writes it to ``build/bench/feature_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from tqdm.auto import tqdm

from simmerge_lib import features
from simmerge_lib.catalogue import Catalogue
from simmerge_lib.checkpoint import load_state_dict, write_json_atomic
from simmerge_lib.evaluate import evaluate_state_dict, load_model
from simmerge_lib.operators import merge_state_dicts
from simmerge_lib.paths import build_path
from simmerge_lib.probes import N_PROBES

GRID = [
    ("linear", lambda a, b, base: ([a, b], None, [{"weight": 0.5}, {"weight": 0.5}], {})),
    ("slerp", lambda a, b, base: ([b], a, None, {"t": 0.5})),
    ("ties", lambda a, b, base: ([a, b], base, [{"weight": 1.0, "density": 0.2}] * 2, {})),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="zoo profile (catalogue built or loaded from build/)")
    parser.add_argument("--catalogue", default=None, help="a catalogue folder instead of the profile's zoo")
    parser.add_argument("--n-probes", type=int, default=None, help="probes per task (default: by profile)")
    parser.add_argument("--n-eval", type=int, default=100, help="eval examples per task for each merge")
    parser.add_argument("--pairs", choices=["all", "same_base", "cross_base"], default="all")
    parser.add_argument("--sample-pairs", type=int, default=0,
                        help="merge and evaluate only this many pairs (seeded) and scale the time to all pairs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.catalogue:
        catalogue = Catalogue.load(args.catalogue)
    else:
        from simmerge_lib.zoo import build_catalogue

        catalogue = build_catalogue(args.profile)
    n_probes = args.n_probes or N_PROBES.get(args.profile, N_PROBES["default"])
    pairs = catalogue.pairs(args.pairs)
    ordered = [p for a, b in pairs for p in ((a, b), (b, a))]

    # warm up (library imports, kernels) outside both timings, so neither side pays the one-off start-up
    skeleton, tokenizer = load_model(catalogue.path(catalogue.experts()[0].name))
    evaluate_state_dict(skeleton, tokenizer, skeleton.state_dict(), catalogue.tasks[:1], n=2)
    features.pair_features(skeleton, skeleton, skeleton, skeleton, catalogue.tasks[0], n_probes=2)

    start = time.perf_counter()
    cache = features.ProbeCache(disk_dir=None)
    table = features.compute_features(catalogue, n_probes=n_probes, pairs=ordered, cache=cache, progress=True)
    features_s = time.perf_counter() - start

    start = time.perf_counter()
    states = {m.name: load_state_dict(catalogue.path(m.name)) for m in catalogue.models}
    merges = 0
    merged_pairs = pairs
    if 0 < args.sample_pairs < len(pairs):
        merged_pairs = random.Random(0).sample(pairs, args.sample_pairs)
    bar = tqdm(total=len(merged_pairs) * len(GRID), desc="merge+eval", unit="merge")
    for a, b in merged_pairs:
        tasks = [t for t in catalogue.tasks if t in set(catalogue.entry(a).tasks) | set(catalogue.entry(b).tasks)]
        base = states[catalogue.base_of(a).name]
        for method, setting in GRID:
            models, merge_base, params, global_params = setting(states[a], states[b], base)
            merged = merge_state_dicts(method, models, merge_base, params, global_params)
            evaluate_state_dict(skeleton, tokenizer, merged, tasks, n=args.n_eval)
            merges += 1
            bar.update()
    bar.close()
    measured_s = time.perf_counter() - start
    merge_and_eval_s = measured_s * len(pairs) / len(merged_pairs)

    result = {
        "name": "feature_cost", "catalogue": catalogue.name, "experts": len(catalogue.experts()),
        "pairs": len(pairs), "ordered_pairs": len(ordered), "rows": len(table), "n_probes": n_probes,
        "forward_passes": cache.forward_passes, "features_s": round(features_s, 3),
        "operators": [m for m, _ in GRID], "merges": merges, "n_eval": args.n_eval,
        "merge_and_eval_s": round(merge_and_eval_s, 3), "merged_pairs": len(merged_pairs),
        "extrapolated": len(merged_pairs) < len(pairs), "measured_merge_and_eval_s": round(measured_s, 3),
        "cost_ratio": round(merge_and_eval_s / features_s, 2), "goal_ratio": 10.0,
        "torch_threads": torch.get_num_threads(),
    }
    write_json_atomic(build_path("bench", "feature_cost.json"), result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
