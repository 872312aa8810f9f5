"""Chapter 05's studies: plans for k = 2, 3, ... merged for real against every baseline, their summary (the
best baseline per k), and plans on tasks the predictor never trained on."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from ..catalogue import Catalogue
from ..labels import best_fixed, merge_quality
from ..operators import Candidate
from ..predictor import fit_predictor, training_table
from .plans import EXHAUSTIVE_LIMIT, Plan, candidate_experts, plan
from .realize import Realizer, baselines
from .scoring import PredictorScorer


def fixed_op_from_labels(labels: pd.DataFrame) -> Candidate:
    """The best fixed (method, setting) of a labels table (same-base pairs), as an :class:`Candidate`."""
    q = merge_quality(labels[labels.same_base.astype(bool)])
    method, setting = best_fixed(q)
    row = labels[(labels.method == method) & (labels.setting == setting)].iloc[0]
    return Candidate.make(method, row.parameters)


def multiway_study(catalogue: Catalogue, predictor: Any, ks: Sequence[int], ops: Sequence[Candidate],
                   n_eval: int = 50, n_probes: int = 32, beam_width: int = 8,
                   exhaustive_limit: int = EXHAUSTIVE_LIMIT, oracle_max_plans: int = 300, n_random: int = 5,
                   fixed_op: Candidate | None = None, top_realized: int = 5, seed: int = 0,
                   progress: bool = True, scorer: PredictorScorer | None = None, min_k: int = 1,
                   task_sets: Mapping[int, Sequence[str]] | None = None,
                   scores_cache: dict | None = None) -> dict[int, dict[str, Any]]:
    """For each k: target tasks T = the catalogue's first k tasks (or ``task_sets[k]``); the planner chooses, with
    the predictor only, a plan of ``min_k``..k experts (one per task, so it may leave a task's expert out) on one
    base; then everything is merged for real and evaluated (:func:`baselines`): the chosen plan, the planner's best
    plan merging all k tasks' experts, the ``top_realized`` best predicted plans (planned vs realized), and every
    baseline. k values with no base holding an expert of every target task are reported as skipped. Pass a
    ``scorer`` used before to reuse its predicted steps and prefix merges, and one ``scores_cache`` to several
    studies to score each model on each task once."""
    if scorer is None:
        scorer = PredictorScorer(predictor, catalogue, n_probes=n_probes, seed=seed)
    merges = scorer.merges
    cache = {} if scores_cache is None else scores_cache
    out: dict[int, dict[str, Any]] = {}
    for k in ks:
        tasks = list(task_sets[k]) if task_sets is not None else list(catalogue.tasks[:k])
        if len(tasks) < k:
            out[k] = {"skipped": f"the catalogue has only {len(catalogue.tasks)} tasks"}
            continue
        lo = min(min_k, k)
        t0 = time.perf_counter()
        try:
            result = plan(catalogue, tasks, k, scorer, ops, beam_width=beam_width, exhaustive_limit=exhaustive_limit,
                          top=max(top_realized, 1), progress=progress, min_k=lo)
        except ValueError as exc:
            out[k] = {"skipped": str(exc)}
            continue
        plan_seconds = time.perf_counter() - t0
        full = result.extra["by_size"].get(k)
        if full is None:
            out[k] = {"skipped": f"base {result.base} has no expert for every task of {tasks}"}
            continue
        realizer = Realizer(catalogue, tasks, n_eval=n_eval, seed=seed, merges=merges, scores_cache=cache)
        t1 = time.perf_counter()
        chosen = result.plan
        row: dict[str, Any] = {"chosen": chosen, "full": full, "tasks": tasks, "base": result.base,
                               "search": result.method, "space": result.space, "step_calls": result.step_calls,
                               "plan": chosen.describe(), "chosen_k": chosen.k, "full_plan": full.describe(),
                               "predicted_quality": chosen.predicted, "full_predicted": full.predicted,
                               "task_predicted": dict(chosen.task_predicted), "plan_seconds": plan_seconds}
        pool = list(candidate_experts(catalogue, tasks, result.base))
        row.update(baselines(realizer, chosen, ops, fixed_op, n_random, oracle_max_plans, seed=seed,
                             progress=progress, full=full, pool=pool, min_k=lo))
        row["task_realized"] = realizer.normalized(lambda: merges.state(chosen), result.base,
                                                   ("expert", chosen.order[0]) if chosen.k == 1 else
                                                   ("plan", chosen.order, chosen.ops))
        row["ranked"] = [{"plan": p.describe(), "k": p.k, "predicted": p.predicted, "realized": realizer.quality(p)}
                         for p in result.ranked[:top_realized]]
        row["baseline_seconds"] = time.perf_counter() - t1
        row["evaluations"] = realizer.evaluations
        out[k] = row
    return out


#: The non-oracle baselines of the study (key of :func:`baselines` -> label); the claim "the planner beats every
#: baseline" is checked against these.
BASELINE_NAMES = {"all_at_once_linear": "all-at-once linear", "all_at_once_ties_d0.2": "all-at-once TIES d0.2",
                  "all_at_once_ties_d0.5": "all-at-once TIES d0.5", "all_at_once_ta_l0.5": "all-at-once TA λ0.5",
                  "all_at_once_ta_l1": "all-at-once TA λ1", "fixed_op_quality": "best fixed operator every step",
                  "random_order_quality": "random plans (mean)", "best_single_quality": "best single expert"}


def study_frame(study: Mapping[int, Mapping[str, Any]]) -> pd.DataFrame:
    """The study as a long table: k, approach, quality (realized; ``planner (predicted)`` is the prediction)."""
    names = {"predicted_quality": "planner (predicted)", "planner_quality": "planner (realized)",
             "full_plan_quality": "planner, all k experts", **BASELINE_NAMES, "oracle_quality": "oracle (real merges)"}
    rows = []
    for k, r in study.items():
        for key, label in names.items():
            if r.get(key) is not None:
                rows.append({"k": int(k), "approach": label, "quality": float(r[key])})
    return pd.DataFrame(rows, columns=["k", "approach", "quality"])


def study_summary(study: Mapping[int, Mapping[str, Any]], tol: float = 0.0) -> pd.DataFrame:
    """Per k: the planner's realized quality, the best non-oracle baseline (:data:`BASELINE_NAMES`) and the margin
    over it, whether the planner matched or beat every one (within ``tol``), the oracle and the gap to it, how
    many experts the plan kept and what merging all k of them would have realized."""
    rows = []
    for k, r in sorted(study.items()):
        if "skipped" in r:
            continue
        base = {label: r[key] for key, label in BASELINE_NAMES.items() if r.get(key) is not None}
        best = max(base, key=base.get)
        oracle = r.get("oracle_quality")
        rows.append({"k": int(k), "planner": r["planner_quality"], "predicted": r["predicted_quality"],
                     "experts_kept": r["chosen_k"], "all_k_plan": r["full_plan_quality"], "best_baseline": best,
                     "best_baseline_quality": base[best], "margin": r["planner_quality"] - base[best],
                     "beats_every_baseline": r["planner_quality"] >= base[best] - tol,
                     "oracle": oracle, "gap_to_oracle": None if oracle is None else oracle - r["planner_quality"],
                     "oracle_scope": r.get("oracle_scope")})
    return pd.DataFrame(rows)


def task_halves(catalogue: Catalogue) -> tuple[list[str], list[str]]:
    """The catalogue's tasks in two halves (first and second half of its task list)."""
    n = len(catalogue.tasks) // 2
    return list(catalogue.tasks[:n]), list(catalogue.tasks[n:2 * n])


def half_predictors(features: pd.DataFrame, labels: pd.DataFrame, reference: pd.DataFrame | None,
                    catalogue: Catalogue, family: str = "forest", feature_set: str = "all", seed: int = 0
                    ) -> dict[str, tuple[list[str], Any]]:
    """Two predictors, each fitted only on the pairs whose tasks both lie in one half of the catalogue's tasks
    (:func:`task_halves`): ``{"A": (tasks, predictor), "B": (tasks, predictor)}``. Planning the other half's tasks
    with one of them plans on tasks it never trained on."""
    table = training_table(features, labels, reference)
    tasks_of = {e.name: set(e.tasks) for e in catalogue.experts()}
    out = {}
    for name, tasks in zip("AB", task_halves(catalogue)):
        inside = [tasks_of[a] | tasks_of[b] <= set(tasks) for a, b in zip(table.a, table.b)]
        part = table[inside]
        if part.pair.nunique() < 2:
            raise ValueError(f"half {name} ({tasks}): fewer than two labelled pairs to fit a predictor on")
        predictor = fit_predictor(part, family=family, feature_set=feature_set, seed=seed, classifier=False,
                                  metadata={"tasks": tasks})
        out[name] = (list(tasks), predictor)
    return out


def heldout_study(catalogue: Catalogue, halves: Mapping[str, tuple[Sequence[str], Any]], ks: Sequence[int],
                  ops: Sequence[Candidate], scorer: PredictorScorer, n_eval: int = 50, beam_width: int = 8,
                  exhaustive_limit: int = EXHAUSTIVE_LIMIT, seed: int = 0, progress: bool = False,
                  scores_cache: dict | None = None) -> pd.DataFrame:
    """Plans on tasks the predictor trained on, and on tasks it never saw: for each k and each half's first k tasks,
    a plan by each half's predictor (:func:`half_predictors`), merged and evaluated. ``scorer``: a scorer whose
    computed features (and merges) the halves' scorers share (:meth:`PredictorScorer.with_predictor`).

    One row per (k, target half, predictor half): seen (the predictor's half is the target's), plan, experts kept,
    predicted, realized, the best single expert of either base on those tasks (hindsight) and the realized quality
    of keeping it."""
    cache = {} if scores_cache is None else scores_cache
    scorers = {name: scorer.with_predictor(p) for name, (_, p) in halves.items()}
    rows = []
    for k in ks:
        for target, (tasks_all, _) in halves.items():
            tasks = list(tasks_all[:k])
            if len(tasks) < k:
                continue
            realizer = Realizer(catalogue, tasks, n_eval=n_eval, seed=seed, merges=scorer.merges, scores_cache=cache)
            singles = {e.name: realizer.quality(Plan((e.name,))) for e in catalogue.experts()
                       if set(e.tasks) & set(tasks)}
            best_single = max(singles, key=lambda e: (singles[e], e))
            for name, sc in scorers.items():
                result = plan(catalogue, tasks, k, sc, ops, beam_width=beam_width, exhaustive_limit=exhaustive_limit,
                              top=1, progress=progress, min_k=1)
                rows.append({"k": k, "tasks": ",".join(tasks), "target": target, "predictor": name,
                             "seen": name == target, "plan": result.plan.describe(), "experts_kept": result.plan.k,
                             "predicted": result.plan.predicted, "realized": realizer.quality(result.plan),
                             "best_single": best_single, "best_single_quality": singles[best_single]})
    return pd.DataFrame(rows)
