"""Multi-way planning (chapter 05): the planner's plans against every real-merge baseline for k = 2 … 6 target tasks,
and plans on tasks the predictor never trained on.

For each k the target tasks are the catalogue's first k tasks. The planner chooses, with the predictor only (features
of the running merged model, no evaluation), a plan of 1 to k experts of one base (one expert per task, so it may
leave a task's expert out; an uncovered task counts with the predictor's keep forecast), their order and an operator
per step. Then everything is merged for real and evaluated at the labels' n_eval: the plan, the planner's best plan
merging all k experts, all-at-once linear / TIES (density 0.2, 0.5) / task arithmetic (lambda 0.5, 1) of those k
experts, random plans over them, the best fixed operator of the labels at every step, keeping the best single
expert (hindsight), and the oracle over real merges (every plan where they number at most ``--oracle-max-plans``,
else every order × operator sequence of the planner's subset). Unseen tasks: two predictors, each fitted on the
pairs of one half of the catalogue's tasks only, plan the first k tasks of each half (k in ``--heldout-ks``): a
plan on its own half is *seen*, on the other half *unseen*.

Catalogue: ``default`` when build/zoo/default, its labels and features exist, else ``smoke``. Predictor: chapter 04's
``build/predictor/<profile>.skops``, else one fitted now (``predictor_source``).
Usage: ``python benchmarks/multiway.py [--profile auto|smoke|default] [--ks 2,3,4,5,6] [--heldout-ks 2,3,4]``.
Prints one JSON line and writes it to ``build/bench/multiway.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

from simmerge_lib import planner, profiles
from simmerge_lib.checkpoint import write_json_atomic
from simmerge_lib.features import features_path
from simmerge_lib.labels import labels_path
from simmerge_lib.paths import build_path
from simmerge_lib.predictor import load_tables
from simmerge_lib.zoo import catalogue_dir


def _clean(x):
    if isinstance(x, float):
        return None if not math.isfinite(x) else round(x, 4)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item"):  # numpy scalars
        return _clean(x.item())
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="auto", choices=["auto", "smoke", "default", "full"])
    parser.add_argument("--ks", default="2,3,4,5,6", help="plan sizes, comma-separated")
    parser.add_argument("--heldout-ks", default="2,3,4", help="plan sizes of the unseen-task study ('' to skip)")
    parser.add_argument("--beam", type=int, default=8)
    parser.add_argument("--n-random", type=int, default=5)
    parser.add_argument("--oracle-max-plans", type=int, default=300)
    parser.add_argument("--top-realized", type=int, default=3)
    parser.add_argument("--exhaustive-limit", type=int, default=planner.EXHAUSTIVE_LIMIT)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    profile = args.profile
    if profile == "auto":
        # default needs its catalogue, labels and features (chapters 00, 01, 03): building them is not this job
        ready = all(p.is_file() for p in (catalogue_dir("default") / "catalogue.json", labels_path("default"),
                                          features_path("default")))
        profile = "default" if ready else "smoke"
    t0 = time.perf_counter()
    features, labels, reference, catalogue = load_tables(profile, progress=not args.quiet)
    predictor = planner.load_or_fit_predictor(profile, features, labels, reference)
    ops = planner.predictor_ops(predictor)
    fixed = planner.fixed_op_from_labels(labels)
    ks = [int(k) for k in args.ks.split(",") if k]
    n_eval = profiles.settings("labels", profile)["n_eval"]
    n_probes = profiles.settings("probes", profile)["n_probes"]
    scorer = planner.PredictorScorer(predictor, catalogue, n_probes=n_probes, table=features)
    cache: dict = {}
    prep = time.perf_counter() - t0
    study = planner.multiway_study(catalogue, predictor, ks, ops, n_eval=n_eval, beam_width=args.beam,
                                   oracle_max_plans=args.oracle_max_plans, exhaustive_limit=args.exhaustive_limit,
                                   n_random=args.n_random, fixed_op=fixed, top_realized=args.top_realized,
                                   progress=not args.quiet, scorer=scorer, min_k=1, scores_cache=cache)
    study_seconds = time.perf_counter() - t0 - prep
    summary = planner.study_summary(study)
    result = {"benchmark": "multiway", "profile": profile, "catalogue": str(catalogue.root),
              "predictor_source": predictor.metadata.get("source"), "predictor_family": predictor.family,
              "ops": [o.label for o in ops], "fixed_op": fixed.label, "beam_width": args.beam, "n_eval": n_eval,
              "exhaustive_limit": args.exhaustive_limit, "oracle_max_plans": args.oracle_max_plans}
    keys = ["tasks", "base", "search", "space", "step_calls", "plan", "chosen_k", "predicted_quality",
            "planner_quality", "full_plan", "full_predicted", "full_plan_quality", *planner.BASELINE_NAMES,
            "all_at_once_best", "best_single", "fixed_op", "oracle_quality", "oracle_plan", "oracle_scope",
            "oracle_plans", "task_predicted", "task_realized", "plan_seconds", "baseline_seconds", "evaluations",
            "ranked"]
    for k in ks:
        row = study[k]
        result[f"k{k}"] = _clean({key: row.get(key) for key in keys}) if "skipped" not in row else row
    claims = summary.to_dict("records")
    result["summary"] = _clean(claims)
    judged = [r for r in claims if 3 <= r["k"] <= 5]
    result["planner_beats_every_baseline_k3_5"] = bool(judged) and all(r["beats_every_baseline"] for r in judged)
    gaps = [r["gap_to_oracle"] for r in claims if r["gap_to_oracle"] is not None]
    result["max_gap_to_oracle"] = _clean(max(gaps)) if gaps else None
    result["quality_by_k"] = {str(r["k"]): _clean(r["planner"]) for r in claims}
    result["all_k_plan_by_k"] = {str(r["k"]): _clean(r["all_k_plan"]) for r in claims}
    result["experts_kept_by_k"] = {str(r["k"]): r["experts_kept"] for r in claims}
    result["study_seconds"] = round(study_seconds, 1)
    hks = [int(k) for k in args.heldout_ks.split(",") if k]
    if hks:
        t1 = time.perf_counter()
        halves = planner.half_predictors(features, labels, reference, catalogue, family=predictor.family,
                                         feature_set=predictor.metadata.get("feature_set", "all"))
        held = planner.heldout_study(catalogue, halves, hks, ops, scorer, n_eval=n_eval, beam_width=args.beam,
                                     exhaustive_limit=args.exhaustive_limit, progress=not args.quiet,
                                     scores_cache=cache)
        by = held.groupby(["k", "seen"]).realized.mean().unstack()
        result["heldout"] = {"halves": {n: t for n, (t, _) in halves.items()},
                             "rows": _clean(held.drop(columns=["tasks"]).to_dict("records")),
                             "seen_by_k": {str(k): _clean(by.loc[k, True]) for k in by.index},
                             "unseen_by_k": {str(k): _clean(by.loc[k, False]) for k in by.index},
                             "best_single_by_k": {str(k): _clean(g.best_single_quality.mean())
                                                  for k, g in held.groupby("k")},
                             "seconds": round(time.perf_counter() - t1, 1)}
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(build_path("bench", "multiway.json"), result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
