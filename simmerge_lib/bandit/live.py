"""Live mode: the chosen arm's merge is run and evaluated for real (chapter 03's job function), contexts are
computed from the catalogue now."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..catalogue import Catalogue
from ..features import ProbeCache, compute_features
from ..labels import Job, make_job, run_job
from ..operators import Candidate
from .arms import ContextEncoder, pair_contexts
from .policies import Policy


class LiveEnvironment:
    """Runs the real merge and evaluation of an arm for a pair (in memory, :func:`simmerge_lib.labels.run_job`).

    Reward = mean over the pair's parent tasks t of score(t) / ref(t), ref(t) = the best parent expert's own score
    on t, evaluated with the same n (as in the labels table); where ref(t) = 0 the raw score is used. Results are
    cached per (pair, arm), so an oracle computed over all arms costs each merge once."""

    def __init__(self, catalogue: Any, n_eval: int = 16, seed: int = 0, device: str = "cpu") -> None:
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
        if (expert, task) not in self.refs:
            entry = self.catalogue.entry(expert)
            # the expert itself, scored on its own task(s) by the labels' job function ("expert" = no merge)
            job = Job(f"ref:{expert}", expert, expert, entry.base or "", entry.base or "", "expert", "", {},
                      {"merge_method": "expert", "models": [{"model": expert}]}, tuple(entry.tasks),
                      tuple(entry.tasks), 0, self.n_eval, self.catalogue.evaluator)
            for t, s in run_job(self.root, job, self.device)["scores"].items():
                self.refs[(expert, t)] = s
        return self.refs[(expert, task)]

    def quality(self, a: str, b: str, arm: Candidate) -> float:
        """The measured merge quality of ``arm`` on (a, b) (cached)."""
        key = (a, b, arm.key)
        if key not in self.cache:
            tasks = self.parent_tasks(a, b)
            job = make_job(self.catalogue, a, b, arm.method, arm.setting, self.seed, self.n_eval, tasks)
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
             arms: Sequence[Candidate], new_arms: Mapping[int, Sequence[Candidate]] | None = None, oracle: bool = False,
             progress: bool = False) -> pd.DataFrame:
    """Serve ``requests`` (pairs) live: choose an arm, run its merge and evaluation, learn from the quality.

    ``new_arms[t]`` arms appear before request t. ``oracle=True`` also measures every available arm (cached) to
    report regret. Returns one row per request: t, a, b, arm, reward, seconds (+ oracle, regret)."""
    available = list(arms)
    for arm in available:
        policy.add_arm(arm)
    rows = []
    stream: Any = requests
    if progress:
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
