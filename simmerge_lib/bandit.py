"""Chapter 06 — the bandit extension: choose the merge operator online, and absorb new operators, tasks and models.

A trained predictor (chapter 04) is frozen; a lab's catalogue is not. A *contextual bandit* learns while it serves
merge requests: request t is a pair (a, b) with context x_t (its similarity features), the bandit picks an *arm*
k_t = operator × setting, the merge is run and its quality r_t is observed, and the bandit updates. Its *regret* is

    regret_t = max_{k in K_t} q(pair_t, k) - q(pair_t, k_t),     R_T = sum_{t <= T} regret_t

over the arms K_t available at time t (q = merge quality, :func:`simmerge_lib.labels.merge_quality`).

**Context.** x = [1, PCA-whitened standardized pair features, multi-hot of the pair's parent tasks]: the features
(``fn_*`` / ``st_*``) of the ordered rows (a, b, t) are averaged over the parent tasks t, median-imputed, standardized
and projected on ``n_components`` principal components, clipped to [-clip, clip] (:class:`ContextEncoder`). The
encoder is fitted on the features of the pairs that exist when the stream starts (features are label-free and
cheap, so that uses no merge result); pairs arriving later are encoded with the same statistics. The task columns
of a task nobody has seen yet are all zero, which for a ridge model is the same as adding the column when the task
appears: its coefficient keeps its prior until the first such request.

**Policies** (numpy; λ = ridge prior, each arm k keeps A_k = λI + sum x x^T and b_k = sum (r - r_0) x, where the
offset r_0 = the pre-stream mean quality, so that an arm nobody has tried is expected at r_0 rather than at 0 —
otherwise a small exploration bonus would never try it):

* :class:`LinUCB` (disjoint, Li et al. 2010, Alg. 1): θ_k = A_k^{-1} b_k, choose
  argmax_k θ_k^T x + α sqrt(x^T A_k^{-1} x).
* :class:`HybridLinUCB` (Li et al. 2010, Alg. 2): r = z_k^T β + x^T θ_k, where z_k = shared features of the context
  *and the arm* (:func:`shared_features`: x itself, the pair's level, and the outer product of the arm's
  descriptor — operator traits and setting, :func:`arm_descriptor` — with the first context components). β is
  shared by all arms, so a new arm starts from what its traits predict instead of from zero. With A_0 = λI + ...,
  β = A_0^{-1} b_0, θ_k = A_k^{-1}(b_k - B_k β), the score is z^T β + x^T θ_k + α sqrt(s) with
  s = z^T A_0^{-1} z - 2 z^T A_0^{-1} B_k^T A_k^{-1} x + x^T A_k^{-1} x + x^T A_k^{-1} B_k A_0^{-1} B_k^T A_k^{-1} x.
  Update of the chosen arm: A_0 += B^T A^{-1} B, b_0 += B^T A^{-1} b; A += x x^T, B += x z^T, b += r x;
  A_0 += z z^T - B^T A^{-1} B, b_0 += r z - B^T A^{-1} b (A, B, b of the chosen arm, after its update).
* :class:`LinearThompson` (Agrawal & Goyal 2013, one model per arm): μ_k = A_k^{-1} b_k, draw
  θ̃_k ~ N(μ_k, v² A_k^{-1}) and choose argmax_k θ̃_k^T x.
* Baselines: :class:`RandomPolicy` (uniform over the available arms), :class:`FixedPolicy` (the *best fixed* arm:
  best mean quality on the pre-stream pairs), :class:`TablePolicy` (greedy on a fixed score table: the offline
  predictor of chapter 04, trained on the pre-stream pairs; it cannot score an operator it never saw).

Every policy can take an arm at any time (:meth:`Policy.add_arm`): the others' statistics are untouched.

**Environments.** :func:`run_replay` replays a labels table (offline evaluation: the reward of the chosen arm is its
measured quality for that pair, so a run of 600 requests takes well under a second and many seeds are cheap).
:class:`LiveEnvironment` runs the real merge and evaluation of the chosen arm (in memory, through the same job
function as chapter 03: :func:`simmerge_lib.labels.run_job`), for :func:`run_live`.

**Events** (:func:`make_scenario`): at given times a new operator's arms appear; a new task appears (pairs with an
expert of that task enter the stream); new experts join (their pairs enter). For ``window`` requests after a pair
event, a share ``new_share`` of the requests is drawn from the new pairs, so that the window measures how fast
they are learned. :func:`summarize_runs` reports the regret over the ``window`` requests before and after each event.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

#: Operator traits the hybrid model shares across arms (a new operator borrows from operators with common traits)
#: come from the operator registry (``operators.get_operator(name).traits``): registering an operator gives it
#: its traits here too. An arm whose operator is not registered has none.
TRAIT_NAMES = ("interpolate", "spherical", "task_vector", "trim", "drop", "sign_elect")
#: Setting parameters as descriptor columns: value minus the neutral value (weight 0.5, t 0.5, lambda 1,
#: density 1 = keep everything), so a setting at its neutral value adds nothing.
PARAM_NEUTRAL = {"weight": 0.5, "t": 0.5, "lambda": 1.0, "density": 1.0}
DESCRIPTOR_NAMES = (*TRAIT_NAMES, *(f"p_{k}" for k in PARAM_NEUTRAL))
POLICIES = ("linucb", "hybrid", "thompson", "predictor", "best_fixed", "random")
#: The chapter's stream: requests, the learners' exploration weight and context size (the values of Li et al.'s
#: setting and of the previous chapters, not tuned on the replayed table), and the operator that arrives
#: mid-stream: DELLA, registered after chapter 03's grid was fixed; it shares its traits (task vector, drop, sign
#: election) with DARE-TIES, so hybrid LinUCB can start it from what it learned about its relatives.
DEFAULT_HORIZON = 1200
DEFAULT_ALPHA = 0.1
DEFAULT_COMPONENTS = 8
NEW_OPERATOR = "della"


# ============================================================================================== arms and contexts
@dataclass(frozen=True)
class Arm:
    """One arm: an operator at one grid setting (``parameters`` as sorted (name, value) pairs)."""

    method: str
    setting: str
    parameters: tuple[tuple[str, float], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.method}|{self.setting}"

    @classmethod
    def from_json(cls, method: str, setting: str, parameters: str | Mapping[str, Any] | None) -> Arm:
        data = json.loads(parameters) if isinstance(parameters, str) and parameters else dict(parameters or {})
        return cls(method, setting, tuple(sorted((k, float(v)) for k, v in data.items())))


def operator_traits(method: str) -> tuple[str, ...]:
    """The registered operator's traits (:data:`simmerge_lib.operators.TRAITS`); () for an unknown operator."""
    from .operators import get_operator  # in the function: the bandit's tables need no torch until an arm is seen

    try:
        return get_operator(method).traits
    except ValueError:
        return ()


@functools.lru_cache(maxsize=4096)
def _descriptor(arm: Arm) -> tuple[float, ...]:
    traits = operator_traits(arm.method)
    params = dict(arm.parameters)
    values = [float(t in traits) for t in TRAIT_NAMES]
    values += [params.get(k, neutral) - neutral for k, neutral in PARAM_NEUTRAL.items()]
    return tuple(values)


def arm_descriptor(arm: Arm) -> np.ndarray:
    """The arm's shared description: operator traits (:func:`operator_traits`, from the registry) and its
    setting's parameters minus their neutral values."""
    return np.asarray(_descriptor(arm), dtype=float)


def shared_features(x: np.ndarray, arm: Arm, n_interact: int = 3) -> np.ndarray:
    """Hybrid LinUCB's z(x, arm) = [x, descriptor(arm) ⊗ x[:1 + n_interact]]: the pair's level (shared by all arms)
    and how each trait / parameter shifts quality, as a function of the first context components (x[0] = 1)."""
    return np.concatenate([x, np.outer(arm_descriptor(arm), x[:1 + n_interact]).ravel()])


def pair_key(a: str, b: str) -> str:
    return f"{a}|{b}"


def pair_contexts(features: pd.DataFrame, pairs: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Raw context of each pair: its feature rows averaged over its parent tasks ``tasks``.

    ``pairs`` has columns a, b, tasks (tuple of task names). Each task's row is read from the side of the expert
    that owns it (the row (owner, other, task), ``task_of_a == 1``, as chapter 04's predictor reads it), so the
    context is the same whichever expert the catalogue lists first. Tables without owner-oriented rows (no
    ``task_of_a``, or a row missing) fall back to the rows (a, b, t). Returns (n_pairs × n_features, names)."""
    from .predictor import feature_columns

    names = feature_columns(features)
    if not names:
        raise ValueError("features table: no feature columns (fn_* / st_*)")
    want = pd.DataFrame([(i, a, b, t) for i, (a, b, ts) in enumerate(zip(pairs.a, pairs.b, pairs.tasks, strict=True))
                         for t in ts], columns=["_i", "a", "b", "task"])
    table = features.drop_duplicates(["a", "b", "task"])
    rows = None
    if "task_of_a" in table.columns:
        owned = table[table.task_of_a == 1][["a", "b", "task", *names]]
        forward = want.merge(owned, on=["a", "b", "task"], how="inner")
        backward = want.merge(owned.rename(columns={"a": "b", "b": "a"}), on=["a", "b", "task"], how="inner")
        both = pd.concat([forward, backward], ignore_index=True).drop_duplicates(["_i", "task"])
        if len(both) == len(want):
            rows = both
    if rows is None:
        rows = want.merge(table[["a", "b", "task", *names]], on=["a", "b", "task"], how="inner")
    missing = sorted(set(range(len(pairs))) - set(rows._i))
    if missing:
        i = missing[0]
        raise ValueError(f"features table: no row for pair ({pairs.a.iloc[i]}, {pairs.b.iloc[i]}) on its task(s) "
                         f"{list(pairs.tasks.iloc[i])} ({len(missing)} pair(s) without features)")
    out = rows.groupby("_i")[names].mean().reindex(range(len(pairs))).to_numpy(float)
    return out, names


class ContextEncoder:
    """x = [1, clip(PCA_whiten(standardize(impute(raw)))), task multi-hot] (see the module docstring)."""

    def __init__(self, n_components: int = 8, clip: float = 5.0) -> None:
        self.n_components, self.clip = n_components, clip
        self.pipeline: Any = None

    def fit(self, raw: np.ndarray) -> ContextEncoder:
        from sklearn.decomposition import PCA
        from sklearn.impute import SimpleImputer
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        raw = np.asarray(raw, float)
        k = min(self.n_components, raw.shape[0] - 1, raw.shape[1])
        steps: list[Any] = [SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler()]
        if k >= 1:
            steps.append(PCA(n_components=k, whiten=True, random_state=0))
        self.pipeline = make_pipeline(*steps).fit(raw)
        return self

    def transform(self, raw: np.ndarray, task_hot: np.ndarray) -> np.ndarray:
        if self.pipeline is None:
            raise ValueError("ContextEncoder: call fit() first")
        z = np.clip(np.nan_to_num(self.pipeline.transform(np.asarray(raw, float))), -self.clip, self.clip)
        return np.hstack([np.ones((len(z), 1)), z, np.asarray(task_hot, float)])


# ============================================================================================== replay data
@dataclass
class ReplayData:
    """Everything a replay needs: pairs (a, b, base_a, base_b, same_base, tasks), arms, measured quality
    (n_pairs × n_arms), raw contexts (n_pairs × n_features) and the task multi-hot (n_pairs × n_tasks)."""

    pairs: pd.DataFrame
    arms: list[Arm]
    quality: np.ndarray
    raw: np.ndarray
    feature_names: list[str]
    tasks: list[str]
    task_hot: np.ndarray
    features: pd.DataFrame | None = None
    labels: pd.DataFrame | None = None

    @property
    def keys(self) -> list[str]:
        return [arm.key for arm in self.arms]

    def experts(self) -> list[str]:
        return list(dict.fromkeys([*self.pairs.a, *self.pairs.b]))

    @classmethod
    def from_arrays(cls, quality: np.ndarray, raw: np.ndarray, arms: Sequence[Arm] | None = None,
                    task_of_pair: Sequence[str] | None = None) -> ReplayData:
        """A replay problem from arrays (tests, teaching): pair i = experts (e{i}a, e{i}b) with one task each."""
        quality, raw = np.asarray(quality, float), np.asarray(raw, float)
        n, k = quality.shape
        arms = list(arms) if arms is not None else [Arm(f"op{j}", "default") for j in range(k)]
        task_of_pair = list(task_of_pair) if task_of_pair is not None else ["task"] * n
        tasks = list(dict.fromkeys(task_of_pair))
        pairs = pd.DataFrame({"a": [f"e{i}a" for i in range(n)], "b": [f"e{i}b" for i in range(n)],
                              "base_a": "base", "base_b": "base", "same_base": True,
                              "tasks": [(t,) for t in task_of_pair]})
        hot = np.array([[float(t == u) for u in tasks] for t in task_of_pair])
        return cls(pairs, arms, quality, raw, [f"x{j}" for j in range(raw.shape[1])], tasks, hot)


def replay_data(features: pd.DataFrame, labels: pd.DataFrame) -> ReplayData:
    """Build a :class:`ReplayData` from a features table (chapter 01) and a labels table (chapter 03).

    Quality per pair × arm = :func:`simmerge_lib.labels.merge_quality`; pairs where any arm's quality is NaN (no
    normalizer) are dropped, so every request has a full row of rewards and a well-defined oracle."""
    from .labels import merge_quality

    q = merge_quality(labels)
    if q.empty:
        raise ValueError("labels table: no parent-task rows to compute merge quality from")
    arm_rows = labels.drop_duplicates(["method", "setting"])
    arms = [Arm.from_json(r.method, r.setting, r.parameters) for r in arm_rows.itertuples(index=False)]
    q = q.assign(arm=q.method + "|" + q.setting)
    table = q.pivot_table(index=["a", "b"], columns="arm", values="quality", aggfunc="mean", sort=False)
    table = table.reindex(columns=[arm.key for arm in arms]).dropna(how="any")
    if table.empty:
        raise ValueError("labels table: no pair has a quality for every arm")
    info = q.drop_duplicates(["a", "b"]).set_index(["a", "b"]).loc[table.index]
    task_order = {t: i for i, t in enumerate(dict.fromkeys(labels.task))}
    pairs = pd.DataFrame({"a": info.index.get_level_values(0), "b": info.index.get_level_values(1),
                          "base_a": info.base_a.to_numpy(), "base_b": info.base_b.to_numpy(),
                          "same_base": info.same_base.astype(bool).to_numpy(),
                          "tasks": [tuple(sorted(s.split(","), key=task_order.get)) for s in info.tasks]})
    raw, names = pair_contexts(features, pairs)
    tasks = [t for t in task_order if any(t in ts for ts in pairs.tasks)]
    hot = np.array([[float(t in ts) for t in tasks] for ts in pairs.tasks])
    return ReplayData(pairs, arms, table.to_numpy(float), raw, names, tasks, hot, features, labels)


def synthetic_problem(n_pairs: int = 200, n_features: int = 6, n_arms: int = 4, noise: float = 0.02,
                      seed: int = 0) -> ReplayData:
    """A linear-reward replay problem: contexts u ~ N(0, I), quality_k = 0.6 + 0.15 u^T θ_k + noise, θ_k ~ N(0, I/d).
    The best arm varies with the context, so a contextual policy can beat every fixed arm."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(n_pairs, n_features))
    theta = rng.normal(size=(n_features, n_arms)) / np.sqrt(n_features)
    quality = 0.6 + 0.15 * raw @ theta + rng.normal(0, noise, size=(n_pairs, n_arms))
    return ReplayData.from_arrays(quality, raw)


SYNTHETIC_GRID: dict[str, list[dict[str, float]]] = {
    "linear": [{"weight": 0.3}, {"weight": 0.5}, {"weight": 0.7}], "slerp": [{"t": 0.5}],
    "task_arithmetic": [{"lambda": 1.0}], "ties": [{"density": 0.2}, {"density": 0.5}],
    "dare_ties": [{"density": 0.2}, {"density": 0.5}]}


def synthetic_tables(n_bases: int = 2, tasks: Sequence[str] = ("reverse", "sort", "max", "min"),
                     experts_per_task: int = 2, cross_base_pairs: int = 8, noise: float = 0.02,
                     seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A features table and a labels table (the columns of chapters 01 and 03) with a planted rule, for tests and
    the notebook when no measured tables exist.

    Each expert has a random task-vector direction u and size s. For a same-base pair, c = cos(u_a, u_b) and
    h = sign conflict; quality: linear (weight w) 0.55 + 0.35 c - 0.6 (w - w*)^2 with w* = 0.5 + 0.4 (s_a - s_b)
    / (s_a + s_b); slerp 0.6 + 0.3 c; task arithmetic 0.7 - 0.2 c; TIES (density d) 0.78 - 0.25 c - 0.3 h
    - 0.2 |d - 0.3|; DARE-TIES 0.72 + 0.6 (h - 0.4) - 0.2 |d - 0.2|. Cross-base pairs: everything scores about
    0.3. Features include c, h, the size ratio and noise."""
    rng = np.random.default_rng(seed)
    experts = [(f"base{b}-{t}{'' if i == 0 else i + 1}", f"base{b}", t)
               for b in range(n_bases) for i in range(experts_per_task) for t in tasks]
    u = {e: rng.normal(size=8) for e, _, _ in experts}
    size = {e: float(rng.uniform(0.5, 1.5)) for e, _, _ in experts}
    pairs = [(i, j) for i in range(len(experts)) for j in range(i + 1, len(experts))
             if experts[i][2] != experts[j][2]]
    same = [p for p in pairs if experts[p[0]][1] == experts[p[1]][1]]
    cross = [p for p in pairs if experts[p[0]][1] != experts[p[1]][1]]
    picked = sorted(rng.choice(len(cross), size=min(cross_base_pairs, len(cross)), replace=False)) if cross else []
    frows, lrows = [], []
    for i, j in same + [cross[k] for k in picked]:
        (a, ba, ta), (b, bb, tb) = experts[i], experts[j]
        sb = ba == bb
        c = float(u[a] @ u[b] / np.linalg.norm(u[a]) / np.linalg.norm(u[b])) if sb else 0.0
        h = float(np.clip(0.45 - 0.4 * c + rng.normal(0, 0.05), 0, 1)) if sb else 0.5
        w_star = 0.5 + 0.4 * (size[a] - size[b]) / (size[a] + size[b])
        parents = [t for t in tasks if t in (ta, tb)]
        for first, second in ((a, b), (b, a)):
            flip = first != a
            for t in parents:
                owns = (ta if first == a else tb) == t
                frows.append({"a": first, "b": second, "task": t, "same_base": int(sb), "task_of_a": float(owns),
                              "st_tv_cos": c,
                              "st_sign_conflict": h, "st_tv_norm_ratio": (size[b] / size[a]) if flip else
                              size[a] / size[b], "st_base_cos": 1.0 if sb else 0.1,
                              "fn_js_mean": 0.5 - 0.4 * c + rng.normal(0, 0.03),
                              "fn_cka_mean": 0.6 + 0.3 * c + rng.normal(0, 0.05),
                              "fn_top1_agree": float(rng.uniform(0.3, 0.9))})
        for method, settings in SYNTHETIC_GRID.items():
            for setting in settings:
                if not sb:
                    q = 0.3 + 0.05 * (method == "linear")
                elif method == "linear":
                    q = 0.55 + 0.35 * c - 0.6 * (setting["weight"] - w_star) ** 2
                elif method == "slerp":
                    q = 0.6 + 0.3 * c
                elif method == "task_arithmetic":
                    q = 0.7 - 0.2 * c
                elif method == "ties":
                    q = 0.78 - 0.25 * c - 0.3 * h - 0.2 * abs(setting["density"] - 0.3)
                else:
                    q = 0.72 + 0.6 * (h - 0.4) - 0.2 * abs(setting["density"] - 0.2)
                label = ",".join(f"{k}={v:g}" for k, v in sorted(setting.items()))
                for t in tasks:
                    parent = t in parents
                    lrows.append({"job_key": f"{a}|{b}|{method}|{label}", "a": a, "b": b, "base_a": ba,
                                  "base_b": bb, "same_base": sb, "method": method, "setting": label,
                                  "parameters": json.dumps(setting, sort_keys=True), "task": t,
                                  "parent_task": parent, "score": np.nan, "seed": 0, "n_eval": 0, "seconds": 0.0,
                                  "norm_score": float(q + rng.normal(0, noise)) if parent else 0.1,
                                  "norm_even": np.nan, "norm_odd": np.nan, "char_score": np.nan,
                                  "versions": "{}", "recipe": ""})
    return pd.DataFrame(frows), pd.DataFrame(lrows)


# ============================================================================================== scenario and stream
@dataclass(frozen=True)
class Event:
    """Something that happens at request ``time``: new arms (``kind="operator"``) or new pairs (``"task"``,
    ``"experts"``)."""

    kind: str
    time: int
    label: str
    arms: tuple[int, ...] = ()
    pairs: tuple[int, ...] = ()


@dataclass(frozen=True)
class Scenario:
    """A stream of ``horizon`` requests; ``history`` = pairs measured before the stream (for the best fixed arm,
    the offline predictor and optional warm starts; never requested in the stream)."""

    horizon: int
    history: tuple[int, ...] = ()
    events: tuple[Event, ...] = ()
    window: int = 50
    new_share: float = 0.5

    def enter_time(self, n_pairs: int) -> np.ndarray:
        """When each pair may first be requested (the latest of the pair events that hold it; 0 otherwise)."""
        out = np.zeros(n_pairs, dtype=int)
        for ev in self.events:
            if ev.pairs:
                idx = np.asarray(ev.pairs)
                out[idx] = np.maximum(out[idx], ev.time)
        return out

    def arm_time(self, n_arms: int) -> np.ndarray:
        out = np.zeros(n_arms, dtype=int)
        for ev in self.events:
            if ev.arms:
                out[np.asarray(ev.arms)] = ev.time
        return out


def make_scenario(data: ReplayData, horizon: int = 600, new_operator: str | None = "auto",
                  new_task: str | None = "auto", new_experts: int | Sequence[str] | None = 2,
                  times: Sequence[int] | None = None, history_share: float = 0.3, window: int = 50,
                  new_share: float = 0.5, seed: int = 0) -> Scenario:
    """Events at ``times`` (default horizon × 1/4, 2/4, 3/4, in the order operator, task, experts; a ``None``
    event is skipped).

    * ``new_operator``: an operator name, or ``"auto"`` = the operator whose absence costs the oracle most,
      mean_pairs(max_k q - max_{k not of m} q) (chosen in hindsight on purpose, so that its arrival matters; ties:
      the operator that is the oracle's choice on most pairs); its arms are unavailable before the event.
    * ``new_task``: a task, or ``"auto"`` = the last task of the table; pairs with one of its experts enter at the
      event.
    * ``new_experts``: a count (drawn with ``seed`` among the experts of the other tasks) or names; their pairs
      enter at the event.

    ``history``: a ``history_share`` of the pairs present from the start (seeded draw, at least 2)."""
    rng = np.random.default_rng(seed)
    methods = list(dict.fromkeys(arm.method for arm in data.arms))
    if new_operator == "auto":
        if len(methods) < 2:
            new_operator = None
        else:
            new_operator = max(methods, key=lambda m: _operator_value(data, m))
    if new_operator is not None and new_operator not in methods:
        raise ValueError(f"make_scenario: operator {new_operator!r} not among the arms' operators {methods}")
    if new_task == "auto":
        new_task = data.tasks[-1] if len(data.tasks) >= 3 else None
    if new_task is not None and new_task not in data.tasks:
        raise ValueError(f"make_scenario: task {new_task!r} not among the pairs' tasks {data.tasks}")
    expert_tasks = _expert_tasks(data)
    if isinstance(new_experts, int):
        pool = [e for e, ts in expert_tasks.items() if new_task not in ts]
        count = min(new_experts, max(len(pool) - 2, 0))
        new_experts = sorted(rng.choice(pool, size=count, replace=False).tolist()) if count else None
    elif new_experts is not None:
        unknown = sorted(set(new_experts) - set(expert_tasks))
        if unknown:
            raise ValueError(f"make_scenario: expert(s) {unknown} not in the pairs")
        new_experts = list(new_experts)
    times = list(times) if times is not None else [horizon // 4, horizon // 2, 3 * horizon // 4]
    events = []
    if new_operator is not None:
        arms = tuple(k for k, arm in enumerate(data.arms) if arm.method == new_operator)
        events.append(Event("operator", int(times[0]), f"new operator {new_operator}", arms=arms))
    if new_task is not None:
        pairs = tuple(int(i) for i in np.flatnonzero([new_task in ts for ts in data.pairs.tasks]))
        events.append(Event("task", int(times[1]), f"new task {new_task}", pairs=pairs))
    if new_experts:
        hit = data.pairs.a.isin(new_experts) | data.pairs.b.isin(new_experts)
        pairs = tuple(int(i) for i in np.flatnonzero(hit.to_numpy()))
        events.append(Event("experts", int(times[2]), f"new experts {', '.join(new_experts)}", pairs=pairs))
    draft = Scenario(horizon, (), tuple(events), window, new_share)
    start = np.flatnonzero(draft.enter_time(len(data.pairs)) == 0)
    if len(start) < 3:
        raise ValueError(f"make_scenario: only {len(start)} pair(s) available before the events; "
                         "choose fewer new experts or no new task")
    n_hist = min(max(2, int(round(history_share * len(start)))), len(start) - 1)
    history = tuple(sorted(int(i) for i in rng.choice(start, size=n_hist, replace=False)))
    return Scenario(horizon, history, tuple(events), window, new_share)


def scenario_for(data: ReplayData, horizon: int = DEFAULT_HORIZON, new_operator: str | None = "auto",
                 window: int = 50, seed: int = 0, new_share: float = 0.5) -> Scenario:
    """:func:`make_scenario` with every event the table allows: a small catalogue may not keep enough pairs at the
    start for a new task and two new experts, so the experts' event, then the task's, are dropped until it fits."""
    error: ValueError | None = None
    for new_task, new_experts in (("auto", 2), ("auto", 1), ("auto", None), (None, None)):
        try:
            return make_scenario(data, horizon, new_operator=new_operator, new_task=new_task,
                                 new_experts=new_experts, window=window, new_share=new_share, seed=seed)
        except ValueError as exc:
            if "not among" in str(exc):
                raise
            error = exc
    assert error is not None
    raise error


def _operator_value(data: ReplayData, method: str) -> tuple[float, int]:
    """(mean loss of the oracle without ``method``'s arms, number of pairs where it is the oracle's choice)."""
    own = np.array([arm.method == method for arm in data.arms])
    loss = float((data.quality.max(axis=1) - data.quality[:, ~own].max(axis=1)).mean()) if (~own).any() else 0.0
    wins = int(sum(data.arms[k].method == method for k in data.quality.argmax(axis=1)))
    return round(loss, 9), wins


def _expert_tasks(data: ReplayData) -> dict[str, set[str]]:
    """Each expert's task(s), read off the pairs' parent tasks (a task shared by all its pairs)."""
    out: dict[str, set[str]] = {}
    for a, b, ts in zip(data.pairs.a, data.pairs.b, data.pairs.tasks, strict=True):
        for e in (a, b):
            out[e] = out[e] & set(ts) if e in out else set(ts)
    return out


def make_stream(data: ReplayData, scenario: Scenario, seed: int) -> np.ndarray:
    """The requested pair at each step: uniform over the pairs present (history excluded); for ``window`` steps after a
    pair event, a share ``new_share`` of the requests comes from that event's pairs."""
    rng = np.random.default_rng([seed, 1])
    enter = scenario.enter_time(len(data.pairs))
    history = np.zeros(len(data.pairs), bool)
    history[list(scenario.history)] = True
    stream = np.empty(scenario.horizon, dtype=int)
    pair_events = [ev for ev in scenario.events if ev.pairs]
    for t in range(scenario.horizon):
        pool = np.flatnonzero((enter <= t) & ~history)
        recent = [ev for ev in pair_events if ev.time <= t < ev.time + scenario.window]
        if recent and rng.random() < scenario.new_share:
            new = np.asarray(recent[-1].pairs)
            new = new[(enter[new] <= t) & ~history[new]]
            pool = new if len(new) else pool
        stream[t] = pool[rng.integers(len(pool))]
    return stream


# ============================================================================================== policies
def _argmax(values: np.ndarray, rng: np.random.Generator) -> int:
    """Index of the maximum, ties broken at random (many arms start with equal scores)."""
    values = np.asarray(values, float)
    best = np.flatnonzero(values >= np.nanmax(values) - 1e-12)
    return int(best[rng.integers(len(best))]) if len(best) > 1 else int(best[0])


class Policy:
    """A policy picks one of the available arms for a context and learns from the reward.

    ``select(x, arms, pair)`` returns the chosen :class:`Arm`; ``update(arm, x, reward)`` learns; ``add_arm(arm)``
    makes an arm known (called when it appears; also done lazily by ``select``)."""

    name = "policy"
    learns = False
    #: The learners model r - offset, so an arm they know nothing about is expected at ``offset`` (set it to the
    #: pre-stream mean quality): with offset 0 an unseen arm would look worse than any arm already seen, and a
    #: small exploration bonus would never try it.
    offset = 0.0

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng([seed, 2])
        self.known: dict[str, Arm] = {}

    def add_arm(self, arm: Arm) -> None:
        self.known.setdefault(arm.key, arm)

    def select(self, x: np.ndarray, arms: Sequence[Arm], pair: int = -1) -> Arm:
        for arm in arms:
            if arm.key not in self.known:
                self.add_arm(arm)
        return arms[_argmax(self.scores(x, arms, pair), self.rng)]

    def scores(self, x: np.ndarray, arms: Sequence[Arm], pair: int) -> np.ndarray:
        raise NotImplementedError

    def update(self, arm: Arm, x: np.ndarray, reward: float) -> None:
        """Learn from one observation (baselines ignore it)."""


class RandomPolicy(Policy):
    """Uniform over the available arms."""

    name = "random"

    def scores(self, x: np.ndarray, arms: Sequence[Arm], pair: int) -> np.ndarray:
        return np.zeros(len(arms))


class FixedPolicy(Policy):
    """Always the same arm (random among the available ones if it is not available)."""

    name = "best_fixed"

    def __init__(self, key: str, seed: int = 0) -> None:
        super().__init__(seed)
        self.key = key

    def scores(self, x: np.ndarray, arms: Sequence[Arm], pair: int) -> np.ndarray:
        return np.array([float(arm.key == self.key) for arm in arms])


class TablePolicy(Policy):
    """Greedy on a fixed score table (n_pairs × arms, NaN = cannot score): an offline predictor, frozen."""

    name = "predictor"

    def __init__(self, table: pd.DataFrame, seed: int = 0) -> None:
        super().__init__(seed)
        self.table = table  # index: pair index, columns: arm keys

    def scores(self, x: np.ndarray, arms: Sequence[Arm], pair: int) -> np.ndarray:
        row = self.table.loc[pair] if pair in self.table.index else pd.Series(dtype=float)
        values = np.array([row.get(arm.key, np.nan) for arm in arms], float)
        return np.where(np.isnan(values), -np.inf, values) if np.isfinite(values).any() else np.zeros(len(arms))


class _Ridge:
    """One ridge model: A = λI + sum x x^T, b = sum r x; A^{-1} kept by Sherman-Morrison updates."""

    def __init__(self, dim: int, lam: float) -> None:
        self.A = lam * np.eye(dim)
        self.b = np.zeros(dim)
        self.A_inv = np.eye(dim) / lam
        self.n = 0

    def update(self, x: np.ndarray, reward: float) -> None:
        self.A += np.outer(x, x)
        self.b += reward * x
        ax = self.A_inv @ x
        self.A_inv -= np.outer(ax, ax) / (1.0 + x @ ax)
        self.n += 1

    @property
    def theta(self) -> np.ndarray:
        return self.A_inv @ self.b


class LinUCB(Policy):
    """Disjoint LinUCB (Li et al. 2010, Alg. 1): score_k = θ_k^T x + α sqrt(x^T A_k^{-1} x), θ_k = A_k^{-1} b_k."""

    name = "linucb"
    learns = True

    def __init__(self, dim: int, alpha: float = 0.1, lam: float = 1.0, seed: int = 0, offset: float = 0.0) -> None:
        super().__init__(seed)
        self.dim, self.alpha, self.lam, self.offset = dim, alpha, lam, offset
        self.models: dict[str, _Ridge] = {}

    def add_arm(self, arm: Arm) -> None:
        super().add_arm(arm)
        self.models.setdefault(arm.key, _Ridge(self.dim, self.lam))

    def scores(self, x: np.ndarray, arms: Sequence[Arm], pair: int) -> np.ndarray:
        out = np.empty(len(arms))
        for i, arm in enumerate(arms):
            m = self.models[arm.key]
            out[i] = m.theta @ x + self.alpha * np.sqrt(max(x @ m.A_inv @ x, 0.0))
        return out

    def update(self, arm: Arm, x: np.ndarray, reward: float) -> None:
        if arm.key not in self.models:
            self.add_arm(arm)
        self.models[arm.key].update(x, reward - self.offset)


class LinearThompson(LinUCB):
    """Linear Thompson sampling (Agrawal & Goyal 2013), one model per arm: θ̃_k ~ N(A_k^{-1} b_k, v² A_k^{-1})."""

    name = "thompson"

    def __init__(self, dim: int, v: float = 0.05, lam: float = 1.0, seed: int = 0, offset: float = 0.0) -> None:
        super().__init__(dim, 0.0, lam, seed, offset)
        self.v = v

    def scores(self, x: np.ndarray, arms: Sequence[Arm], pair: int) -> np.ndarray:
        out = np.empty(len(arms))
        for i, arm in enumerate(arms):
            m = self.models[arm.key]
            # x^T θ̃ with θ̃ ~ N(μ, v² A^{-1}) is N(x^T μ, v² x^T A^{-1} x): one normal draw per arm is exact.
            out[i] = m.theta @ x + self.v * np.sqrt(max(x @ m.A_inv @ x, 0.0)) * self.rng.standard_normal()
        return out


class HybridLinUCB(Policy):
    """Hybrid LinUCB (Li et al. 2010, Alg. 2) with shared features z = ``shared(x, arm)`` (module docstring)."""

    name = "hybrid"
    learns = True

    def __init__(self, dim: int, alpha: float = 0.1, lam: float = 1.0, seed: int = 0, offset: float = 0.0,
                 shared: Callable[[np.ndarray, Arm], np.ndarray] = shared_features) -> None:
        super().__init__(seed)
        self.dim, self.alpha, self.lam, self.offset, self.shared = dim, alpha, lam, offset, shared
        self.k = len(shared(np.ones(dim), Arm("linear", "default")))
        self.A0 = lam * np.eye(self.k)
        self.b0 = np.zeros(self.k)
        self.A: dict[str, np.ndarray] = {}
        self.A_inv: dict[str, np.ndarray] = {}
        self.B: dict[str, np.ndarray] = {}
        self.b: dict[str, np.ndarray] = {}
        self._A0_inv: np.ndarray | None = None

    def add_arm(self, arm: Arm) -> None:
        super().add_arm(arm)
        if arm.key not in self.A:
            self.A[arm.key] = self.lam * np.eye(self.dim)
            self.A_inv[arm.key] = np.eye(self.dim) / self.lam
            self.B[arm.key] = np.zeros((self.dim, self.k))
            self.b[arm.key] = np.zeros(self.dim)

    @property
    def A0_inv(self) -> np.ndarray:
        if self._A0_inv is None:
            self._A0_inv = np.linalg.inv(self.A0)
        return self._A0_inv

    def scores(self, x: np.ndarray, arms: Sequence[Arm], pair: int) -> np.ndarray:
        A0_inv = self.A0_inv
        beta = A0_inv @ self.b0
        out = np.empty(len(arms))
        for i, arm in enumerate(arms):
            key = arm.key
            z = self.shared(x, arm)
            A_inv, B = self.A_inv[key], self.B[key]
            theta = A_inv @ (self.b[key] - B @ beta)
            Ax = A_inv @ x
            BtAx = B.T @ Ax
            A0z = A0_inv @ z
            s = z @ A0z - 2 * A0z @ BtAx + x @ Ax + BtAx @ A0_inv @ BtAx
            out[i] = z @ beta + x @ theta + self.alpha * np.sqrt(max(s, 0.0))
        return out

    def update(self, arm: Arm, x: np.ndarray, reward: float) -> None:
        key = arm.key
        if key not in self.A:
            self.add_arm(arm)
        z = self.shared(x, arm)
        reward = reward - self.offset
        B, A_inv = self.B[key], self.A_inv[key]
        self.A0 += B.T @ A_inv @ B
        self.b0 += B.T @ A_inv @ self.b[key]
        self.A[key] += np.outer(x, x)
        ax = A_inv @ x
        A_inv = A_inv - np.outer(ax, ax) / (1.0 + x @ ax)
        self.A_inv[key] = A_inv
        self.B[key] = B = B + np.outer(x, z)
        self.b[key] = self.b[key] + reward * x
        self.A0 += np.outer(z, z) - B.T @ A_inv @ B
        self.b0 += reward * z - B.T @ A_inv @ self.b[key]
        self._A0_inv = None


# ============================================================================================== baselines' inputs
def best_fixed_arm(data: ReplayData, pairs: Sequence[int], arms: Sequence[int] | None = None) -> Arm:
    """The arm with the best mean quality over ``pairs`` (among ``arms``; default all)."""
    arms = list(arms) if arms is not None else list(range(len(data.arms)))
    if not len(pairs):
        raise ValueError("best_fixed_arm: no pre-stream pairs to choose from")
    means = data.quality[np.asarray(pairs)][:, arms].mean(axis=0)
    return data.arms[arms[int(np.argmax(means))]]


def predictor_scores(data: ReplayData, pairs: Sequence[int], arms: Sequence[int] | None = None,
                     family: str = "forest", seed: int = 0) -> pd.DataFrame | None:
    """Chapter 04's offline predictor trained on ``pairs`` × ``arms`` only, scoring every pair: a DataFrame
    (index: pair index, columns: arm keys; arms it never saw are absent). None when the predictor module or the
    raw tables are unavailable, or it cannot be fitted (e.g. too few pairs)."""
    if data.features is None or data.labels is None:
        return None
    try:
        from .predictor import fit_predictor, owner_rows, training_table
    except ImportError:
        return None
    arms = list(arms) if arms is not None else list(range(len(data.arms)))
    train_pairs = {pair_key(a, b) for a, b in zip(data.pairs.a.iloc[list(pairs)], data.pairs.b.iloc[list(pairs)],
                                                  strict=True)}
    keys = {data.arms[k].key for k in arms}
    lab = data.labels
    lab = lab[(lab.a + "|" + lab.b).isin(train_pairs) & (lab.method + "|" + lab.setting).isin(keys)]
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


# ============================================================================================== replay
@dataclass
class ReplaySetup:
    """What every policy of one replay shares: encoded contexts, the scenario, the baselines' inputs."""

    data: ReplayData
    scenario: Scenario
    X: np.ndarray
    best_fixed: Arm
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
    """A fresh policy by name (:data:`POLICIES`); ``params`` go to its constructor (alpha, v, lam, ...)."""
    dim = setup.X.shape[1]
    if name in ("linucb", "hybrid", "thompson"):
        params = {"offset": setup.offset, **params}
    if name == "linucb":
        return LinUCB(dim, seed=seed, **params)
    if name == "hybrid":
        return HybridLinUCB(dim, seed=seed, **params)
    if name == "thompson":
        return LinearThompson(dim, seed=seed, **params)
    if name == "random":
        return RandomPolicy(seed)
    if name == "best_fixed":
        return FixedPolicy(setup.best_fixed.key, seed)
    if name == "predictor":
        if setup.predictor is None:
            raise ValueError("no offline predictor in this replay setup (prepare_replay(predictor=True) needs the "
                             "features and labels tables and simmerge_lib.predictor)")
        return TablePolicy(setup.predictor, seed)
    raise ValueError(f"unknown policy {name!r}; expected one of {list(POLICIES)}")


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
        from tqdm.auto import tqdm

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


# ============================================================================================== live mode
class LiveEnvironment:
    """Runs the real merge and evaluation of an arm for a pair (in memory, :func:`simmerge_lib.labels.run_job`).

    Reward = mean over the pair's parent tasks t of score(t) / ref(t), ref(t) = the best parent expert's own score
    on t, evaluated with the same n (as in the labels table); where ref(t) = 0 the raw score is used. Results are
    cached per (pair, arm), so an oracle computed over all arms costs each merge once."""

    def __init__(self, catalogue: Any, n_eval: int = 16, seed: int = 0, device: str = "cpu") -> None:
        from .catalogue import Catalogue

        self.catalogue = catalogue if isinstance(catalogue, Catalogue) else Catalogue.load(catalogue)
        self.n_eval, self.seed, self.device = n_eval, seed, device
        self.root = str(self.catalogue.root.resolve())
        self.cache: dict[tuple[str, str, str], float] = {}
        self.refs: dict[tuple[str, str], float] = {}
        self.merges = 0

    def parent_tasks(self, a: str, b: str) -> tuple[str, ...]:
        wanted = set(self.catalogue.entry(a).tasks) | set(self.catalogue.entry(b).tasks)
        return tuple(t for t in self.catalogue.tasks if t in wanted)

    def _ref(self, expert: str, task: str) -> float:
        from .labels import Job, run_job

        if (expert, task) not in self.refs:
            entry = self.catalogue.entry(expert)
            # the expert itself, scored on its own task(s) by the labels' job function ("expert" = no merge)
            job = Job(f"ref:{expert}", expert, expert, entry.base or "", entry.base or "", "expert", "", {},
                      {"merge_method": "expert", "models": [{"model": expert}]}, tuple(entry.tasks),
                      tuple(entry.tasks), 0, self.n_eval, self.catalogue.evaluator)
            for t, s in run_job(self.root, job, self.device)["scores"].items():
                self.refs[(expert, t)] = s
        return self.refs[(expert, task)]

    def quality(self, a: str, b: str, arm: Arm) -> float:
        """The measured merge quality of ``arm`` on (a, b) (cached)."""
        from .labels import make_job, run_job

        key = (a, b, arm.key)
        if key not in self.cache:
            tasks = self.parent_tasks(a, b)
            job = make_job(self.catalogue, a, b, arm.method, dict(arm.parameters), self.seed, self.n_eval, tasks)
            scores = run_job(self.root, job, self.device)["scores"]
            self.merges += 1
            values = []
            for t in tasks:
                refs = [self._ref(e, t) for e in (a, b) if t in self.catalogue.entry(e).tasks]
                ref = max(refs)
                values.append(scores[t] / ref if ref > 0 else scores[t])
            self.cache[key] = float(np.mean(values))
        return self.cache[key]


def live_contexts(catalogue: Any, pairs: Sequence[tuple[str, str]], n_probes: int = 8, n_components: int = 4
                  ) -> tuple[np.ndarray, list[str]]:
    """Encoded contexts of ``pairs`` of a catalogue: their features (chapter 01, computed now from ``n_probes``
    probes per task, no disk cache), averaged over parent tasks, encoded by a :class:`ContextEncoder` fitted on
    these pairs (label-free). Returns (contexts, task names of the multi-hot)."""
    from .catalogue import Catalogue
    from .features import ProbeCache, compute_features

    catalogue = catalogue if isinstance(catalogue, Catalogue) else Catalogue.load(catalogue)
    unique = list(dict.fromkeys((a, b) for a, b in pairs))
    feats = compute_features(catalogue, n_probes=n_probes, pairs=unique, progress=False,
                             cache=ProbeCache(disk_dir=None))
    frame = pd.DataFrame({"a": [a for a, _ in unique], "b": [b for _, b in unique]})
    frame["tasks"] = [tuple(t for t in catalogue.tasks if t in set(catalogue.entry(a).tasks) |
                            set(catalogue.entry(b).tasks)) for a, b in unique]
    raw, _ = pair_contexts(feats, frame)
    hot = np.array([[float(t in ts) for t in catalogue.tasks] for ts in frame.tasks])
    X = ContextEncoder(n_components).fit(raw).transform(raw, hot)
    index = {p: i for i, p in enumerate(unique)}
    return X[[index[p] for p in pairs]], list(catalogue.tasks)


def run_live(policy: Policy, env: LiveEnvironment, requests: Sequence[tuple[str, str]], contexts: np.ndarray,
             arms: Sequence[Arm], new_arms: Mapping[int, Sequence[Arm]] | None = None, oracle: bool = False,
             progress: bool = False) -> pd.DataFrame:
    """Serve ``requests`` (pairs) live: choose an arm, run its merge and evaluation, learn from the quality.

    ``new_arms[t]`` arms appear before request t. ``oracle=True`` also measures every available arm (cached) to
    report regret. Returns one row per request: t, a, b, arm, reward, seconds (+ oracle, regret)."""
    import time

    available = list(arms)
    for arm in available:
        policy.add_arm(arm)
    rows = []
    stream: Any = requests
    if progress:
        from tqdm.auto import tqdm

        stream = tqdm(requests, desc="live")
    for t, (a, b) in enumerate(stream):
        for arm in (new_arms or {}).get(t, ()):
            policy.add_arm(arm)
            available.append(arm)
        x = contexts[t]
        start = time.perf_counter()
        arm = policy.select(x, available)
        reward = env.quality(a, b, arm)
        policy.update(arm, x, reward)
        row = {"t": t, "a": a, "b": b, "arm": arm.key, "reward": reward, "seconds": time.perf_counter() - start}
        if oracle:
            row["oracle"] = max(env.quality(a, b, other) for other in available)
            row["regret"] = row["oracle"] - reward
        rows.append(row)
    return pd.DataFrame(rows)


# ============================================================================================== the command
def bandit_tables(profile: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The features and labels tables of a profile: build/features/<profile>.parquet, build/labels/<profile>.parquet.

    When the profile's catalogue exists, only the labels of its current jobs are kept (a table may still hold rows
    of an older catalogue or label format, which chapter 03 leaves in place)."""
    from .features import features_path
    from .labels import PROFILES, labels_path, load_labels

    fpath = features_path(profile)
    if not fpath.is_file():
        raise FileNotFoundError(f"{fpath}: no features table (run chapter 01 or `simmerge features`)")
    labels = load_labels(labels_path(profile))
    if profile in PROFILES:
        labels = current_labels(labels, profile)
    return pd.read_parquet(fpath), labels


def current_labels(labels: pd.DataFrame, profile: str) -> pd.DataFrame:
    """The rows of ``labels`` whose job keys the profile's catalogue and settings make now (all rows when the
    catalogue is not built)."""
    from .catalogue import Catalogue
    from .labels import make_jobs, profile_settings
    from .zoo import catalogue_dir

    folder = catalogue_dir(profile)
    if not (folder / "catalogue.json").is_file():
        return labels
    keys = {j.key for j in make_jobs(Catalogue.load(folder), **profile_settings(profile))}
    return labels[labels.job_key.isin(keys)].reset_index(drop=True)


def registry_labels_path(profile: str) -> Any:
    """Where chapter 06 keeps the labels of operators outside chapter 03's grid: build/bandit/<profile>-registry."""
    from .paths import build_path

    return build_path("bandit", f"{profile}-registry.parquet")


def registry_labels(catalogue: Any, labels: pd.DataFrame, methods: Sequence[str], out: Any = None,
                    settings: int = 1, workers: int | None = None, progress: bool = False) -> pd.DataFrame:
    """Labels of operators the label grid does not hold (e.g. ones added to the operator registry later), on every
    pair of ``labels``, with the same evaluation (n_eval, seed, the parents' tasks): the first ``settings`` of each
    operator's default grid (:func:`simmerge_lib.operators.default_grid`). Collected by chapter 03's
    :func:`~simmerge_lib.labels.collect_labels` into ``out`` (resumable; default :func:`registry_labels_path` of
    the catalogue's name), so a rerun merges nothing."""
    from .labels import collect_labels, make_jobs
    from .operators import default_grid

    grid = {m: default_grid([m])[m][:settings] for m in methods}
    pairs = list(labels.drop_duplicates(["a", "b"])[["a", "b"]].itertuples(index=False, name=None))
    jobs = make_jobs(catalogue, grid, pairs=pairs, n_eval=int(labels.n_eval.iloc[0]), seed=int(labels.seed.iloc[0]),
                     tasks="parents")
    out = out if out is not None else registry_labels_path(catalogue.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    return collect_labels(catalogue, jobs, out, workers=workers, progress=progress)


def stream_tables(profile: str, new_operator: str | None = NEW_OPERATOR, progress: bool = False
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`bandit_tables` plus, when chapter 03's grid does not hold ``new_operator`` (a registry operator, e.g.
    :data:`NEW_OPERATOR`), its labels on every pair of the table (:func:`registry_labels`: collected once into
    build/bandit/<profile>-registry.parquet, read back on a rerun). ``None`` or ``"auto"`` adds nothing."""
    features, labels = bandit_tables(profile)
    if new_operator in (None, "auto") or new_operator in set(labels.method):
        return features, labels
    from .catalogue import Catalogue
    from .zoo import catalogue_dir

    folder = catalogue_dir(profile)
    if not (folder / "catalogue.json").is_file():
        raise FileNotFoundError(f"{folder}: no catalogue to merge {new_operator!r} on (run chapter 00)")
    extra = registry_labels(Catalogue.load(folder), labels, [new_operator], out=registry_labels_path(profile),
                            progress=progress)
    return features, pd.concat([labels, extra], ignore_index=True)


def _cmd_bandit(args: argparse.Namespace) -> int:
    features, labels = bandit_tables(args.profile)
    data = replay_data(features, labels)
    scenario = scenario_for(data, horizon=args.horizon, seed=args.split_seed)
    setup = prepare_replay(data, scenario)
    runs = replay_many(setup, seeds=range(args.seeds), noise=args.noise)
    print(json.dumps(summarize_runs(runs, scenario)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bandit", help="replay a profile's labels through contextual bandits (regret summary)")
    p.add_argument("--profile", default="default", help="tables build/{features,labels}/<profile>.parquet")
    p.add_argument("--horizon", type=int, default=DEFAULT_HORIZON, help="requests in the stream")
    p.add_argument("--seeds", type=int, default=10, help="streams replayed per policy")
    p.add_argument("--noise", type=float, default=0.0, help="std of noise added to observed rewards")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the history pairs and new experts")
    p.set_defaults(func=_cmd_bandit)
