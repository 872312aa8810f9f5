"""Offline replay: the baselines' inputs (best fixed arm, the offline predictor's scores), the shared setup,
policies by name, warm starts, one replayed stream, many, and their summary (regret before and after events)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..catalogue import pair_key
from ..operators import Candidate, candidate_key
from ..predictor import fit_predictor, owner_rows, training_table
from .arms import ContextEncoder, ReplayData
from .policies import POLICIES, POLICY_REGISTRY, Policy
from .scenarios import Scenario, make_stream


def best_fixed_arm(data: ReplayData, pairs: Sequence[int], arms: Sequence[int] | None = None) -> Candidate:
    """The arm with the best mean quality over ``pairs`` (among ``arms``; default all)."""
    arms = list(arms) if arms is not None else list(range(len(data.arms)))
    if not len(pairs):
        raise ValueError("best_fixed_arm: no pre-stream pairs to choose from")
    means = data.quality[np.asarray(pairs)][:, arms].mean(axis=0)
    return data.arms[arms[int(np.argmax(means))]]


def predictor_scores(data: ReplayData, pairs: Sequence[int], arms: Sequence[int] | None = None,
                     family: str = "forest", seed: int = 0) -> pd.DataFrame | None:
    """Chapter 04's offline predictor trained on ``pairs`` × ``arms`` only, scoring every pair: a DataFrame
    (index: pair index, columns: arm keys; arms it never saw are absent). None when the raw tables are
    unavailable, or it cannot be fitted (e.g. too few pairs)."""
    if data.features is None or data.labels is None:
        return None
    arms = list(arms) if arms is not None else list(range(len(data.arms)))
    train_pairs = {pair_key(a, b) for a, b in zip(data.pairs.a.iloc[list(pairs)], data.pairs.b.iloc[list(pairs)],
                                                  strict=True)}
    keys = {data.arms[k].key for k in arms}
    lab = data.labels
    lab = lab[pair_key(lab.a, lab.b).isin(train_pairs) & candidate_key(lab.method, lab.setting).isin(keys)]
    try:
        model = fit_predictor(training_table(data.features, lab), family=family, seed=seed, classifier=False)
    except (ValueError, KeyError, IndexError):  # too few history pairs / candidates to fit on
        return None
    want = pd.DataFrame([(a, b, t) for a, b, ts in zip(data.pairs.a, data.pairs.b, data.pairs.tasks, strict=True)
                         for t in ts], columns=["a", "b", "task"])
    ranked = model.rank(owner_rows(data.features, want))
    index = {pair_key(a, b): i for i, (a, b) in enumerate(zip(data.pairs.a, data.pairs.b, strict=True))}
    ranked["_i"] = ranked.pair.map(index)
    return ranked.pivot_table(index="_i", columns="candidate", values="predicted", aggfunc="mean")


@dataclass
class ReplaySetup:
    """What every policy of one replay shares: encoded contexts, the scenario, the baselines' inputs."""

    data: ReplayData
    scenario: Scenario
    X: np.ndarray
    best_fixed: Candidate
    predictor: pd.DataFrame | None = None
    offset: float = 0.0


def prepare_replay(data: ReplayData, scenario: Scenario, n_components: int = 8, predictor: bool = True,
                   predictor_family: str = "forest") -> ReplaySetup:
    """Fit the context encoder on the pairs present at the start, choose the best fixed arm on the history pairs
    (arms present at the start), (optionally) fit the offline predictor on the same history, and set the learners'
    reward offset to the history's mean quality."""
    enter = scenario.enter_time(len(data.pairs))
    initial_arms = [k for k, t in enumerate(scenario.arm_time(len(data.arms))) if t == 0]
    encoder = ContextEncoder(n_components).fit(data.raw[enter == 0])
    X = encoder.transform(data.raw, data.task_hot)
    history = list(scenario.history) or list(np.flatnonzero(enter == 0))
    fixed = best_fixed_arm(data, history, initial_arms)
    scores = predictor_scores(data, history, initial_arms, predictor_family) if predictor else None
    offset = float(data.quality[np.asarray(history)][:, initial_arms].mean())
    return ReplaySetup(data, scenario, X, fixed, scores, offset)


def make_policy(name: str, setup: ReplaySetup, seed: int = 0, **params: Any) -> Policy:
    """A fresh policy by name (:data:`POLICY_REGISTRY`); ``params`` go to its constructor (alpha, v, lam, ...)."""
    if name not in POLICY_REGISTRY:
        raise ValueError(f"unknown policy {name!r}; expected one of {list(POLICIES)}")
    return POLICY_REGISTRY[name].from_setup(setup, seed, **params)


def warm_observations(setup: ReplaySetup, source: str = "predictor") -> list[tuple[int, int, float]]:
    """Pre-stream observations (pair, arm, reward) for a warm start, over the arms present at the start.

    * ``"history"``: the measured quality of every history pair × arm;
    * ``"predictor"``: the offline predictor's *predicted* quality of every pair present at the start (features are
      label-free, so it can score pairs nobody merged), history pairs with their measured quality. Falls back to
      ``"history"`` when the setup has no predictor."""
    data, scenario = setup.data, setup.scenario
    initial = [k for k, t in enumerate(scenario.arm_time(len(data.arms))) if t == 0]
    obs = [(p, k, float(data.quality[p, k])) for p in scenario.history for k in initial]
    if source == "history" or setup.predictor is None:
        return obs
    if source != "predictor":
        raise ValueError(f"unknown warm-start source {source!r}; expected 'history' or 'predictor'")
    start = set(np.flatnonzero(scenario.enter_time(len(data.pairs)) == 0).tolist()) - set(scenario.history)
    for p in sorted(start):
        if p not in setup.predictor.index:
            continue
        row = setup.predictor.loc[p]
        obs += [(p, k, float(row[data.arms[k].key])) for k in initial
                if data.arms[k].key in row.index and np.isfinite(row[data.arms[k].key])]
    return obs


def run_replay(policy: Policy, setup: ReplaySetup, seed: int = 0, noise: float = 0.0,
               warm_start: str | None = None, warm_weight: float = 0.5) -> pd.DataFrame:
    """Replay one stream (fixed by ``seed``: every policy sees the same requests) through ``policy``.

    ``noise``: std of Gaussian noise added to the *observed* reward (regret uses the measured quality).
    ``warm_start``: ``"history"`` or ``"predictor"`` (:func:`warm_observations`) — the learner first sees those
    observations, each with weight ``warm_weight`` (an observation (x, r) of weight w is fed as (sqrt(w) x, sqrt(w) r):
    A += w x x^T, b += w r x; the shared features are linear in x, so this holds for the hybrid model too).
    Returns one row per request: t, pair, a, b, arm, reward, oracle, regret, n_arms."""
    data, scenario, X = setup.data, setup.scenario, setup.X
    stream = make_stream(data, scenario, seed)
    arm_time = scenario.arm_time(len(data.arms))
    rng = np.random.default_rng([seed, 3])
    available = [k for k in range(len(data.arms)) if arm_time[k] == 0]
    for k in available:
        policy.add_arm(data.arms[k])
    if warm_start and policy.learns:
        w = float(np.sqrt(warm_weight))
        for p, k, r in warm_observations(setup, warm_start):
            # the offset is subtracted inside update(): scale the centred reward, then add the offset back
            policy.update(data.arms[k], w * X[p], w * (r - policy.offset) + policy.offset)
    arrivals = {ev.time: list(ev.arms) for ev in scenario.events if ev.arms}
    index = {arm.key: k for k, arm in enumerate(data.arms)}
    rows = np.empty((len(stream), 5))
    chosen = np.empty(len(stream), dtype=int)
    for t, p in enumerate(stream):
        for k in arrivals.get(t, ()):
            policy.add_arm(data.arms[k])
            available.append(k)
        x = X[p]
        k = index[policy.select(x, [data.arms[j] for j in available], int(p)).key]
        reward = float(data.quality[p, k])
        policy.update(data.arms[k], x, reward + (noise * rng.standard_normal() if noise else 0.0))
        oracle = float(data.quality[p, available].max())
        rows[t] = (t, p, reward, oracle, len(available))
        chosen[t] = k
    out = pd.DataFrame({"t": rows[:, 0].astype(int), "pair": rows[:, 1].astype(int)})
    out["a"] = data.pairs.a.to_numpy()[out.pair]
    out["b"] = data.pairs.b.to_numpy()[out.pair]
    out["arm"] = np.asarray(data.keys, dtype=object)[chosen]
    out["method"] = [data.arms[k].method for k in chosen]
    out["reward"], out["oracle"] = rows[:, 2], rows[:, 3]
    out["regret"] = out.oracle - out.reward
    out["n_arms"] = rows[:, 4].astype(int)
    return out


def replay_many(setup: ReplaySetup, policies: Sequence[str] = POLICIES, seeds: Sequence[int] = range(10),
                params: Mapping[str, Mapping[str, Any]] | None = None, noise: float = 0.0,
                warm_start: Sequence[str] = (), warm_source: str = "predictor", warm_weight: float = 0.5,
                progress: bool = False) -> pd.DataFrame:
    """:func:`run_replay` for every policy × seed (the predictor is skipped when the setup has none). A learner
    named in ``warm_start`` also runs as ``<name>_warm``, warm-started from ``warm_source``. Adds columns policy,
    seed, cum_regret."""
    params = params or {}
    runs = []
    names = [p for p in policies if p != "predictor" or setup.predictor is not None]
    jobs: Any = [(n, None) for n in names] + [(n, warm_source) for n in warm_start]
    if progress:
        jobs = tqdm(jobs, desc="replay")
    for name, warm in jobs:
        for seed in seeds:
            policy = make_policy(name, setup, seed, **dict(params.get(name, {})))
            run = run_replay(policy, setup, seed, noise, warm, warm_weight)
            run.insert(0, "seed", seed)
            run.insert(0, "policy", f"{name}_warm" if warm else name)
            run["cum_regret"] = run.regret.cumsum()
            runs.append(run)
    return pd.concat(runs, ignore_index=True)


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, float)
    return {"mean": round(float(v.mean()), 4), "std": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4)}


def crossing_time(runs: pd.DataFrame, policy: str, reference: str = "best_fixed") -> int | None:
    """The request t from which ``policy``'s cumulative regret (mean over seeds) stays below ``reference``'s until
    the end of the stream: where a learner has caught up with, and then stays ahead of, the reference. None when
    it is not below at the end."""
    curves = runs[runs.policy.isin([policy, reference])].groupby(["policy", "t"]).cum_regret.mean().unstack(0)
    below = (curves[policy] < curves[reference]).to_numpy()
    if not len(below) or not below[-1]:
        return None
    above = np.flatnonzero(~below)
    return int(curves.index[above[-1] + 1] if len(above) else curves.index[0])


def summarize_runs(runs: pd.DataFrame, scenario: Scenario, reference: str = "best_fixed") -> dict[str, Any]:
    """Per policy: cumulative regret at the end of the stream, mean regret per request and in the last quarter of
    the stream, each mean ± std over seeds, and the request from which its cumulative regret stays below the
    ``reference`` policy's (:func:`crossing_time`); per event: summed regret over the ``window`` requests before and
    after it."""
    w = scenario.window
    out: dict[str, Any] = {"horizon": scenario.horizon, "window": w, "seeds": int(runs.seed.nunique()),
                           "events": [{"kind": ev.kind, "time": ev.time, "label": ev.label} for ev in scenario.events],
                           "policies": {}}
    last = runs.t >= runs.t.max() - (runs.t.max() + 1) // 4
    for name, g in runs.groupby("policy", sort=False):
        per_seed = g.groupby("seed")
        rec: dict[str, Any] = {"cumulative_regret": _mean_std(per_seed.regret.sum()),
                               "mean_regret": _mean_std(per_seed.regret.mean()),
                               "last_quarter_regret": _mean_std(g[last[g.index]].groupby("seed").regret.mean()),
                               "mean_reward": _mean_std(per_seed.reward.mean())}
        if reference in set(runs.policy) and name != reference:
            rec[f"crossing_{reference}"] = crossing_time(runs, str(name), reference)
        for ev in scenario.events:
            before = g[(g.t >= ev.time - w) & (g.t < ev.time)].groupby("seed").regret.sum()
            after = g[(g.t >= ev.time) & (g.t < ev.time + w)].groupby("seed").regret.sum()
            rec[f"{ev.kind}_before"] = _mean_std(before)
            rec[f"{ev.kind}_after"] = _mean_std(after)
        out["policies"][name] = rec
    return out
