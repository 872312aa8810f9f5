"""Plans and their search: a plan is a subset, an order and one candidate per step (a left fold of 2-way
merges); :class:`Planner` scores plans with a step scorer by the chained rule and searches them exhaustively or
by beams; :func:`plan` is the entry point (see the package docstring)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from ..catalogue import Catalogue
from ..operators import Candidate


#: Plans per search at or below which :func:`plan` searches exhaustively.
EXHAUSTIVE_LIMIT = 500


@dataclass(frozen=True)
class Plan:
    """A (possibly partial) plan: experts in merge order and the operator of each step (len(ops) = len(order) - 1).

    ``predicted`` is the plan's predicted quality over the target tasks; ``task_predicted`` the per-task qhat."""

    order: tuple[str, ...]
    ops: tuple[Candidate, ...] = ()
    predicted: float = float("nan")
    task_predicted: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if len(self.ops) != max(len(self.order) - 1, 0):
            raise ValueError(f"a plan over {len(self.order)} experts needs {len(self.order) - 1} operators, "
                             f"got {len(self.ops)}")

    @property
    def k(self) -> int:
        return len(self.order)

    def key(self) -> tuple[str, ...]:
        """A total order for tie-breaking: experts then operator labels."""
        return (*self.order, "|", *(o.label for o in self.ops))

    def prefix(self, j: int) -> Plan:
        """The plan's first ``j`` experts (and the ``j - 1`` operators joining them), unscored."""
        return Plan(self.order[:j], self.ops[:max(j - 1, 0)])

    def describe(self) -> str:
        """``a -[op]-> b -[op]-> c``."""
        parts = [self.order[0]]
        for op, e in zip(self.ops, self.order[1:]):
            parts.append(f"-{op.label}-> {e}")
        return " ".join(parts)


def count_plans(n_experts: int, n_ops: int, k: int | None = None) -> int:
    """Plans over k of n experts: C(n, k) * k! * |O|^(k-1) (k = n: n! * |O|^(n-1))."""
    k = n_experts if k is None else k
    return math.comb(n_experts, k) * math.factorial(k) * n_ops ** max(k - 1, 0)


def enumerate_plans(experts: Sequence[str], ops: Sequence[Candidate], k: int | None = None) -> Iterator[Plan]:
    """Every plan over k-subsets of ``experts`` (default: all of them): subsets × orders × operator sequences."""
    k = len(experts) if k is None else k
    if not 1 <= k <= len(experts):
        raise ValueError(f"k must be between 1 and {len(experts)}, got {k}")
    for subset in itertools.combinations(experts, k):
        for order in itertools.permutations(subset):
            for seq in itertools.product(ops, repeat=k - 1):
                yield Plan(tuple(order), tuple(seq))


class StepScorer(Protocol):
    """Predicts one step: for prefix ``prefix`` (a plan over the experts merged so far), the next ``expert`` and each
    operator choice, the predicted normalized score per task of tasks(prefix) ∪ tasks(expert).

    Returns ``{op: {task: yhat}}`` with an entry for every op in ``ops``. Optional, for speed and for plans that
    leave a target task uncovered: ``batch(requests, ops)`` scores many (prefix, expert) steps at once (a list of
    such tables), and ``keep(requests)`` forecasts, for (plan, tasks) requests, the normalized score of the plan's
    merged model on tasks none of its experts serves (a list of ``{task: qhat}``)."""

    def __call__(self, prefix: Plan, expert: str, ops: Sequence[Candidate]) -> Mapping[Candidate, Mapping[str, float]]:
        ...


def is_order_free(op: Candidate) -> bool:
    """Whether swapping the two models of the step leaves the merge unchanged: no ``weight`` / ``t`` other than 0.5
    (the labels' order-free grid; DARE's masks are drawn per model position, equal in distribution)."""
    s = op.setting
    return all(abs(s[k] - 0.5) < 1e-12 for k in ("weight", "t") if k in s)


class Planner:
    """Scores plans with a :class:`StepScorer` (memoized per (prefix, expert)) and searches over them.

    ``expert_tasks`` maps each candidate expert to its tasks; ``tasks`` are the target tasks T. With
    ``distinct_tasks`` a plan never holds two experts of one task (siblings are alternatives, not partners: the
    predictor never saw such a pair). With ``order_free`` a plan whose first step swaps the two experts of another
    plan under an order-free operator (:func:`is_order_free`) is skipped: it is the same merge."""

    def __init__(self, scorer: StepScorer, expert_tasks: Mapping[str, Sequence[str]], tasks: Sequence[str],
                 ops: Sequence[Candidate], distinct_tasks: bool = False, order_free: bool = False):
        if not ops:
            raise ValueError("planner: no operator choices")
        self.scorer, self.tasks, self.ops = scorer, list(tasks), list(dict.fromkeys(ops))
        self.expert_tasks = {e: list(ts) for e, ts in expert_tasks.items()}
        self.distinct_tasks, self.order_free = distinct_tasks, order_free
        self._position = {e: i for i, e in enumerate(self.expert_tasks)}
        self._memo: dict[tuple, Mapping[Candidate, Mapping[str, float]]] = {}
        self.step_calls = 0

    @property
    def experts(self) -> list[str]:
        return list(self.expert_tasks)

    def _covered(self, plan: Plan) -> set[str]:
        return {t for e in plan.order for t in self.expert_tasks[e]}

    def can_extend(self, partial: Plan, expert: str) -> bool:
        """Whether ``expert`` may join ``partial`` (not in it yet; with ``distinct_tasks``, serving no task it serves)."""
        if expert in partial.order:
            return False
        return not (self.distinct_tasks and self._covered(partial) & set(self.expert_tasks[expert]))

    def canonical(self, plan: Plan) -> bool:
        """False for the swapped twin of another plan (``order_free`` planners only, see the class docstring)."""
        if not self.order_free or plan.k < 2 or not is_order_free(plan.ops[0]):
            return True
        return self._position[plan.order[0]] < self._position[plan.order[1]]

    def valid(self, plan: Plan) -> bool:
        """A plan this planner searches: every expert may join its prefix, and it is canonical."""
        return self.canonical(plan) and all(self.can_extend(plan.prefix(j), plan.order[j]) for j in range(1, plan.k))

    def space(self, k: int, experts: Sequence[str] | None = None) -> int:
        """The number of plans of k experts this planner searches (:meth:`valid`), counted without scoring."""
        pool = list(experts) if experts is not None else self.experts
        n_free = sum(is_order_free(o) for o in self.ops) if self.order_free else 0
        total = 0
        for subset in itertools.combinations(pool, k):
            if self.distinct_tasks:
                tasks = [t for e in subset for t in self.expert_tasks[e]]
                if len(tasks) != len(set(tasks)):
                    continue
            if k == 1:
                total += 1
                continue
            orders = math.factorial(k)
            # the first step: swapped twins of an order-free operator count once
            total += (orders // 2 * n_free + orders * (len(self.ops) - n_free)) * len(self.ops) ** (k - 2)
        return total

    def _step(self, prefix: Plan, expert: str) -> Mapping[Candidate, Mapping[str, float]]:
        key = (prefix.order, prefix.ops, expert)
        if key not in self._memo:
            self.step_calls += 1
            self._memo[key] = self.scorer(Plan(prefix.order, prefix.ops), expert, self.ops)
        return self._memo[key]

    def prefetch(self, requests: Iterable[tuple[Plan, str]]) -> None:
        """Score the (prefix, expert) steps not memoized yet: in one call when the scorer has ``batch`` (one
        prediction for all their rows), else one by one."""
        todo: dict[tuple, tuple[Plan, str]] = {}
        for prefix, expert in requests:
            key = (prefix.order, prefix.ops, expert)
            if key not in self._memo and key not in todo:
                todo[key] = (Plan(prefix.order, prefix.ops), expert)
        batch = getattr(self.scorer, "batch", None)
        if not todo or batch is None:
            for prefix, expert in todo.values():
                self._step(prefix, expert)
            return
        for key, table in zip(todo, batch(list(todo.values()), self.ops), strict=True):
            self._memo[key] = table
            self.step_calls += 1

    def _quality(self, qhat: Mapping[str, float]) -> float:
        return float(np.mean([qhat.get(t, 0.0) for t in self.tasks])) if self.tasks else float("nan")

    def start(self, expert: str) -> Plan:
        qhat = {t: 1.0 for t in self.expert_tasks[expert]}
        return Plan((expert,), (), self._quality(qhat), tuple(sorted(qhat.items())))

    def extend(self, partial: Plan, expert: str, op: Candidate) -> Plan:
        """``partial`` followed by ``expert`` merged in with ``op``, scored by the chained rule (module docstring)."""
        table = self._step(partial, expert)
        yhat = table[op]
        before = dict(partial.task_predicted)
        own = set(self.expert_tasks[expert])
        qhat = {}
        for t in dict.fromkeys([*before, *own]):
            y = float(yhat.get(t, float("nan")))
            qhat[t] = y if t in own else y * before[t]
        return Plan((*partial.order, expert), (*partial.ops, op), self._quality(qhat), tuple(sorted(qhat.items())))

    def score(self, plan: Plan) -> Plan:
        """``plan`` with its predicted quality (the fold of its steps)."""
        out = self.start(plan.order[0])
        for op, e in zip(plan.ops, plan.order[1:]):
            out = self.extend(out, e, op)
        return out

    def complete(self, plans: Sequence[Plan]) -> list[Plan]:
        """``plans`` (scored) with a forecast for every target task none of their experts serves: the scorer's
        ``keep`` (the merged model measured against an expert of that task), in one call for all plans; 0 for such a
        task when the scorer has no ``keep``. Plans covering every target task come back unchanged."""
        keep = getattr(self.scorer, "keep", None)
        missing = [[t for t in self.tasks if t not in dict(p.task_predicted)] for p in plans]
        wanted = [(p, ts) for p, ts in zip(plans, missing) if ts]
        if keep is None or not wanted:
            return list(plans)
        forecasts = iter(keep(wanted))
        out = []
        for p, ts in zip(plans, missing):
            if not ts:
                out.append(p)
                continue
            qhat = {**dict(p.task_predicted), **{t: float(v) for t, v in next(forecasts).items()}}
            out.append(Plan(p.order, p.ops, self._quality(qhat), tuple(sorted(qhat.items()))))
        return out


def _best(plans: Sequence[Plan]) -> list[Plan]:
    # NaN predictions sort last; ties broken by the plan key so that every search agrees on the winner.
    return sorted(plans, key=lambda p: (-(p.predicted if math.isfinite(p.predicted) else -np.inf), p.key()))


def _valid_plans(planner: Planner, k: int, pool: Sequence[str]) -> list[Plan]:
    return [p for p in enumerate_plans(pool, planner.ops, k) if planner.valid(p)]


def exhaustive_search(planner: Planner, k: int, experts: Sequence[str] | None = None, progress: bool = False,
                      top: int = 1) -> list[Plan]:
    """Score every plan over k-subsets of ``experts`` (default: the planner's); the ``top`` best, best first.

    Steps are scored depth by depth, every (prefix, next expert) of a depth in one batch (:meth:`Planner.prefetch`)."""
    pool = list(experts) if experts is not None else planner.experts
    plans = _valid_plans(planner, k, pool)
    for j in tqdm(range(1, k), desc=f"exhaustive k={k}", disable=not progress):
        planner.prefetch((p.prefix(j), p.order[j]) for p in plans)
    return _best([planner.score(p) for p in plans])[:top]


def _beams(planner: Planner, k: int, width: int, pool: Sequence[str], progress: bool = False) -> list[list[Plan]]:
    """The beam of every depth 1..k (depth 1 keeps every expert: single-expert plans all predict 1 on their own
    task, so a cut there would be a coin toss)."""
    if not 1 <= k <= len(pool):
        raise ValueError(f"k must be between 1 and {len(pool)}, got {k}")
    if width < 1:
        raise ValueError(f"beam width must be at least 1, got {width}")
    beams = [_best([planner.start(e) for e in pool])]
    for _ in tqdm(range(k - 1), desc=f"beam k={k} width={width}", disable=not progress):
        beam = beams[-1]
        steps = [(p, e) for p in beam for e in pool if planner.can_extend(p, e)]
        planner.prefetch(steps)
        grown = [planner.extend(p, e, op) for p, e in steps for op in planner.ops]
        beams.append(_best([p for p in grown if planner.canonical(p)])[:width])
    return beams


def beam_search(planner: Planner, k: int, width: int = 8, experts: Sequence[str] | None = None,
                progress: bool = False, top: int = 1) -> list[Plan]:
    """Grow plans one expert at a time, keeping the ``width`` best partial plans (by predicted quality) per depth
    (every single expert at depth 1)."""
    pool = list(experts) if experts is not None else planner.experts
    return _beams(planner, k, width, pool, progress)[-1][:top]


def candidate_experts(catalogue: Catalogue, tasks: Sequence[str] | None,
                      base: str | None = None) -> dict[str, list[str]]:
    """Experts of ``base`` (default: every base) whose tasks meet ``tasks`` (all experts when None): name -> tasks."""
    wanted = set(tasks) if tasks else None
    out = {}
    for e in catalogue.experts(base):
        if wanted is None or wanted & set(e.tasks):
            out[e.name] = list(e.tasks)
    return out


@dataclass
class PlanResult:
    """A search's outcome: the best plan, the runners-up, how it was searched and what it cost.

    ``extra["by_size"]``: the best plan of each size searched (forecasts of uncovered tasks included)."""

    plan: Plan
    ranked: list[Plan]
    base: str
    tasks: list[str]
    method: str  # "exhaustive" or "beam"
    space: int
    step_calls: int
    extra: dict[str, Any] = field(default_factory=dict)


def plan(catalogue: Catalogue, tasks: Sequence[str], k: int, scorer: StepScorer, ops: Sequence[Candidate],
         base: str | None = None, beam_width: int = 8, exhaustive_limit: int = EXHAUSTIVE_LIMIT, top: int = 5,
         progress: bool = False, min_k: int | None = None) -> PlanResult:
    """The best predicted plan of k experts for ``tasks`` over each base (or only ``base``); with ``min_k`` < k, of
    min_k to k experts: a plan may then leave a target task's expert out, and that task counts with the scorer's
    forecast for the merged model (:meth:`Planner.complete`). A plan holds at most one expert per task, and a first
    step and its swapped twin under an order-free operator are searched once. Exhaustive search when the plans of
    every size number at most ``exhaustive_limit``, else one beam search whose beam at each depth gives the
    candidates of that size."""
    unknown = sorted(set(tasks) - set(catalogue.tasks))
    if unknown:
        raise ValueError(f"task(s) {unknown} not in catalogue {catalogue.name!r} (its tasks: {catalogue.tasks})")
    min_k = k if min_k is None else int(min_k)
    if not 1 <= min_k <= k:
        raise ValueError(f"min_k must be between 1 and k = {k}, got {min_k}")
    bases = [base] if base else [b.name for b in catalogue.bases()]
    results = []
    for b in bases:
        pool = candidate_experts(catalogue, tasks, b)
        planner = Planner(scorer, pool, tasks, ops, distinct_tasks=True, order_free=True)
        sizes = [j for j in range(min_k, min(k, len(pool)) + 1) if planner.space(j) > 0]
        if not sizes:
            continue
        space = sum(planner.space(j) for j in sizes)
        if space <= exhaustive_limit:
            finalists = [p for j in sizes for p in exhaustive_search(planner, j, progress=progress,
                                                                     top=planner.space(j))]
            how = "exhaustive"
        else:
            beams = _beams(planner, max(sizes), beam_width, list(pool), progress)
            finalists = [p for j in sizes for p in beams[j - 1]]
            how = "beam"
        completed = _best(planner.complete(finalists))
        by_size = {j: next(p for p in completed if p.k == j) for j in sizes}
        results.append(PlanResult(completed[0], completed[:top], b, list(tasks), how, space, planner.step_calls,
                                  {"by_size": by_size}))
    if not results:
        raise ValueError(f"no base of catalogue {catalogue.name!r} has {min_k} experts of distinct tasks serving "
                         f"{list(tasks)}")
    return _best_result(results)


def _best_result(results: Sequence[PlanResult]) -> PlanResult:
    return sorted(results, key=lambda r: (-(r.plan.predicted if math.isfinite(r.plan.predicted) else -np.inf),
                                          r.base))[0]
