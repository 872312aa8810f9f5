"""Chapter 08's experiment on one pair (:func:`run_experiment`) and over several pairs (:func:`pair_study`)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .. import profiles
from ..catalogue import Catalogue
from ..tasks import SPLIT_SIZES
from .choices import (Choice, Tables, best_fixed_choice, choose_pair, heldout_choice, label_oracle, simmerge_choice,
                      uniform_recipe)
from .optimize import SearchResult, fidelity_schedule, run_search
from .problem import MergeProblem
from .spaces import LayerwiseSpace
from .surrogate import (Surrogate, best_configs, collect_samples, compare_on_surrogate, fit_surrogate,
                        samples_from_trials, surrogate_quality)

#: Samplers compared on the surrogate at equal budget.
COMPARED = ("random", "qmc", "tpe", "nsga2")
#: Leaderboard rows that are baselines, not recipes a search found.
BASELINES = ("best_fixed", "simmerge_choice", "label_oracle")


def _finite(x: Any, digits: int = 4) -> float | None:
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


@dataclass
class Experiment:
    """Everything chapter 08 shows: real searches, the surrogate and its comparison, baselines and the summary."""

    problem: MergeProblem
    settings: dict[str, Any]
    real: dict[str, SearchResult]
    samples: pd.DataFrame
    surrogate_metrics: dict[str, Any]
    surrogate: Surrogate
    comparison: pd.DataFrame
    verified: pd.DataFrame
    baselines: pd.DataFrame
    leaderboard: pd.DataFrame
    summary: dict[str, Any]

    def best(self) -> pd.Series:
        """The leaderboard's best row: source, kind, quality (real, ``n_eval`` examples), recipe."""
        return self.leaderboard.iloc[0]


@dataclass
class _Choices:
    """The experiment's baselines: best fixed and SimMerge choice with where they came from, and the label oracle."""

    fixed: Choice
    fixed_source: str
    choice: Choice
    choice_source: str
    abstain: bool | None = None
    oracle: tuple[str, dict[str, Any], float] | None = None


def _choices(problem: MergeProblem, cfg: dict[str, Any], tables: Tables | None, labels_file: Any,
             predictor_file: Any, features_file: Any, family: str, seed: int) -> _Choices:
    """Held out (from ``tables``) when possible, else from the labels and predictor files, else the fallbacks
    (linear 0.5; the best fixed candidate as the choice)."""
    a, b = problem.a, problem.b
    oracle = None
    info: dict[str, Any] = {}
    if tables is not None:
        try:
            info = heldout_choice(tables, a, b, family=family, seed=seed)
        except (ValueError, KeyError) as exc:
            info = {"error": str(exc)}
        oracle = label_oracle(tables[1], a, b)
    if "choice" in info:
        return _Choices(info["fixed"], "best fixed of the pairs without these experts", info["choice"],
                        "predictor trained without these experts and siblings", info.get("abstain"), oracle)
    fixed = best_fixed_choice(labels_file)
    fixed_source = "labels" if fixed else "default (linear 0.5: no labels table)"
    fixed = fixed or ("linear", {"weight": 0.5})
    choice = None
    choice_error = info.get("error")
    if choice_error is None:
        try:
            choice = simmerge_choice(problem, predictor_file, features_file, n_probes=int(cfg["n_probes"]))
        except (ValueError, KeyError) as exc:  # a predictor trained on another catalogue's features
            choice_error = str(exc)
    reason = f": {choice_error}" if choice_error else ""
    choice_source = "predictor" if choice else f"best fixed (no usable predictor{reason})"
    return _Choices(fixed, fixed_source, choice or fixed, choice_source, info.get("abstain"), oracle)


def _baseline_table(problem: MergeProblem, space: LayerwiseSpace, ch: _Choices, n_full: int,
                    labelled_n: int | None) -> pd.DataFrame:
    """One row per baseline: its choice, source, real quality and per-task scores on ``n_full`` examples."""
    candidates = [("best_fixed", ch.fixed, ch.fixed_source), ("simmerge_choice", ch.choice, ch.choice_source)]
    if ch.oracle is not None:
        candidates.append(("label_oracle", ch.oracle[:2], f"the label grid's best for this pair ({ch.oracle[2]:.3f} "
                                                           f"at n = {labelled_n})"))
    rows = []
    for name, (method, params), source in candidates:
        recipe, sp = uniform_recipe(space, method, params)
        rows.append({"baseline": name, "method": method, "parameters": json.dumps(params, sort_keys=True),
                     "source": source, "quality": problem.quality(recipe, n_full),
                     **{f"task:{t}": v for t, v in problem.normalized(recipe, n_full).items()}, "params": sp})
    return pd.DataFrame(rows)


def _real_searches(problem: MergeProblem, space: LayerwiseSpace, cfg: dict[str, Any], rungs: list[int],
                   warm: list[dict[str, Any]], seed: int, detailed: bool, progress: bool) -> dict[str, SearchResult]:
    """TPE + Hyperband over the layer-wise space, (``detailed``) NSGA-II per task, TPE over the depth space."""
    n_full = rungs[-1]
    real = {"tpe+hyperband": run_search(space, int(cfg["real_trials"]), problem=problem, sampler="tpe",
                                        fidelities=rungs, pruner="hyperband", seed=seed, warm_start=warm,
                                        progress=progress)}
    if detailed:
        real["nsga2 (tasks)"] = run_search(space, int(cfg["nsga_trials"]), problem=problem, sampler="nsga2",
                                           objectives="tasks", fidelities=(n_full,), seed=seed + 1, warm_start=warm,
                                           progress=progress)
    real["tpe (depth)"] = run_search(problem.depth_space(), int(cfg["depth_trials"]), problem=problem, sampler="tpe",
                                     fidelities=(n_full,), seed=seed + 2, progress=progress,
                                     warm_start=[problem.depth_space().identity_params(problem.a)])
    return real


@dataclass
class _SurrogateStudy:
    collected: pd.DataFrame
    samples: pd.DataFrame
    metrics: dict[str, Any]
    surrogate: Surrogate
    comparison: pd.DataFrame
    verified: pd.DataFrame


def _surrogate_study(problem: MergeProblem, space: LayerwiseSpace, cfg: dict[str, Any], real: dict[str, SearchResult],
                     n_full: int, seed: int, detailed: bool, progress: bool) -> _SurrogateStudy:
    """Random real samples + every completed layer-wise trial, the surrogate's held-out quality, and (``detailed``)
    every compared optimizer on the surrogate with its winner merged and scored for real."""
    # Distinct seeds per run: equal seeds would replay the same random start-up configurations (cache hits).
    collected = collect_samples(problem, space, int(cfg["samples"]), n_full, seed=seed + 3, progress=progress)
    from_runs = [samples_from_trials(r.trials, problem) for k, r in real.items() if r.space.kind == "layerwise"]
    samples = pd.concat([collected, *from_runs], ignore_index=True)
    metrics = surrogate_quality(samples, space, seed=seed, n_estimators=int(cfg["trees"]))
    surrogate = fit_surrogate(samples, space, seed=seed, n_estimators=int(cfg["trees"]))
    comparison = pd.DataFrame(columns=["sampler", "seed", "number", "value", "best_so_far", "state", "params"])
    vrows = []
    if detailed:
        comparison = compare_on_surrogate(surrogate, COMPARED, int(cfg["surrogate_trials"]), seeds=cfg["seeds"],
                                          progress=progress)
        for row in best_configs(comparison).itertuples():
            recipe = space.from_params(row.params)
            vrows.append({"sampler": row.sampler, "predicted": float(row.value),
                          "quality": problem.quality(recipe, n_full), "params": row.params})
    verified = pd.DataFrame(vrows, columns=["sampler", "predicted", "quality", "params"])
    return _SurrogateStudy(collected, samples, metrics, surrogate, comparison, verified)


def _leaderboard(space: LayerwiseSpace, real: dict[str, SearchResult], verified: pd.DataFrame,
                 baselines: pd.DataFrame) -> pd.DataFrame:
    """Every real search's best, every surrogate winner and every baseline, by real quality (best first)."""
    board = [{"source": f"real {k}", "kind": r.space.kind, "quality": r.best_value, "recipe": r.best_recipe}
             for k, r in real.items() if (r.trials.state == "COMPLETE").any()]
    board += [{"source": f"surrogate {r.sampler}", "kind": "layerwise", "quality": float(r.quality),
               "recipe": space.from_params(r.params)} for r in verified.itertuples()]
    board += [{"source": r.baseline, "kind": "fixed operator", "quality": float(r.quality),
               "recipe": space.from_params(r.params)} for r in baselines.itertuples()]
    return (pd.DataFrame(board).sort_values("quality", ascending=False, kind="stable", na_position="last")
            .reset_index(drop=True))


def _heldout(problem: MergeProblem, space: LayerwiseSpace, n_full: int, best_row: pd.Series | None,
             depth: SearchResult, baselines: pd.DataFrame) -> dict[str, float]:
    """Held-out quality ([``n_full``, end of the eval split)) of the best found, the best depth recipe and every
    baseline; empty for a catalogue with its own evaluator or no examples past ``n_full``."""
    heldout: dict[str, float] = {}
    stop = SPLIT_SIZES["eval"]
    if problem.catalogue.evaluator is None and n_full < stop:
        if best_row is not None:
            heldout["best_found"] = problem.heldout_quality(best_row.recipe, n_full, stop)
        if (depth.trials.state == "COMPLETE").any():
            heldout["best_depth"] = problem.heldout_quality(depth.best_recipe, n_full, stop)
        for r in baselines.itertuples():
            heldout[r.baseline] = problem.heldout_quality(space.from_params(r.params), n_full, stop)
    return heldout


def _summary(profile: str, problem: MergeProblem, rungs: list[int], ch: _Choices, real: dict[str, SearchResult],
             study: _SurrogateStudy, baselines: pd.DataFrame, best_row: pd.Series | None,
             heldout: dict[str, float], search_cost: tuple[int, int], seconds: float) -> dict[str, Any]:
    n_full, s, metrics = rungs[-1], study, study.metrics
    return {
        "profile": profile, "catalogue": problem.catalogue.name, "pair": f"{problem.a}|{problem.b}",
        "tasks": list(problem.tasks), "n_eval": n_full, "fidelities": rungs,
        "trials": int(sum(len(r.trials) for r in real.values()) + len(s.collected)),
        "surrogate_trials": int(len(s.comparison)),
        "real_evaluations": int(problem.evaluations), "real_examples": int(problem.examples),
        "search_evaluations": int(search_cost[0]), "search_examples": int(search_cost[1]),
        "best_found_quality": round(float(best_row.quality), 4) if best_row is not None else None,
        "best_found_by": str(best_row.source) if best_row is not None else None,
        "simmerge_choice_quality": _finite(baselines.quality.iloc[1]),
        "best_fixed_quality": _finite(baselines.quality.iloc[0]),
        "label_oracle_quality": _finite(baselines.quality.iloc[2]) if len(baselines) > 2 else None,
        "label_oracle_labelled": round(ch.oracle[2], 4) if ch.oracle is not None else None,
        "simmerge_choice": f"{ch.choice[0]} {json.dumps(ch.choice[1], sort_keys=True)}",
        "simmerge_choice_source": ch.choice_source, "simmerge_choice_abstains": ch.abstain,
        "best_fixed": f"{ch.fixed[0]} {json.dumps(ch.fixed[1], sort_keys=True)}", "best_fixed_source": ch.fixed_source,
        "heldout_examples": [n_full, SPLIT_SIZES["eval"]] if heldout else None,
        "heldout_quality": {k: _finite(v) for k, v in heldout.items()},
        "heldout_examples_decoded": int(problem.heldout_examples),
        # NaN (e.g. τ of a constant held-out set) becomes null: the benchmark JSON stays strict JSON
        "surrogate_r2": _finite(metrics["r2"]), "surrogate_kendall_tau": _finite(metrics["kendall_tau"]),
        "surrogate_samples": int(len(s.samples)), "surrogate_test": int(metrics["n_test"]),
        "pareto_size": int(len(real["nsga2 (tasks)"].pareto())) if "nsga2 (tasks)" in real else None,
        "real_best": {k: round(r.best_value, 4) for k, r in real.items() if (r.trials.state == "COMPLETE").any()},
        "surrogate_winner_quality": {r.sampler: round(float(r.quality), 4) for r in s.verified.itertuples()},
        "pruned_trials": int((real["tpe+hyperband"].trials.state == "PRUNED").sum()),
        "seconds": round(seconds, 1),
    }


def run_experiment(catalogue: Catalogue | str | Path, profile: str = "smoke", labels_file: str | Path | None = None,
                   predictor_file: str | Path | None = None, features_file: str | Path | None = None,
                   pair: tuple[str, str] | None = None, seed: int = 0, progress: bool = True,
                   tables: Tables | None = None, detailed: bool = True, family: str = "forest",
                   **overrides: Any) -> Experiment:
    """Chapter 08 end to end on one same-base pair (``pair``, else :func:`choose_pair`), sized by the profile's
    ``search`` settings (:func:`simmerge_lib.profiles.settings`) updated with ``overrides``:

    1. baselines: the best fixed candidate and the SimMerge predictor's choice; given ``tables`` (features, labels,
       reference) both come from the pairs that hold neither expert nor a sibling of theirs (:func:`heldout_choice`:
       the pair's own labels never reach the choice), else from the labels file and the predictor file (fallbacks:
       linear 0.5, the best fixed candidate); the label grid's best candidate for the pair in hindsight when the
       labels hold it;
    2. real searches on the first ``n_eval`` eval examples per task: TPE + Hyperband over the layer-wise space
       (warm-started with the SimMerge choice and the best fixed candidate, so it can only match or beat both on
       these examples), TPE over the depth space, and (``detailed``) NSGA-II per task (Pareto front);
    3. the surrogate: random real samples + every completed real trial, R² / Kendall τ on held-out groups;
    4. (``detailed``) random, QMC, TPE and NSGA-II on the surrogate at equal budget over ``seeds``; each one's best
       configuration merged and scored for real;
    5. the honest comparison (kit tasks): the best recipe found, the baselines and the label oracle re-scored on
       the eval examples the search never saw ([``n_eval``, 512)), where the search's pick is not flattered by the
       noise it was picked on.
    """
    start = time.perf_counter()
    cfg = {**profiles.settings("search", profile), **overrides}
    cat = catalogue if isinstance(catalogue, Catalogue) else Catalogue.load(catalogue)
    a, b = pair or choose_pair(cat, labels_file)
    problem = MergeProblem(cat, a, b)
    space = problem.layerwise_space()
    n_full = int(cfg["n_eval"])
    rungs = fidelity_schedule(n_full, int(cfg["n_min"]))

    ch = _choices(problem, cfg, tables, labels_file, predictor_file, features_file, family, seed)
    labelled_n = int(tables[1].n_eval.iloc[0]) if ch.oracle is not None else None
    baselines = _baseline_table(problem, space, ch, n_full, labelled_n)
    warm = [baselines.params.iloc[1], baselines.params.iloc[0]]
    real = _real_searches(problem, space, cfg, rungs, warm, seed, detailed, progress)
    search_cost = (problem.evaluations, problem.examples)
    study = _surrogate_study(problem, space, cfg, real, n_full, seed, detailed, progress)
    leaderboard = _leaderboard(space, real, study.verified, baselines)
    searched = leaderboard[~leaderboard.source.isin(BASELINES)].dropna(subset=["quality"])
    best_row = searched.iloc[0] if len(searched) else None
    heldout = _heldout(problem, space, n_full, best_row, real["tpe (depth)"], baselines)
    summary = _summary(profile, problem, rungs, ch, real, study, baselines, best_row, heldout, search_cost,
                       time.perf_counter() - start)
    return Experiment(problem, cfg, real, study.samples, study.metrics, study.surrogate, study.comparison,
                      study.verified, baselines, leaderboard, summary)


def pair_study(catalogue: Catalogue | str | Path, profile: str, pairs: Sequence[tuple[str, str]],
               tables: Tables | None = None, seed: int = 0, progress: bool = False, family: str = "forest",
               detailed_first: bool = True, **overrides: Any) -> tuple[list[Experiment], pd.DataFrame]:
    """:func:`run_experiment` on each pair (the first one ``detailed``: NSGA-II and the optimizers on the surrogate;
    the others the searches the comparison needs), and one row per pair: in-sample and held-out quality of the best
    recipe found, of the SimMerge choice, the best fixed candidate and the label oracle, the search's real-merge
    budget, and the surrogate's held-out R² and Kendall τ."""
    experiments, rows = [], []
    for i, pair in enumerate(pairs):
        exp = run_experiment(catalogue, profile, pair=tuple(pair), seed=seed, progress=progress, tables=tables,
                             detailed=detailed_first and i == 0, family=family, **overrides)
        experiments.append(exp)
        s, h = exp.summary, exp.summary["heldout_quality"]
        rows.append({"pair": s["pair"], "best_found_by": s["best_found_by"], "best_found": s["best_found_quality"],
                     "simmerge_choice": s["simmerge_choice_quality"], "best_fixed": s["best_fixed_quality"],
                     "label_oracle": s["label_oracle_quality"], "heldout_best_found": h.get("best_found"),
                     "heldout_best_depth": h.get("best_depth"), "heldout_simmerge_choice": h.get("simmerge_choice"),
                     "heldout_best_fixed": h.get("best_fixed"), "heldout_label_oracle": h.get("label_oracle"),
                     "choice": s["simmerge_choice"], "search_evaluations": s["search_evaluations"],
                     "search_examples": s["search_examples"], "surrogate_r2": s["surrogate_r2"],
                     "surrogate_kendall_tau": s["surrogate_kendall_tau"], "surrogate_samples": s["surrogate_samples"],
                     "seconds": s["seconds"]})
    return experiments, pd.DataFrame(rows)


def pair_study_summary(table: pd.DataFrame) -> dict[str, Any]:
    """The claims of the pair study: on how many pairs the best recipe found matched or beat the SimMerge choice
    (on the search's examples, where the warm start guarantees it, and on held-out examples, where nothing does),
    the mean held-out gains over the choice and over the best fixed candidate, the search budget and the surrogate's
    mean held-out Kendall τ."""
    def share(x: pd.Series, y: pd.Series) -> str:
        ok = (x >= y - 1e-9)[x.notna() & y.notna()]
        return f"{int(ok.sum())}/{len(ok)}"

    return {"pairs": int(len(table)),
            "best_found_ge_choice": share(table.best_found, table.simmerge_choice),
            "heldout_best_found_ge_choice": share(table.heldout_best_found, table.heldout_simmerge_choice),
            "heldout_gain_over_choice": _finite((table.heldout_best_found - table.heldout_simmerge_choice).mean()),
            "heldout_gain_over_fixed": _finite((table.heldout_best_found - table.heldout_best_fixed).mean()),
            "heldout_choice_minus_fixed": _finite((table.heldout_simmerge_choice - table.heldout_best_fixed).mean()),
            "heldout_oracle_minus_found": _finite((table.heldout_label_oracle - table.heldout_best_found).mean()),
            "search_evaluations_per_pair": _finite(table.search_evaluations.mean(), 1),
            "search_examples_per_pair": _finite(table.search_examples.mean(), 1),
            "mean_kendall_tau": _finite(table.surrogate_kendall_tau.mean()),
            "min_kendall_tau": _finite(table.surrogate_kendall_tau.min()),
            "mean_r2": _finite(table.surrogate_r2.mean())}
