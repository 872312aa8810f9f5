"""Scenarios and streams: events (a new operator's arms, a new task's pairs, new experts' pairs) at given times,
the pre-stream history, and the seeded stream of requested pairs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .arms import ReplayData


#: The chapter's stream: requests, the learners' exploration weight and context size (the values of Li et al.'s
#: setting and of the previous chapters, not tuned on the replayed table), and the operator that arrives
#: mid-stream: DELLA, registered after chapter 03's grid was fixed; it shares its traits (task vector, drop, sign
#: election) with DARE-TIES, so hybrid LinUCB can start it from what it learned about its relatives.
DEFAULT_HORIZON = 1200


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
    new_operator = _new_operator(data, new_operator)
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


def _new_operator(data: ReplayData, new_operator: str | None) -> str | None:
    """The operator of the new-operator event (``"auto"``: see :func:`make_scenario`), checked against the arms."""
    methods = list(dict.fromkeys(arm.method for arm in data.arms))
    if new_operator == "auto":
        if len(methods) < 2:
            return None
        new_operator = max(methods, key=lambda m: _operator_value(data, m))
    if new_operator is not None and new_operator not in methods:
        raise ValueError(f"make_scenario: operator {new_operator!r} not among the arms' operators {methods}")
    return new_operator


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
