"""Bandit policies (see the package docstring for the formulas) and their registry: :data:`POLICY_REGISTRY`
maps a name to a policy class, whose ``from_setup`` builds it for a replay."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..operators import Candidate
from .arms import shared_features


DEFAULT_ALPHA = 0.1


DEFAULT_COMPONENTS = 8


def _argmax(values: np.ndarray, rng: np.random.Generator) -> int:
    """Index of the maximum, ties broken at random (many arms start with equal scores)."""
    values = np.asarray(values, float)
    best = np.flatnonzero(values >= np.nanmax(values) - 1e-12)
    return int(best[rng.integers(len(best))]) if len(best) > 1 else int(best[0])


class Policy:
    """A policy picks one of the available arms for a context and learns from the reward.

    ``select(x, arms, pair)`` returns the chosen :class:`Candidate`; ``update(arm, x, reward)`` learns; ``add_arm(arm)``
    makes an arm known (called when it appears; also done lazily by ``select``)."""

    name = "policy"
    learns = False
    #: The learners model r - offset, so an arm they know nothing about is expected at ``offset`` (set it to the
    #: pre-stream mean quality): with offset 0 an unseen arm would look worse than any arm already seen, and a
    #: small exploration bonus would never try it.
    offset = 0.0

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng([seed, 2])
        self.known: dict[str, Candidate] = {}

    @classmethod
    def from_setup(cls, setup: Any, seed: int = 0, **params: Any) -> Policy:
        """A fresh policy for a replay ``setup`` (:class:`~simmerge_lib.bandit.replay.ReplaySetup`); ``params`` go
        to a learner's constructor (alpha, v, lam, ...), baselines take none."""
        return cls(seed)

    def add_arm(self, arm: Candidate) -> None:
        self.known.setdefault(arm.key, arm)

    def select(self, x: np.ndarray, arms: Sequence[Candidate], pair: int = -1) -> Candidate:
        for arm in arms:
            if arm.key not in self.known:
                self.add_arm(arm)
        return arms[_argmax(self.scores(x, arms, pair), self.rng)]

    def scores(self, x: np.ndarray, arms: Sequence[Candidate], pair: int) -> np.ndarray:
        raise NotImplementedError

    def update(self, arm: Candidate, x: np.ndarray, reward: float) -> None:
        """Learn from one observation (baselines ignore it)."""


class RandomPolicy(Policy):
    """Uniform over the available arms."""

    name = "random"

    def scores(self, x: np.ndarray, arms: Sequence[Candidate], pair: int) -> np.ndarray:
        return np.zeros(len(arms))


class FixedPolicy(Policy):
    """Always the same arm (random among the available ones if it is not available)."""

    name = "best_fixed"

    def __init__(self, key: str, seed: int = 0) -> None:
        super().__init__(seed)
        self.key = key

    @classmethod
    def from_setup(cls, setup: Any, seed: int = 0, **params: Any) -> Policy:
        return cls(setup.best_fixed.key, seed)

    def scores(self, x: np.ndarray, arms: Sequence[Candidate], pair: int) -> np.ndarray:
        return np.array([float(arm.key == self.key) for arm in arms])


class TablePolicy(Policy):
    """Greedy on a fixed score table (n_pairs × arms, NaN = cannot score): an offline predictor, frozen."""

    name = "predictor"

    def __init__(self, table: pd.DataFrame, seed: int = 0) -> None:
        super().__init__(seed)
        self.table = table  # index: pair index, columns: arm keys

    @classmethod
    def from_setup(cls, setup: Any, seed: int = 0, **params: Any) -> Policy:
        if setup.predictor is None:
            raise ValueError("no offline predictor in this replay setup (prepare_replay(predictor=True) needs the "
                             "features and labels tables and simmerge_lib.predictor)")
        return cls(setup.predictor, seed)

    def scores(self, x: np.ndarray, arms: Sequence[Candidate], pair: int) -> np.ndarray:
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


class Learner(Policy):
    """A policy that learns from the stream: built over the setup's contexts (``dim`` = their width), its reward
    offset the setup's pre-stream mean quality unless ``params`` give one."""

    learns = True

    @classmethod
    def from_setup(cls, setup: Any, seed: int = 0, **params: Any) -> Policy:
        return cls(setup.X.shape[1], seed=seed, **{"offset": setup.offset, **params})


class LinUCB(Learner):
    """Disjoint LinUCB (Li et al. 2010, Alg. 1): score_k = θ_k^T x + α sqrt(x^T A_k^{-1} x), θ_k = A_k^{-1} b_k."""

    name = "linucb"

    def __init__(self, dim: int, alpha: float = 0.1, lam: float = 1.0, seed: int = 0, offset: float = 0.0) -> None:
        super().__init__(seed)
        self.dim, self.alpha, self.lam, self.offset = dim, alpha, lam, offset
        self.models: dict[str, _Ridge] = {}

    def add_arm(self, arm: Candidate) -> None:
        super().add_arm(arm)
        self.models.setdefault(arm.key, _Ridge(self.dim, self.lam))

    def scores(self, x: np.ndarray, arms: Sequence[Candidate], pair: int) -> np.ndarray:
        out = np.empty(len(arms))
        for i, arm in enumerate(arms):
            m = self.models[arm.key]
            out[i] = m.theta @ x + self.alpha * np.sqrt(max(x @ m.A_inv @ x, 0.0))
        return out

    def update(self, arm: Candidate, x: np.ndarray, reward: float) -> None:
        if arm.key not in self.models:
            self.add_arm(arm)
        self.models[arm.key].update(x, reward - self.offset)


class LinearThompson(LinUCB):
    """Linear Thompson sampling (Agrawal & Goyal 2013), one model per arm: θ̃_k ~ N(A_k^{-1} b_k, v² A_k^{-1})."""

    name = "thompson"

    def __init__(self, dim: int, v: float = 0.05, lam: float = 1.0, seed: int = 0, offset: float = 0.0) -> None:
        super().__init__(dim, 0.0, lam, seed, offset)
        self.v = v

    def scores(self, x: np.ndarray, arms: Sequence[Candidate], pair: int) -> np.ndarray:
        out = np.empty(len(arms))
        for i, arm in enumerate(arms):
            m = self.models[arm.key]
            # x^T θ̃ with θ̃ ~ N(μ, v² A^{-1}) is N(x^T μ, v² x^T A^{-1} x): one normal draw per arm is exact.
            out[i] = m.theta @ x + self.v * np.sqrt(max(x @ m.A_inv @ x, 0.0)) * self.rng.standard_normal()
        return out


class HybridLinUCB(Learner):
    """Hybrid LinUCB (Li et al. 2010, Alg. 2) with shared features z = ``shared(x, arm)`` (module docstring)."""

    name = "hybrid"

    def __init__(self, dim: int, alpha: float = 0.1, lam: float = 1.0, seed: int = 0, offset: float = 0.0,
                 shared: Callable[[np.ndarray, Candidate], np.ndarray] = shared_features) -> None:
        super().__init__(seed)
        self.dim, self.alpha, self.lam, self.offset, self.shared = dim, alpha, lam, offset, shared
        self.k = len(shared(np.ones(dim), Candidate.make("linear")))
        self.A0 = lam * np.eye(self.k)
        self.b0 = np.zeros(self.k)
        self.A: dict[str, np.ndarray] = {}
        self.A_inv: dict[str, np.ndarray] = {}
        self.B: dict[str, np.ndarray] = {}
        self.b: dict[str, np.ndarray] = {}
        self._A0_inv: np.ndarray | None = None

    def add_arm(self, arm: Candidate) -> None:
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

    def scores(self, x: np.ndarray, arms: Sequence[Candidate], pair: int) -> np.ndarray:
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

    def update(self, arm: Candidate, x: np.ndarray, reward: float) -> None:
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


#: The policies by name, in the order a replay runs them: ``make_policy`` reads this table, so registering a policy
#: class here (with its ``name`` and ``from_setup``) is all it takes to replay it.
POLICY_REGISTRY: dict[str, type[Policy]] = {cls.name: cls for cls in (LinUCB, HybridLinUCB, LinearThompson,
                                                                       TablePolicy, FixedPolicy, RandomPolicy)}
POLICIES = tuple(POLICY_REGISTRY)
