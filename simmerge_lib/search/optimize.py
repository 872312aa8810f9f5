"""Optimizers (Optuna): samplers, multi-fidelity pruners, a study over a space scored by real merges or by a
surrogate, and the Pareto front of a multi-objective study.

Multi-fidelity: a trial is scored on n_1 < n_2 < … examples per task (nested prefixes of the eval split) and reports
quality(r; n_k) after each rung; a pruned trial costs sum_{k<=stop} n_k |T| decoded examples instead of
sum_k n_k |T|."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import pandas as pd
from tqdm.auto import tqdm

from .problem import MergeProblem
from .spaces import SearchRecipe, Space

if TYPE_CHECKING:  # the surrogate module runs searches itself: its type only, for annotations
    from .surrogate import Surrogate

SAMPLERS = ("random", "tpe", "nsga2", "qmc")

optuna.logging.set_verbosity(optuna.logging.WARNING)


def fidelity_schedule(n_max: int, n_min: int, eta: int = 2) -> list[int]:
    """Rungs n_min, n_min·eta, … up to n_max (n_max always last): the examples per task of each rung."""
    if n_min <= 0 or n_max < n_min or eta < 2:
        raise ValueError(f"fidelity schedule: need 0 < n_min <= n_max and eta >= 2, got {n_min}, {n_max}, {eta}")
    rungs = [int(n_min)]
    while rungs[-1] * eta < n_max:
        rungs.append(rungs[-1] * eta)
    if rungs[-1] != n_max:
        rungs.append(int(n_max))
    return rungs


def make_sampler(name: str, seed: int = 0, n_objectives: int = 1, n_startup: int = 10) -> optuna.samplers.BaseSampler:
    """``random``, ``tpe`` (multivariate), ``nsga2`` or ``qmc`` (Sobol) with a seed."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, 2 * n_startup)))
    if name == "qmc":
        with warnings.catch_warnings():  # "experimental" in some Optuna releases
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")


def make_pruner(name: str | None, rungs: Sequence[int], eta: int = 2) -> optuna.pruners.BasePruner:
    """``None`` (never prune), ``sha`` (successive halving) or ``hyperband`` over rungs measured in examples."""
    if name in (None, "none"):
        return optuna.pruners.NopPruner()
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=int(rungs[0]), reduction_factor=eta)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=int(rungs[0]), max_resource=int(rungs[-1]),
                                              reduction_factor=eta)
    raise ValueError(f"unknown pruner {name!r}; expected none, sha or hyperband")


@dataclass
class SearchResult:
    """A finished search: the Optuna study, one row per trial, and the best recipe."""

    study: optuna.Study
    space: Any
    trials: pd.DataFrame
    objectives: list[str]
    sampler: str
    pruner: str | None

    @property
    def best_params(self) -> dict[str, Any]:
        done = self.trials[self.trials.state == "COMPLETE"]
        if done.empty:
            raise ValueError("search: no trial completed")
        row = done.loc[done["value"].idxmax()]
        return dict(row["params"])

    @property
    def best_recipe(self) -> SearchRecipe:
        return self.space.from_params(self.best_params)

    @property
    def best_value(self) -> float:
        return float(self.trials.loc[self.trials.state == "COMPLETE", "value"].max())

    def pareto(self) -> pd.DataFrame:
        """Rows of the non-dominated trials (multi-objective searches; maximisation)."""
        done = self.trials[self.trials.state == "COMPLETE"]
        return done[pareto_mask(done[self.objectives].to_numpy())].reset_index(drop=True)


def pareto_mask(values: np.ndarray) -> np.ndarray:
    """True for rows not dominated by any other row (maximise every column; NaN counts as -inf)."""
    v = np.nan_to_num(np.asarray(values, dtype=float), nan=-np.inf)
    keep = np.ones(len(v), dtype=bool)
    for i in range(len(v)):
        dominated = np.all(v >= v[i], axis=1) & np.any(v > v[i], axis=1)
        keep[i] = not dominated.any()
    return keep


def _objective(space: Space, rungs: Sequence[int], tasks: Sequence[str], multi: bool, rows: list[dict[str, Any]],
               problem: MergeProblem | None, surrogate: Surrogate | None
               ) -> Callable[[optuna.Trial], float | list[float]]:
    """The study's objective: suggest a recipe, climb the rungs (reporting quality to the pruner), record one row.

    Costs in a row are counted from the problem's counters at the start of the study."""
    start_examples = problem.examples if problem else 0
    start_evals = problem.evaluations if problem else 0

    def objective(trial: optuna.Trial) -> float | list[float]:
        recipe = space.suggest(trial)
        params = dict(trial.params)
        row: dict[str, Any] = {"number": trial.number, "params": params, "key": recipe.key()}
        rows.append(row)
        before = problem.examples if problem else 0
        for k, n in enumerate(rungs):
            if problem is not None:
                norm = problem.normalized(recipe, n)
            else:
                norm = surrogate.predict_tasks([params])[0]
            values = [v for v in norm.values() if not math.isnan(v)]
            quality = float(np.mean(values)) if values else 0.0
            row.update({"value": quality, "rung": n, **{f"task:{t}": norm[t] for t in tasks}})
            row["cost_examples"] = (problem.examples - start_examples) if problem else 0
            row["evaluations"] = (problem.evaluations - start_evals) if problem else 0
            row["trial_examples"] = (problem.examples - before) if problem else 0
            if not multi and len(rungs) > 1:
                trial.report(quality, n)
                if k < len(rungs) - 1 and trial.should_prune():
                    raise optuna.TrialPruned()
        if multi:
            return [0.0 if math.isnan(norm[t]) else float(norm[t]) for t in tasks]
        return quality

    return objective


def _trials_frame(study: optuna.Study, rows: list[dict[str, Any]], sampler: str, space: Space,
                  pruner: str | None) -> pd.DataFrame:
    states = {t.number: t.state.name for t in study.trials}
    frame = pd.DataFrame(rows)
    frame["state"] = frame.number.map(states)
    # A pruned trial's quality is a low-fidelity estimate: the trace's best counts finished trials only.
    finished = frame.value.where(frame.state == "COMPLETE")
    frame["best_so_far"] = finished.cummax()
    frame["sampler"], frame["space"] = sampler, space.kind
    frame["pruner"] = pruner
    return frame


def run_search(space: Space, n_trials: int, problem: MergeProblem | None = None,
               surrogate: Surrogate | None = None, sampler: str = "tpe", objectives: str = "quality",
               fidelities: Sequence[int] = (32,), pruner: str | None = None, eta: int = 2, seed: int = 0,
               warm_start: Sequence[Mapping[str, Any]] = (), progress: bool = False,
               n_startup: int = 10) -> SearchResult:
    """Run ``n_trials`` of an Optuna study over ``space``, scored by real merges (``problem``) or a ``surrogate``.

    ``objectives="quality"``: maximise merge quality; with ``pruner`` (``sha`` / ``hyperband``) each trial climbs
    the ``fidelities`` (examples per task) and reports quality at each rung. ``objectives="tasks"``: maximise each
    parent task's normalized score (NSGA-II; Optuna does not prune multi-objective trials, so only the last rung is
    used). ``warm_start`` configurations are enqueued first (e.g. the SimMerge choice).

    Each row of the trials table: number, state, value (quality), the per-task objectives, cost_examples,
    evaluations (both cumulative over the study, real merges only), trial_examples (this trial's own cost),
    best_so_far, rung (last fidelity reached), key (canonical recipe digest), params.
    """
    if (problem is None) == (surrogate is None):
        raise ValueError("run_search: pass exactly one of problem (real merges) or surrogate")
    tasks = list(problem.tasks if problem is not None else surrogate.tasks)
    multi = objectives == "tasks"
    if objectives not in ("quality", "tasks"):
        raise ValueError(f"objectives must be 'quality' or 'tasks', got {objectives!r}")
    rungs = sorted(int(n) for n in fidelities)
    if multi or pruner in (None, "none"):
        rungs = rungs[-1:]
    # A fixed study name: Hyperband assigns trials to brackets by a hash of (study name, trial number), and the
    # default name is a random UUID, which made the same seed prune different trials from run to run.
    study = optuna.create_study(study_name=f"{sampler}-{space.kind}-{objectives}-{seed}",
                                directions=["maximize"] * (len(tasks) if multi else 1),
                                sampler=make_sampler(sampler, seed, len(tasks) if multi else 1, n_startup),
                                pruner=make_pruner(None if multi else pruner, rungs, eta))
    for params in warm_start:
        study.enqueue_trial(dict(params), skip_if_exists=True)
    rows: list[dict[str, Any]] = []
    objective = _objective(space, rungs, tasks, multi, rows, problem, surrogate)
    bar = tqdm(total=n_trials, desc=f"{sampler} on {space.kind}", leave=False) if progress else None
    callbacks = [lambda s, t: bar.update(1)] if bar is not None else []
    study.optimize(objective, n_trials=n_trials, callbacks=callbacks, catch=())
    if bar is not None:
        bar.close()
    frame = _trials_frame(study, rows, sampler, space, pruner if not multi else None)
    return SearchResult(study, space, frame, [f"task:{t}" for t in tasks], sampler, pruner)
