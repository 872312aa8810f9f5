"""Arms and contexts: an arm is a :class:`~simmerge_lib.operators.Candidate` (operator × setting) whose
descriptor (traits, setting) is a function of it; a context is a pair's encoded features; :class:`ReplayData`
holds a replayable table of both."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..labels import merge_quality
from ..operators import OPERATORS, Candidate, candidate_key, get_operator
from ..predictor import feature_columns


#: Operator traits the hybrid model shares across arms (a new operator borrows from operators with common traits)
#: come from the operator registry (``operators.get_operator(name).traits``): registering an operator gives it
#: its traits here too. An arm whose operator is not registered has none.
TRAIT_NAMES = ("interpolate", "spherical", "task_vector", "trim", "drop", "sign_elect")


#: Setting parameters as descriptor columns: value minus the neutral value (weight 0.5, t 0.5, lambda 1,
#: density 1 = keep everything), so a setting at its neutral value adds nothing.
PARAM_NEUTRAL = {"weight": 0.5, "t": 0.5, "lambda": 1.0, "density": 1.0}


DESCRIPTOR_NAMES = (*TRAIT_NAMES, *(f"p_{k}" for k in PARAM_NEUTRAL))


def Arm(method: str, setting: str = "default", parameters: Mapping[str, Any] | Sequence[tuple[str, float]] = ()
        ) -> Candidate:
    """An arm, which is a :class:`~simmerge_lib.operators.Candidate`: ``method`` at the setting given by its
    ``parameters`` ((name, value) pairs or a dict), or, without them, by its setting label (``"density=0.2"``,
    ``"default"``). Raises ValueError when the label does not name the parameters."""
    arm = Candidate.make(method, dict(parameters) if parameters else setting)
    if arm.setting_label != (setting or "default"):
        raise ValueError(f"arm {method}: setting label {setting!r} does not match its parameters {arm.setting}")
    return arm


def operator_traits(method: str) -> tuple[str, ...]:
    """The registered operator's traits (:data:`simmerge_lib.operators.TRAITS`); () for an unknown operator."""
    try:
        return get_operator(method).traits
    except ValueError:
        return ()


@functools.lru_cache(maxsize=4096)
def _descriptor(arm: Candidate) -> tuple[float, ...]:
    traits = operator_traits(arm.method)
    params = arm.setting
    values = [float(t in traits) for t in TRAIT_NAMES]
    values += [params.get(k, neutral) - neutral for k, neutral in PARAM_NEUTRAL.items()]
    return tuple(values)


def arm_descriptor(arm: Candidate) -> np.ndarray:
    """The arm's shared description: operator traits (:func:`operator_traits`, from the registry) and its
    setting's parameters minus their neutral values."""
    return np.asarray(_descriptor(arm), dtype=float)


def shared_features(x: np.ndarray, arm: Candidate, n_interact: int = 3) -> np.ndarray:
    """Hybrid LinUCB's z(x, arm) = [x, descriptor(arm) ⊗ x[:1 + n_interact]]: the pair's level (shared by all arms)
    and how each trait / parameter shifts quality, as a function of the first context components (x[0] = 1)."""
    return np.concatenate([x, np.outer(arm_descriptor(arm), x[:1 + n_interact]).ravel()])


def pair_contexts(features: pd.DataFrame, pairs: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Raw context of each pair: its feature rows averaged over its parent tasks ``tasks``.

    ``pairs`` has columns a, b, tasks (tuple of task names). Each task's row is read from the side of the expert
    that owns it (the row (owner, other, task), ``task_of_a == 1``, as chapter 04's predictor reads it), so the
    context is the same whichever expert the catalogue lists first. Tables without owner-oriented rows (no
    ``task_of_a``, or a row missing) fall back to the rows (a, b, t). Returns (n_pairs × n_features, names)."""
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


@dataclass
class ReplayData:
    """Everything a replay needs: pairs (a, b, base_a, base_b, same_base, tasks), arms, measured quality
    (n_pairs × n_arms), raw contexts (n_pairs × n_features) and the task multi-hot (n_pairs × n_tasks)."""

    pairs: pd.DataFrame
    arms: list[Candidate]
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
    def from_arrays(cls, quality: np.ndarray, raw: np.ndarray, arms: Sequence[Candidate] | None = None,
                    task_of_pair: Sequence[str] | None = None) -> ReplayData:
        """A replay problem from arrays (tests, teaching): pair i = experts (e{i}a, e{i}b) with one task each."""
        quality, raw = np.asarray(quality, float), np.asarray(raw, float)
        n, k = quality.shape
        arms = list(arms) if arms is not None else [Candidate.make(f"op{j}") for j in range(k)]
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
    q = merge_quality(labels)
    if q.empty:
        raise ValueError("labels table: no parent-task rows to compute merge quality from")
    # Arms in the registry's operator order, then by setting: the labels' row order follows the order in which
    # parallel jobs finished, and the oracle's argmax breaks ties between equal arms by position.
    arm_rows = labels.drop_duplicates(["method", "setting"])
    arms = sorted((Candidate.make(r.method, r.parameters) for r in arm_rows.itertuples(index=False)),
                  key=lambda c: (list(OPERATORS).index(c.method) if c.method in OPERATORS else len(OPERATORS), c.params))
    q = q.assign(arm=candidate_key(q.method, q.setting))
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
