"""Do similarity signals choose the merge on tasks and experts the predictor never saw? (chapter 04)

Reads (or builds) the profile's features, labels and reference tables, then (see :mod:`simmerge_lib.predictor`):

1. **leave-one-task-out** and **leave-one-expert-out with siblings**, nested: the model family and the hedge margin
   are chosen inside each split by grouped cross-validation on its training pairs only. Reported per protocol:
   ``*_gap_closure`` with a cluster-bootstrap interval ``*_gap_closure_ci`` (clusters = held-out tasks / experts),
   ``baselines_*`` ({name: mean quality} of SimMerge and every baseline on the same held-out pairs: best fixed, keep
   the better parent, the owner rule (null: with order-free candidates no candidate favours a parent), the task-pair
   lookup, the ablation — the same predictor with every similarity signal constant, the task's identity given —, the
   direct classifier and the oracle), ``*_baseline_gap_closure``, ``spearman_*`` (predicted against measured quality
   over held-out pairs × candidates) and ``abstain_precision`` (leave-one-task-out: among pairs where the
   predictor advised keeping a parent, the share where that was right);
2. **transfer**: the predictor trained on every pair of the profile (family and margin chosen by grouped
   cross-validation on it), applied unchanged to the transfer catalogue (>= 4x parameters, other seeds);
3. with ``--reproduce SEED``, the whole pipeline again on a catalogue built from another seed
   (``build/zoo/<profile>-seed<SEED>``): ``reproduced_gap_closure`` holds its gap closures and whether each lies
   inside the other build's interval.

Usage: ``python benchmarks/selection_quality.py [--profile default] [--no-transfer] [--reproduce 1] [--n-boot 1000]``.
Prints one JSON line and writes it to ``build/bench/selection_quality.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import pandas as pd

from simmerge_lib import predictor as P
from simmerge_lib import zoo
from simmerge_lib.features import load_or_compute
from simmerge_lib.labels import catalogue_hash, collect_labels, make_jobs, profile_settings, reference_path
from simmerge_lib.paths import build_path


def _r(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, (tuple, list)):
        return [_r(v) for v in x]
    if isinstance(x, dict):
        return {k: _r(v) for k, v in x.items()}
    return x


def _protocols(table: Any, n_boot: int, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scheme, tag in (("task", "loto"), ("expert", "loeo")):
        result = P.nested_evaluation(table, scheme, n_boot=n_boot, seed=seed, progress=False, cache=True)
        m, ci = result["metrics"], result["ci"]
        baselines = {"simmerge": m["quality_simmerge"], **{b: m.get(f"quality_{b}") for b in P.BASELINES},
                     "owner_rule": None}
        out.update({
            f"{tag}_gap_closure": m["gap_closure_simmerge"], f"{tag}_gap_closure_ci": list(ci["simmerge"]),
            f"baselines_{tag}": baselines,
            f"{tag}_baseline_gap_closure": {b: m[f"gap_closure_{b}"] for b in
                                            ("ablation", "classifier", "task_pair_lookup")},
            f"{tag}_baseline_gap_closure_ci": {b: list(ci[b]) for b in ("ablation", "classifier", "task_pair_lookup")},
            f"spearman_{tag}": m["spearman"], f"spearman_within_pair_{tag}": m["spearman_within_pair"],
            f"{tag}_selection_accuracy": m["selection_accuracy"], f"{tag}_mean_regret": m["mean_regret"],
            f"{tag}_abstain_rate": m["abstain_rate"], f"{tag}_abstain_precision": m["abstain_precision"],
            f"{tag}_choices": result["choices"].groupby(["family", "margin"]).size().rename("splits")
            .reset_index().to_dict("records"),
        })
        out[f"{tag}_pairs"] = int(m["pairs"])
    out["ablation_gap_closure_loto"] = out["loto_baseline_gap_closure"]["ablation"]
    out["ablation_gap_closure_loeo"] = out["loeo_baseline_gap_closure"]["ablation"]
    out["abstain_precision"] = out["loto_abstain_precision"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", choices=["smoke", "default", "full"])
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-transfer", action="store_true", help="skip the transfer catalogue")
    parser.add_argument("--reproduce", type=int, metavar="SEED", help="also run everything on a catalogue built "
                        "from this seed and compare (about 10 more minutes on default)")
    args = parser.parse_args()
    start = time.perf_counter()

    features, labels, reference, catalogue = P.load_tables(args.profile, progress=False)
    table = P.training_table(features, labels, reference)
    result: dict[str, Any] = {"benchmark": "selection_quality", "profile": args.profile, "catalogue": catalogue.name,
                              "nested": True, "pairs": int(table.pair.nunique()),
                              "candidates": P.candidates_of(table)}
    result.update(_protocols(table, args.n_boot, args.seed))

    family, _, margin = P.choose_design(table, "expert", seed=args.seed)
    predictor = P.fit_predictor(table, family, seed=args.seed, margin=margin,
                                metadata={"catalogue": catalogue.name, "catalogue_hash": catalogue_hash(catalogue),
                                          "profile": args.profile})
    result["final_predictor"] = {"family": family, "margin": margin}
    if not args.no_transfer:
        t_features, t_labels, t_reference, t_catalogue = P.load_tables(args.profile, transfer=True, progress=False)
        t_table = P.training_table(t_features, t_labels, t_reference)
        records, candidates = P.transfer_records(predictor, table, t_table)
        result.update({"transfer_catalogue": t_catalogue.name, "transfer_pairs": int(records.pair.nunique()),
                       "transfer_gap_closure": P.gap_closure(records),
                       "transfer_gap_closure_ci": list(P.cluster_bootstrap_ci(records, cluster="pair",
                                                                             n_boot=args.n_boot, seed=args.seed)),
                       "transfer_quality": {"simmerge": float(records.simmerge.mean()),
                                            "best_fixed": float(records.best_fixed.mean()),
                                            "keep_parent": float(records.keep_parent.mean()),
                                            "oracle": float(records.oracle.mean())},
                       "transfer_spearman": P.spearman(candidates)})
    if args.reproduce is not None:
        recipe = zoo.recipe_for_profile(args.profile)
        recipe = dataclasses.replace(recipe, name=f"{args.profile}-seed{args.reproduce}", seed=args.reproduce)
        other = zoo.build_catalogue(recipe.name, root=zoo.catalogue_dir(recipe.name), recipe=recipe, progress=False)
        o_features = load_or_compute(other, recipe.name, progress=False)
        out = build_path("labels", f"{recipe.name}.parquet")
        o_labels = collect_labels(other, make_jobs(other, **profile_settings(args.profile)), out, progress=False)
        o_table = P.training_table(o_features, o_labels, pd.read_parquet(reference_path(out)))
        again = _protocols(o_table, args.n_boot, args.seed)
        reproduced = {}
        for tag in ("loto", "loeo"):
            gc, ci = again[f"{tag}_gap_closure"], again[f"{tag}_gap_closure_ci"]
            first, first_ci = result[f"{tag}_gap_closure"], result[f"{tag}_gap_closure_ci"]
            reproduced[tag] = {"gap_closure": gc, "ci": ci, "inside_first_ci": first_ci[0] <= gc <= first_ci[1],
                               "first_inside_its_ci": ci[0] <= first <= ci[1]}
        result["reproduced_gap_closure"] = {"catalogue": other.name, "seed": args.reproduce, **reproduced}
    result["seconds"] = time.perf_counter() - start
    line = json.dumps(_r(result))
    build_path("bench", "selection_quality.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
