"""Selection quality of the SimMerge predictor (chapter 04) on held-out pairs, experts and tasks, and its transfer.

Reads (or builds) the profile's features and labels, then:

1. compares the model families by grouped cross-validation (``--cv-folds`` folds of experts) and picks the one
   with the lowest mean regret, then the hedge margin (how much better than the best fixed candidate another
   candidate must be predicted to be chosen) the same way;
2. evaluates that family leave-one-expert-out (the headline: a pair is chosen for by predictors that never saw its
   held-out expert in any training pair) and leave-one-task-out; each split's best fixed choice comes from its
   training pairs only;
3. trains on the whole catalogue and applies the predictor unchanged to the transfer catalogue (>= 4x parameters,
   other seeds), with the best fixed choice taken from the training catalogue.

Metrics and their 95% bootstrap intervals over pairs (``*_ci``) are defined in :mod:`simmerge_lib.predictor`;
``noise_only_gap`` is the oracle - fixed gap evaluation noise alone would give (:func:`~simmerge_lib.predictor.noise_gap`),
to read ``oracle_gap`` against; ``gap_closure_one_sided`` is leave-one-expert-out again with each pair scored in
its own order only (without averaging over both orders, :attr:`~simmerge_lib.predictor.Predictor.symmetric`);
with ``--nested``, ``nested`` is leave-one-expert-out with the family and margin chosen inside each split
(:func:`~simmerge_lib.predictor.nested_evaluation`), free of the optimism of choosing them on the whole catalogue.
Usage: ``python benchmarks/selection_quality.py [--profile default] [--no-transfer] [--n-boot 1000] [--nested]``.
Prints one JSON line and writes it to ``build/bench/selection_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def _r(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, (tuple, list)):
        return [_r(v) for v in x]
    if isinstance(x, dict):
        return {k: _r(v) for k, v in x.items()}
    return x


def main() -> None:
    from simmerge_lib import predictor as P
    from simmerge_lib.labels import catalogue_hash
    from simmerge_lib.paths import build_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", choices=["smoke", "default", "full"])
    parser.add_argument("--families", nargs="+", default=list(P.FAMILIES), choices=list(P.FAMILIES))
    parser.add_argument("--cv-folds", type=int, default=4)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-transfer", action="store_true", help="skip the transfer catalogue")
    parser.add_argument("--no-build", action="store_true", help="fail instead of building missing tables")
    parser.add_argument("--nested", action="store_true",
                        help="also evaluate with the family (forest, gbm) and margin chosen inside each held-out split "
                             "(nested cross-validation; about 10 minutes on default)")
    args = parser.parse_args()
    start = time.perf_counter()

    features, labels, catalogue = P.load_tables(args.profile, build=not args.no_build, progress=False)
    table = P.training_table(features, labels)
    families = P.choose_family(table, args.families, k=args.cv_folds, seed=args.seed)
    family = str(families.iloc[0].family)
    margins = P.choose_margin(table, family, k=args.cv_folds, seed=args.seed)
    margin = float(margins.iloc[0].margin)
    loeo = P.heldout_evaluation(table, "expert", family, args.seed, args.n_boot, progress=False, margin=margin)
    loto = P.heldout_evaluation(table, "task", family, args.seed, args.n_boot, progress=False, margin=margin)
    # the same evaluation with one-sided scoring (each pair scored in its own order only), to measure what scoring
    # a candidate from both orders of the pair brings
    one_sided = P.heldout_evaluation(table, "expert", family, args.seed, n_boot=0, progress=False, margin=margin,
                                     symmetric=False)["metrics"]
    m, ci = loeo["metrics"], loeo["ci"]
    fixed = (loeo["records"].fixed_method + "/" + loeo["records"].fixed_setting).mode().iloc[0]
    result: dict[str, Any] = {
        "benchmark": "selection_quality", "profile": args.profile, "catalogue": catalogue.name,
        "evaluation": "leave-one-expert-out", "family": family, "margin": margin, "heldout_pairs": int(m["pairs"]),
        "quality_simmerge": m["quality_simmerge"], "quality_best_fixed": m["quality_best_fixed"],
        "quality_oracle": m["quality_oracle"], "best_fixed_operator": fixed, "gap_closure": m["gap_closure"],
        "mean_regret": m["mean_regret"], "selection_accuracy": m["selection_accuracy"], "spearman": m["spearman"],
        "gap_closure_one_sided": one_sided["gap_closure"], "quality_simmerge_one_sided": one_sided["quality_simmerge"],
        "quality_classifier": m.get("quality_classifier"), "gap_closure_classifier": m.get("gap_closure_classifier"),
        "win_rate": {k[12:]: v for k, v in m.items() if k.startswith("win_rate_vs_")},
        "loss_rate": {k[13:]: v for k, v in m.items() if k.startswith("loss_rate_vs_")},
        **{f"{k}_ci": ci[k] for k in ("quality_simmerge", "quality_best_fixed", "quality_oracle", "gap_closure",
                                      "mean_regret", "selection_accuracy", "spearman") if k in ci},
        "leave_one_task_out": {k: loto["metrics"][k] for k in ("quality_simmerge", "quality_best_fixed",
                                                               "quality_oracle", "gap_closure", "mean_regret",
                                                               "selection_accuracy", "spearman")},
        "leave_one_task_out_gap_closure_ci": loto["ci"].get("gap_closure"),
        "families_cv": families.to_dict("records"), "margins_cv": margins.to_dict("records"),
        # the oracle - fixed gap that evaluation noise alone would produce (null simulation), beside the measured one
        "oracle_gap": m["quality_oracle"] - m["quality_best_fixed"], "noise_only_gap": P.noise_gap(labels),
    }
    if args.nested:
        nested = P.nested_evaluation(table, "expert", k=args.cv_folds, seed=args.seed, n_boot=args.n_boot,
                                     progress=False)
        nm, choices = nested["metrics"], nested["choices"]
        result["nested"] = {"gap_closure": nm["gap_closure"], "gap_closure_ci": nested["ci"].get("gap_closure"),
                            "quality_simmerge": nm["quality_simmerge"], "mean_regret": nm["mean_regret"],
                            "families_chosen": choices.family.value_counts().to_dict(),
                            "margins_chosen": {str(k): int(v) for k, v in choices.margin.value_counts().items()}}
    if args.no_transfer:
        result["transfer_gap_closure"] = None
    else:
        model = P.fit_predictor(table, family, args.seed, margin=margin, metadata={"catalogue": catalogue.name,
                                                                    "catalogue_hash": catalogue_hash(catalogue)})
        t_features, t_labels, t_catalogue = P.load_tables(args.profile, transfer=True, build=not args.no_build,
                                                          progress=False)
        t_table = P.training_table(t_features, t_labels)
        records, _ = P.transfer_records(model, table, t_table)
        tm, tci = P.selection_metrics(records), P.bootstrap_ci(records, args.n_boot, args.seed)
        result.update({"transfer_catalogue": t_catalogue.name, "transfer_pairs": int(tm["pairs"]),
                       "transfer_gap_closure": tm["gap_closure"], "transfer_gap_closure_ci": tci.get("gap_closure"),
                       "transfer_quality_simmerge": tm["quality_simmerge"],
                       "transfer_quality_best_fixed": tm["quality_best_fixed"],
                       "transfer_quality_oracle": tm["quality_oracle"], "transfer_mean_regret": tm["mean_regret"],
                       "transfer_spearman": tm["spearman"]})
    result["seconds"] = time.perf_counter() - start
    line = json.dumps(_r(result))
    out = build_path("bench", "selection_quality.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
