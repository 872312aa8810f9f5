"""Multi-way planning (chapter 05): planned vs realized quality and the real-merge baselines for k = 3, 4, 5.

For each k the target tasks are the catalogue's first k tasks; the planner picks k experts of one base, their order
and an operator per step with the predictor (features of the running merged model, no evaluation), then the plan and
the baselines are merged for real and evaluated: all-at-once linear and TIES of the same subset, random plans over
it, the best fixed operator (labels table) at every step, and the exhaustive oracle over real merges where the space
has at most ``--oracle-max-plans`` plans. The operator settings of :data:`simmerge_lib.planner.STUDY_SETTINGS`.
Catalogue: ``default`` when ``build/zoo/default``, its labels and features exist, else ``smoke`` (``profile`` / ``catalogue`` in the JSON
say which); its labels are collected or resumed (chapter 03). Predictor: chapter 04's
``build/predictor/<profile>.skops``, else a GBM fitted now on the profile's features + labels
(``predictor_source`` says which).
``--predictor-profile smoke`` plans on another profile's catalogue with the smoke predictor and best fixed operator.
Usage: ``python benchmarks/multiway.py [--profile auto|smoke|default] [--ks 3,4,5] [--beam 8]``.
Prints one JSON line and writes it to ``build/bench/multiway.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time


def _clean(x):
    if isinstance(x, float):
        return None if not math.isfinite(x) else round(x, 4)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def main() -> None:
    from simmerge_lib import planner
    from simmerge_lib.checkpoint import write_json_atomic
    from simmerge_lib.features import features_path
    from simmerge_lib.labels import labels_path, profile_settings
    from simmerge_lib.paths import build_path
    from simmerge_lib.probes import N_PROBES
    from simmerge_lib.zoo import catalogue_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="auto", choices=["auto", "smoke", "default", "full"])
    parser.add_argument("--ks", default="3,4,5", help="plan sizes, comma-separated")
    parser.add_argument("--beam", type=int, default=8)
    parser.add_argument("--n-random", type=int, default=5)
    parser.add_argument("--oracle-max-plans", type=int, default=300)
    parser.add_argument("--top-realized", type=int, default=5)
    parser.add_argument("--predictor-profile", help="take the predictor and the best fixed operator from this "
                        "profile's tables (default: the catalogue's own profile)")
    parser.add_argument("--exhaustive-limit", type=int, default=planner.EXHAUSTIVE_LIMIT)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    profile = args.profile
    if profile == "auto":
        # default needs its catalogue, labels and features (chapters 00, 01, 03): building them is not this job
        ready = all(p.is_file() for p in (catalogue_dir("default") / "catalogue.json", labels_path("default"),
                                          features_path("default")))
        profile = "default" if ready else "smoke"
    source = args.predictor_profile or profile
    catalogue, labels, predictor = planner.prepare(source, progress=not args.quiet)
    if source != profile:  # plan on this catalogue with the other profile's predictor (features are scale-free)
        from simmerge_lib.zoo import build_catalogue

        catalogue = build_catalogue(profile, progress=not args.quiet)
    ops = planner.study_ops(predictor)
    fixed = planner.fixed_op_from_labels(labels)
    ks = [int(k) for k in args.ks.split(",")]
    t0 = time.perf_counter()
    study = planner.multiway_study(catalogue, predictor, ks, ops, n_eval=profile_settings(profile)["n_eval"],
                                   n_probes=N_PROBES.get(profile, 32), beam_width=args.beam,
                                   oracle_max_plans=args.oracle_max_plans,
                                   exhaustive_limit=args.exhaustive_limit, n_random=args.n_random, fixed_op=fixed,
                                   top_realized=args.top_realized, progress=not args.quiet)
    keys = ["planner_quality", "predicted_quality", "all_at_once_linear", "all_at_once_ties",
            "random_order_quality", "fixed_op_quality", "oracle_quality"]
    result = {"benchmark": "multiway", "profile": profile, "catalogue": str(catalogue.root),
              "predictor_profile": source,
              "predictor_source": predictor.metadata.get("source"), "predictor_family": predictor.family,
              "ops": [o.label for o in ops], "fixed_op": fixed.label, "beam_width": args.beam,
              "exhaustive_limit": args.exhaustive_limit,
              "wall_seconds": round(time.perf_counter() - t0, 1)}
    for k in ks:
        row = study[k]
        if "skipped" in row:
            result[f"k{k}"] = {"skipped": row["skipped"], **{key: None for key in keys}}
            continue
        extra = ["tasks", "base", "plan", "search", "space", "step_calls", "plan_seconds", "baseline_seconds",
                 "evaluations", "oracle_plan", "ranked"]
        result[f"k{k}"] = _clean({key: row.get(key) for key in [*keys, *extra]})
    line = json.dumps(result, sort_keys=False)
    write_json_atomic(build_path("bench", "multiway.json"), result)
    print(line)


if __name__ == "__main__":
    main()
