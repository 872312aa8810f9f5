"""The surrogate benchmark: a random forest maps the encoded configuration x(r) to (quality, norm_t for t in T),
judged on held-out *groups* (a sample's group is its pair and its canonical recipe, so a configuration sampled twice
never sits on both sides) by R² and Kendall's τ; optimizers then run against it at equal budget."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import kendalltau
from sklearn.ensemble import RandomForestRegressor
from sklearn.metrics import r2_score
from sklearn.model_selection import GroupShuffleSplit

from .optimize import run_search
from .problem import MergeProblem
from .spaces import Space


def collect_samples(problem: MergeProblem, space: Space, n_samples: int, n: int, seed: int = 0,
                    sampler: str = "random", progress: bool = False) -> pd.DataFrame:
    """Score ``n_samples`` configurations for real (``n`` examples per task): the surrogate's training data.

    Columns: params, key, quality, task:<t> per parent task, pair, group (pair + canonical recipe, the split unit)."""
    result = run_search(space, n_samples, problem=problem, sampler=sampler, fidelities=(n,), seed=seed,
                        progress=progress)
    return samples_from_trials(result.trials, problem)


def samples_from_trials(trials: pd.DataFrame, problem: MergeProblem) -> pd.DataFrame:
    """Completed trials of real searches as surrogate samples (see :func:`collect_samples`)."""
    done = trials[trials.state == "COMPLETE"].copy()
    task_cols = [f"task:{t}" for t in problem.tasks]
    out = done[["params", "key", "value", *task_cols]].rename(columns={"value": "quality"})
    out["pair"] = f"{problem.a}|{problem.b}"
    out["group"] = out.pair + "#" + out.key
    return out.reset_index(drop=True)


def group_split(samples: pd.DataFrame, test_size: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train / test row indices with no ``group`` on both sides (sklearn's GroupShuffleSplit)."""
    if samples.group.nunique() < 2:
        raise ValueError("surrogate split: need at least two sample groups")
    split = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    train, test = next(split.split(samples, groups=samples.group))
    return train, test


def check_no_leakage(samples: pd.DataFrame, train: np.ndarray, test: np.ndarray, space: Space) -> None:
    """Raise if a group, a recipe or an identical encoded configuration sits in both train and test."""
    tr, te = samples.iloc[train], samples.iloc[test]
    for col in ("group", "key"):
        shared = set(tr[col]) & set(te[col])
        if shared:
            raise ValueError(f"surrogate split leaks: {len(shared)} {col}(s) in both train and test")
    enc_tr = {space.encode(p).tobytes() for p in tr.params}
    if any(space.encode(p).tobytes() in enc_tr for p in te.params):
        raise ValueError("surrogate split leaks: an identical configuration is in both train and test")


@dataclass
class Surrogate:
    """A regressor from encoded configurations to (quality, per-task normalized scores)."""

    space: Any
    tasks: list[str]
    model: Any
    targets: list[str] = field(default_factory=list)

    def predict(self, params: Sequence[Mapping[str, Any]]) -> np.ndarray:
        x = np.stack([self.space.encode(p) for p in params])
        y = self.model.predict(x)
        return y.reshape(len(x), -1)

    def predict_quality(self, params: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return self.predict(params)[:, 0]

    def predict_tasks(self, params: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
        y = self.predict(params)
        return [{t: float(row[1 + i]) for i, t in enumerate(self.tasks)} for row in y]


def fit_surrogate(samples: pd.DataFrame, space: Space, seed: int = 0, n_estimators: int = 200) -> Surrogate:
    """Fit a random forest on (encoded configuration → quality, task scores); NaN task scores count as 0."""
    tasks = [c.removeprefix("task:") for c in samples.columns if c.startswith("task:")]
    targets = ["quality", *[f"task:{t}" for t in tasks]]
    x = np.stack([space.encode(p) for p in samples.params])
    y = samples[targets].fillna(0.0).to_numpy(dtype=float)
    model = RandomForestRegressor(n_estimators=n_estimators, min_samples_leaf=2, random_state=seed, n_jobs=1)
    model.fit(x, y)
    return Surrogate(space, tasks, model, targets)


def surrogate_quality(samples: pd.DataFrame, space: Space, test_size: float = 0.25, seed: int = 0,
                      n_estimators: int = 200) -> dict[str, Any]:
    """Held-out R² and Kendall τ of predicted vs measured quality (group split, checked for leakage)."""
    train, test = group_split(samples, test_size, seed)
    check_no_leakage(samples, train, test, space)
    model = fit_surrogate(samples.iloc[train], space, seed, n_estimators)
    measured = samples.iloc[test].quality.fillna(0.0).to_numpy()
    predicted = model.predict_quality(list(samples.iloc[test].params))
    tau = kendalltau(predicted, measured).statistic if len(test) > 1 else math.nan
    return {"r2": float(r2_score(measured, predicted)) if len(test) > 1 else math.nan,
            "kendall_tau": float(tau) if tau is not None else math.nan, "n_train": int(len(train)),
            "n_test": int(len(test)), "measured": measured, "predicted": predicted}


def compare_on_surrogate(surrogate: Surrogate, samplers: Sequence[str], n_trials: int, seeds: Sequence[int] = (0,),
                         warm_start: Sequence[Mapping[str, Any]] = (), progress: bool = False) -> pd.DataFrame:
    """Every sampler × seed against the surrogate at the same budget: the concatenated trial tables."""
    frames = []
    for name in samplers:
        for seed in seeds:
            res = run_search(surrogate.space, n_trials, surrogate=surrogate, sampler=name, objectives="quality",
                             seed=seed, warm_start=warm_start, progress=progress)
            frames.append(res.trials.assign(seed=seed))
    return pd.concat(frames, ignore_index=True)


def best_configs(trials: pd.DataFrame) -> pd.DataFrame:
    """Per sampler (over seeds) the configuration with the best value: columns sampler, seed, value, params."""
    done = trials[trials.state == "COMPLETE"]
    idx = done.groupby("sampler", sort=False).value.idxmax()
    return done.loc[idx, ["sampler", "seed", "value", "params"]].reset_index(drop=True)
