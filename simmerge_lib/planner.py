"""Chapter 05 — multi-way planning: which experts to merge, in which order, with which operator at each step.

**Plans.** For target tasks T, a plan over experts of one base is a subset S, an order pi = (e_1, ..., e_k) and an
operator choice o_j (operator + setting) per step, read as a *left fold* of 2-way merges:

    M_1 = e_1,    M_j = merge_{o_{j-1}}(M_{j-1}, e_j)   (j = 2..k),   result M_k.

Step j is the 2-way merge of the labels table (:func:`simmerge_lib.labels.job_recipe`) with a = M_{j-1} (the running
model: a ``weight`` is its share, SLERP's ``t`` runs from it) and b = e_j. For a fixed S there are
|S|! * |O|^(|S|-1) plans (:func:`enumerate_plans`, :func:`count_plans`). :func:`plan` searches at most one expert per
task (two experts of one task are alternatives, not partners), and a first step and its swapped twin under an
order-free operator (:func:`is_order_free`) once: they are the same merge (:meth:`Planner.space` counts what is left).

**Scoring without evaluating.** A *step scorer* (:class:`StepScorer`) returns, for a prefix M_{j-1}, the next expert
e and every operator choice o, the predicted normalized score yhat_o(t) of merge_o(M_{j-1}, e) on each task t of
tasks(M_{j-1}) ∪ tasks(e). :class:`PredictorScorer` computes the owner-oriented features of the *running merged
model* against e on the fly (the prefix merge is built in memory and probed on unlabeled prompts; no labelled data
is touched; a first step between two experts reads the catalogue's features table) and asks the chapter-04
predictor, once for every step of a search depth. The 2-way predictor's targets are normalized by the owner's own
score, so a plan's per-task prediction chains multiplicatively:

    qhat(M_1, t) = 1 for t in tasks(e_1)
    qhat(M_j, t) = yhat_{o_{j-1}}(t) * qhat(M_{j-1}, t)   if t not in tasks(e_j)   (a skill carried by the prefix)
    qhat(M_j, t) = yhat_{o_{j-1}}(t)                      if t in tasks(e_j)       (relative to e_j's own score)

and the *predicted quality* of a plan is mean_{t in T} qhat(M_k, t).

**Leaving an expert out.** A plan may merge fewer experts than there are target tasks (``min_k`` < k). A target task
u that no expert of the plan serves still has the skill the merged model kept from its base: the scorer forecasts it
with the predictor's *keep* head (chapter 04's ``keep_other``, what a model keeps of a task it was not trained on),
applied to the rows (x, M_k, u) for each expert x of u: qhat(M_k, u) = mean_x keep_hat(x, M_k, u). Keeping one
expert alone is the plan of size 1. Smaller plans thus compete with larger ones on the same scale
(:meth:`Planner.complete`).

**Search.** :func:`exhaustive_search` scores every plan over k-subsets of the candidate pool (step tables are
memoized per (prefix, expert), so shared prefixes are merged and probed once); :func:`beam_search` keeps the
``width`` best partial plans at each depth (every single expert at depth 1; ties broken by the plan's key, so with a
width at least the number of partial plans it returns exactly the exhaustive optimum). :func:`plan` picks exhaustive
search when the space has at most ``exhaustive_limit`` plans, else the beams of every depth give the candidates of
every size.

**Realized quality** (:class:`Realizer`) merges a plan for real (in memory, the same operator code as the engine)
and evaluates it: quality = mean_{t in T} score(M_k, t) / ref(t), with ref(t) the best own-task score of the base's
experts of t (same evaluator and n). Baselines (:func:`baselines`): all-at-once merges of the k target experts
(linear with equal weights, TIES at density 0.2 and 0.5, task arithmetic at lambda 0.5 and 1), random plans (order
and operators drawn uniformly) over the same experts, the best fixed operator at every step in the planner's order,
keeping the best single expert (in hindsight), and the oracle over real merges where it fits. :func:`multiway_study`
runs them for k = 2, 3, ...; :func:`heldout_study` plans with predictors that never trained on the target tasks.

**Multi-document recipes.** :func:`write_plan_recipe` writes one mergekit-format YAML document per step, separated by
``---``; each document carries a ``name`` (``step1``, ``step2``, ...) and a later step names an earlier result as
``"@<name>"`` (e.g. ``model: "@step1"``, also allowed in ``base_model``). ``simmerge merge plan.yml OUT`` runs
:func:`simmerge_lib.engine.merge_multi`: each step is merged by the streaming engine into ``.OUT.steps/<name>`` (removed at the end
unless ``keep_steps``), the last document into ``OUT``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .catalogue import Catalogue, map_model_names
from .documents import REF_PREFIX, write_documents
from .labels import job_recipe, setting_label

#: Plans per search at or below which :func:`plan` searches exhaustively.
EXHAUSTIVE_LIMIT = 500


# ============================================================================================ plans
@dataclass(frozen=True)
class OpChoice:
    """One operator choice of a step: a method and one grid setting (as in the labels table)."""

    method: str
    params: tuple[tuple[str, float], ...] = ()

    @classmethod
    def make(cls, method: str, setting: Mapping[str, Any] | str | None = None) -> OpChoice:
        """From a method and a setting dict (or its JSON, as in the labels' ``parameters`` column)."""
        if isinstance(setting, str):
            setting = json.loads(setting) if setting else {}
        return cls(method, tuple(sorted((str(k), float(v)) for k, v in dict(setting or {}).items())))

    @property
    def setting(self) -> dict[str, float]:
        return dict(self.params)

    @property
    def label(self) -> str:
        """``method[setting]``, e.g. ``ties[density=0.5]``."""
        return f"{self.method}[{setting_label(self.setting)}]"


@dataclass(frozen=True)
class Plan:
    """A (possibly partial) plan: experts in merge order and the operator of each step (len(ops) = len(order) - 1).

    ``predicted`` is the plan's predicted quality over the target tasks; ``task_predicted`` the per-task qhat."""

    order: tuple[str, ...]
    ops: tuple[OpChoice, ...] = ()
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


def enumerate_plans(experts: Sequence[str], ops: Sequence[OpChoice], k: int | None = None) -> Iterator[Plan]:
    """Every plan over k-subsets of ``experts`` (default: all of them): subsets × orders × operator sequences."""
    k = len(experts) if k is None else k
    if not 1 <= k <= len(experts):
        raise ValueError(f"k must be between 1 and {len(experts)}, got {k}")
    for subset in itertools.combinations(experts, k):
        for order in itertools.permutations(subset):
            for seq in itertools.product(ops, repeat=k - 1):
                yield Plan(tuple(order), tuple(seq))


# ============================================================================================ scoring
class StepScorer(Protocol):
    """Predicts one step: for prefix ``prefix`` (a plan over the experts merged so far), the next ``expert`` and each
    operator choice, the predicted normalized score per task of tasks(prefix) ∪ tasks(expert).

    Returns ``{op: {task: yhat}}`` with an entry for every op in ``ops``. Optional, for speed and for plans that
    leave a target task uncovered: ``batch(requests, ops)`` scores many (prefix, expert) steps at once (a list of
    such tables), and ``keep(requests)`` forecasts, for (plan, tasks) requests, the normalized score of the plan's
    merged model on tasks none of its experts serves (a list of ``{task: qhat}``)."""

    def __call__(self, prefix: Plan, expert: str, ops: Sequence[OpChoice]) -> Mapping[OpChoice, Mapping[str, float]]:
        ...


def is_order_free(op: OpChoice) -> bool:
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
                 ops: Sequence[OpChoice], distinct_tasks: bool = False, order_free: bool = False):
        if not ops:
            raise ValueError("planner: no operator choices")
        self.scorer, self.tasks, self.ops = scorer, list(tasks), list(dict.fromkeys(ops))
        self.expert_tasks = {e: list(ts) for e, ts in expert_tasks.items()}
        self.distinct_tasks, self.order_free = distinct_tasks, order_free
        self._position = {e: i for i, e in enumerate(self.expert_tasks)}
        self._memo: dict[tuple, Mapping[OpChoice, Mapping[str, float]]] = {}
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

    def _step(self, prefix: Plan, expert: str) -> Mapping[OpChoice, Mapping[str, float]]:
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

    def extend(self, partial: Plan, expert: str, op: OpChoice) -> Plan:
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


# ============================================================================================ in-memory merging
def step_recipe(step: int, a: str, b: str, base: str, op: OpChoice, seed: int = 0) -> dict[str, Any]:
    """The recipe of step ``step`` (1-based): merge ``a`` (the running model) with ``b``; names as given."""
    recipe = job_recipe(op.method, a, b, base, op.setting, seed)
    return {"name": f"step{step}", **recipe}


def merge_recipe_dict(recipe: Mapping[str, Any], state: Callable[[str], Mapping[str, torch.Tensor]],
                      layer_count: int | None = None) -> dict[str, torch.Tensor]:
    """Merge a recipe (model names resolved by ``state(name) -> state dict``) in memory, with the engine's operator
    code and mergekit's reading of ``base_model`` (:meth:`Recipe.merge_inputs`)."""
    from .operators import get_operator, merge_state_dicts
    from .recipe import Recipe

    rec = Recipe.from_dict({k: v for k, v in recipe.items() if k != "name"}, source=str(recipe.get("name", "step")))
    specs, base_spec = rec.merge_inputs()
    op = get_operator(rec.merge_method)
    base = state(base_spec.model) if (base_spec is not None and op.needs_base) else None
    return merge_state_dicts(rec.merge_method, [dict(state(s.model)) for s in specs], dict(base) if base else None,
                             [dict(s.parameters) for s in specs], rec.parameters, layer_count,
                             out_dtype=rec.output_dtype(), dtype=rec.compute_dtype())


class _Merges:
    """State dicts of experts (loaded once) and of plan prefixes (merged once, left fold)."""

    def __init__(self, catalogue: Catalogue, seed: int = 0, cache_size: int = 256):
        self.catalogue, self.seed, self.cache_size = catalogue, seed, cache_size
        self._experts: dict[str, dict[str, torch.Tensor]] = {}
        self._prefixes: dict[tuple, dict[str, torch.Tensor]] = {}
        self.merges = 0

    def expert(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._experts:
            from .checkpoint import load_state_dict

            self._experts[name] = load_state_dict(self.catalogue.path(name))
        return self._experts[name]

    def layers(self, name: str) -> int | None:
        cfg = self.catalogue.path(name) / "config.json"
        return json.loads(cfg.read_text()).get("num_hidden_layers") if cfg.is_file() else None

    def state(self, plan: Plan) -> dict[str, torch.Tensor]:
        """The merged model of ``plan`` (its left fold), caching every prefix."""
        if plan.k == 1:
            return self.expert(plan.order[0])
        key = (plan.order, plan.ops)
        if key not in self._prefixes:
            prev = self.state(plan.prefix(plan.k - 1))
            base = self.catalogue.base_of(plan.order[0]).name
            recipe = step_recipe(plan.k - 1, "@prev", plan.order[-1], base, plan.ops[-1], self.seed)
            states = {"@prev": prev}

            def lookup(name: str) -> Mapping[str, torch.Tensor]:
                return states[name] if name in states else self.expert(name)  # bases load the same way

            merged = merge_recipe_dict(recipe, lookup, self.layers(plan.order[0]))
            self.merges += 1
            if len(self._prefixes) >= self.cache_size:
                self._prefixes.pop(next(iter(self._prefixes)))
            self._prefixes[key] = merged
        return self._prefixes[key]


# ============================================================================================ the predictor scorer
class PredictorScorer:
    """Step scorer backed by the chapter-04 predictor: features of the running merged model (built in memory) against
    the next expert, on the probes of tasks(prefix) ∪ tasks(expert), then ``predictor.predict_rows`` per candidate.

    ``predictor`` is a :class:`simmerge_lib.predictor.Predictor` (or anything with ``feature_names``, ``candidates``
    and ``predict_rows(rows)`` returning one column per candidate and ``keep_other``). ``table``: the catalogue's
    features table (chapter 01), read for steps between two experts instead of recomputing them (its probe count
    must be ``n_probes``). Every step's rows are computed once (a first step and its swapped twin share them) and a
    :meth:`batch` of steps is predicted in one call."""

    def __init__(self, predictor: Any, catalogue: Catalogue, n_probes: int = 32, seed: int = 0,
                 cache: Any = None, merges: _Merges | None = None, table: pd.DataFrame | None = None):
        from .features import ProbeCache

        self.predictor, self.catalogue, self.n_probes = predictor, catalogue, n_probes
        self.merges = merges or _Merges(catalogue, seed)
        self.cache = cache or ProbeCache(disk_dir=None)
        self._refs: dict[tuple, Any] = {}
        self._skeleton: dict[str, Any] = {}
        self.feature_rows: list[pd.DataFrame] = []  # every step's features (for inspection)
        self._rows: dict[tuple, pd.DataFrame] = {}  # feature rows per step (and per keep request)
        self._tables: dict[tuple, dict[OpChoice, dict[str, float]]] = {}  # reused across searches
        self._table: dict[tuple[str, str, str], dict[str, Any]] = {}
        if table is not None:
            owned = table[table.task_of_a == 1].drop_duplicates(["a", "b", "task"])
            cols = [c for c in owned.columns if c.startswith(("fn_", "st_"))]
            self._table = {(a, b, t): dict(zip(cols, vals)) for a, b, t, *vals in
                           owned[["a", "b", "task", *cols]].itertuples(index=False, name=None)}
        self.computed_rows = 0  # feature rows computed (not read from the table)

    def with_predictor(self, predictor: Any) -> PredictorScorer:
        """A scorer for another predictor sharing this one's merges, probe outputs and feature rows (features do
        not depend on the predictor; only its predictions are its own)."""
        other = PredictorScorer(predictor, self.catalogue, self.n_probes, cache=self.cache, merges=self.merges)
        other._refs, other._skeleton, other._rows, other._table = self._refs, self._skeleton, self._rows, self._table
        other.feature_rows = self.feature_rows
        return other

    def _tasks(self, names: Sequence[str]) -> list[str]:
        wanted = {t for n in names for t in self.catalogue.entry(n).tasks}
        return [t for t in self.catalogue.tasks if t in wanted]

    def _ref(self, plan: Plan) -> Any:
        from .features import ModelRef

        key = (plan.order, plan.ops)
        if key not in self._refs:
            if plan.k == 1:
                self._refs[key] = ModelRef.folder(self.catalogue.path(plan.order[0]), plan.order[0])
            else:
                base = self.catalogue.base_of(plan.order[0]).name
                if base not in self._skeleton:
                    from .checkpoint import quiet_transformers
                    from .evaluate import load_model

                    with quiet_transformers():
                        self._skeleton[base] = load_model(self.catalogue.path(base))
                model, tok = self._skeleton[base]
                self._refs[key] = ModelRef.memory(model=model, state_dict=self.merges.state(plan),
                                                  name=plan.describe(), tokenizer=tok,
                                                  like=self.catalogue.path(base))
        return self._refs[key]

    def _base_ref(self, expert: str) -> Any:
        from .features import ModelRef

        base = self.catalogue.base_of(expert).name
        return self._refs.setdefault(("base", base), ModelRef.folder(self.catalogue.path(base), base))

    def _looked_up(self, owner: str, other: str, tasks: Sequence[str]) -> pd.DataFrame | None:
        """Rows (owner, other, task) of the features table, or None when one is missing."""
        found = [self._table.get((owner, other, t)) for t in tasks]
        if not tasks or any(f is None for f in found):
            return None
        return pd.DataFrame([{"a": owner, "b": other, "task": t, **f} for t, f in zip(tasks, found)])

    def _pair_rows(self, owner: Plan, other: Plan, tasks: Sequence[str], structural: Mapping[str, float] | None
                   ) -> tuple[pd.DataFrame, dict[str, float]]:
        """Rows (owner model, other model, task) for ``tasks``, computed now; the structural features are computed
        unless given (then the swapped ones of the other orientation are passed)."""
        from .features import STRUCTURAL_COLUMNS, pair_features
        from .probes import kit_probes

        a, b = self._ref(owner), self._ref(other)
        base = self._base_ref(owner.order[0])
        probes = kit_probes(tasks, self.n_probes)
        rows = pair_features(a, b, base, base, list(tasks), probes=probes, cache=self.cache,
                             structural=structural is None)
        if structural is not None:
            rows = rows.assign(**{c: structural[c] for c in STRUCTURAL_COLUMNS})
        self.computed_rows += len(rows)
        st = rows[STRUCTURAL_COLUMNS].iloc[0].to_dict() if len(rows) else dict(structural or {})
        rows["a"], rows["b"] = owner.describe(), other.describe()
        return rows, st

    def features(self, prefix: Plan, expert: str) -> pd.DataFrame:
        """The owner-oriented feature rows (chapter 04) of the pair (running model, expert), one per task of
        tasks(prefix) ∪ tasks(expert): the running model against the expert on the tasks it carries, the expert
        against the running model on its own (structural features computed once and swapped, not recomputed)."""
        from .features import swap_structural

        # a first step and its swapped twin are one pair: one set of rows
        key = ("pair", *sorted((prefix.order[0], expert))) if prefix.k == 1 else (prefix.order, prefix.ops, expert)
        if key in self._rows:
            return self._rows[key]
        owned, incoming = self._tasks(prefix.order), self._tasks([expert])
        single = Plan((expert,))
        parts = []
        if prefix.k == 1:
            parts = [self._looked_up(prefix.order[0], expert, owned), self._looked_up(expert, prefix.order[0],
                                                                                        incoming)]
        if any(p is None for p in parts) or not parts:
            forward, st = self._pair_rows(prefix, single, owned, None)
            parts = [forward]
            if incoming:
                parts.append(self._pair_rows(single, prefix, incoming, swap_structural(st))[0])
        out = pd.concat(parts, ignore_index=True).assign(task_of_a=1.0)
        out["owner"], out["other"], out["pair"] = out.a, out.b, prefix.describe() + "|" + expert
        self._rows[key] = out
        self.feature_rows.append(out)
        return out

    def batch(self, requests: Sequence[tuple[Plan, str]], ops: Sequence[OpChoice]
              ) -> list[dict[OpChoice, dict[str, float]]]:
        """Step tables of many (prefix, expert) requests: their feature rows, then one prediction for all."""
        names = {op: f"{op.method}|{setting_label(op.setting)}" for op in ops}
        unknown = [n for n in names.values() if n not in self.predictor.candidates]
        if unknown:
            raise ValueError(f"the predictor has no candidate {unknown[0]!r} (it knows {list(self.predictor.candidates)})")
        keys = [(p.order, p.ops, e, tuple(ops)) for p, e in requests]
        todo = [i for i, key in enumerate(keys) if key not in self._tables]
        if todo:
            frames = [self.features(*requests[i]) for i in todo]
            rows = pd.concat(frames, ignore_index=True)
            predicted = self.predictor.predict_rows(rows)
            start = 0
            for i, frame in zip(todo, frames):
                part = predicted.iloc[start:start + len(frame)]
                start += len(frame)
                self._tables[keys[i]] = {op: dict(zip(frame.task, part[name].astype(float))) for op, name in
                                         names.items()}
        return [self._tables[key] for key in keys]

    def __call__(self, prefix: Plan, expert: str, ops: Sequence[OpChoice]) -> dict[OpChoice, dict[str, float]]:
        return self.batch([(prefix, expert)], ops)[0]

    def keep(self, requests: Sequence[tuple[Plan, Sequence[str]]]) -> list[dict[str, float]]:
        """For each (plan, tasks): the forecast normalized score of the plan's merged model on each task, which none
        of its experts serves: the predictor's ``keep_other`` for the rows (x, merged model, task) with x every
        expert of the task on the plan's base (averaged over them), i.e. what keeping the merged model instead of
        x would leave of x's skill. One prediction for all rows."""
        frames, index = [], []
        for i, (p, tasks) in enumerate(requests):
            base = self.catalogue.base_of(p.order[0]).name
            for t in tasks:
                owners = [e.name for e in self.catalogue.experts(base) if t in e.tasks]
                if not owners:
                    raise ValueError(f"no expert of task {t!r} on base {base!r} to measure the merged model against")
                for x in owners:
                    key = ("keep", x, p.order, p.ops, t)
                    if key not in self._rows:
                        rows = self._looked_up(x, p.order[0], [t]) if p.k == 1 else None
                        if rows is None:
                            rows = self._pair_rows(Plan((x,)), p, [t], None)[0]
                        self._rows[key] = rows.assign(task_of_a=1.0, owner=rows.a, other=rows.b,
                                                      pair=x + "|" + p.describe())
                    frames.append(self._rows[key])
                    index.append((i, t))
        out: list[dict[str, list[float]]] = [{} for _ in requests]
        if frames:
            keep = self.predictor.predict_rows(pd.concat(frames, ignore_index=True))["keep_other"].to_numpy(float)
            for (i, t), value in zip(index, keep):
                out[i].setdefault(t, []).append(float(value))
        return [{t: float(np.mean(v)) for t, v in d.items()} for d in out]


def predictor_ops(predictor: Any, methods: Sequence[str] | None = None) -> list[OpChoice]:
    """The predictor's candidates (``method|setting``) as :class:`OpChoice`, optionally only some methods."""
    from .labels import setting_parameters

    ops = [OpChoice.make(name.split("|", 1)[0], setting_parameters(name.split("|", 1)[1]))
           for name in predictor.candidates]
    if methods:
        unknown = sorted(set(methods) - {o.method for o in ops})
        if unknown:
            raise ValueError(f"operator(s) {unknown} are not among the predictor's candidates "
                             f"({sorted({o.method for o in ops})})")
        ops = [o for o in ops if o.method in set(methods)]
    return ops


def load_or_fit_predictor(profile: str, features: pd.DataFrame, labels: pd.DataFrame,
                          reference: pd.DataFrame | None = None, family: str = "forest") -> Any:
    """Chapter 04's predictor ``build/predictor/<profile>.skops`` if it exists (and is of the current format);
    else one fitted now with :func:`simmerge_lib.predictor.fit_predictor` on ``features`` and ``labels``.
    ``predictor.metadata["source"]`` says which."""
    from .predictor import PREDICTOR_FORMAT, fit_predictor, load_predictor, predictor_path, training_table

    path = predictor_path(profile)
    if path.is_file():
        try:
            predictor = load_predictor(path)
            predictor.metadata["source"] = str(path)
            return predictor
        except ValueError as exc:  # an older format: fit a current one below
            if f"format {PREDICTOR_FORMAT}" not in str(exc):
                raise
    predictor = fit_predictor(training_table(features, labels, reference), family=family, classifier=False)
    predictor.metadata["source"] = f"fitted now ({family}) on the {profile} features + labels (no {path.name} yet)"
    return predictor


# ============================================================================================ planning entry point
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


def plan(catalogue: Catalogue, tasks: Sequence[str], k: int, scorer: StepScorer, ops: Sequence[OpChoice],
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


# ============================================================================================ real merges
class Realizer:
    """Merges plans for real (in memory) and evaluates them on the target tasks (labelled data: baselines only).

    quality(M) = mean_{t in T} score(M, t) / ref(t), ref(t) = the best own-task score of the base's experts of t.
    Scores are cached per (model, task), so a model is scored on a task once whatever the target sets asking for
    it (pass one ``scores_cache`` dict to several realizers to share them)."""

    def __init__(self, catalogue: Catalogue, tasks: Sequence[str], n_eval: int = 50, seed: int = 0,
                 merges: _Merges | None = None, scores_cache: dict | None = None):
        from .evaluate import resolve_evaluator

        self.catalogue, self.tasks, self.n_eval = catalogue, list(tasks), n_eval
        self.merges = merges or _Merges(catalogue, seed)
        self.evaluator = resolve_evaluator(catalogue.evaluator)
        self._skeleton: dict[str, Any] = {}
        self._ref: dict[tuple[str, str], float] = {}
        self._cache: dict[tuple, float] = scores_cache if scores_cache is not None else {}
        self.evaluations = 0

    def _model(self, base: str) -> Any:
        if base not in self._skeleton:
            from .checkpoint import quiet_transformers
            from .evaluate import load_model

            with quiet_transformers():
                self._skeleton[base] = load_model(self.catalogue.path(base))
        return self._skeleton[base]

    def scores(self, state: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]], base: str,
               key: tuple | None = None, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Raw scores of a state dict (a model of ``base``'s architecture; or a function building it, called only
        when a score is missing) on ``tasks`` (default: the target tasks)."""
        tasks = list(self.tasks if tasks is None else tasks)
        missing = [t for t in tasks if key is None or (key, self.n_eval, t) not in self._cache]
        if missing:
            from .evaluate import evaluate_state_dict

            model, tok = self._model(base)
            sd = state() if callable(state) else state
            frame = evaluate_state_dict(model, tok, dict(sd), missing, self.n_eval, self.evaluator)
            self.evaluations += 1
            got = dict(zip(frame.task, frame.score.astype(float)))
            if key is None:
                return {t: got[t] for t in tasks}
            for t in missing:
                self._cache[(key, self.n_eval, t)] = got[t]
        return {t: self._cache[(key, self.n_eval, t)] for t in tasks}

    def reference(self, base: str, task: str) -> float:
        """ref(t): the best score on ``task`` of the base's experts of that task (NaN when there is none)."""
        if (base, task) not in self._ref:
            best = float("nan")
            for e in self.catalogue.experts(base):
                if task in e.tasks:
                    s = self.expert_scores(e.name, [task])[task]
                    best = s if not math.isfinite(best) else max(best, s)
            self._ref[(base, task)] = best
        return self._ref[(base, task)]

    def expert_scores(self, name: str, tasks: Sequence[str] | None = None) -> dict[str, float]:
        base = self.catalogue.base_of(name).name
        return self.scores(lambda: self.merges.expert(name), base, ("expert", name), tasks)

    def quality_of(self, state: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]], base: str,
                   key: tuple | None = None) -> float:
        """Mean normalized score over the target tasks (tasks whose ref is NaN or 0 are skipped)."""
        return _mean_normalized(self.normalized(state, base, key))

    def normalized(self, state: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]], base: str,
                   key: tuple | None = None) -> dict[str, float]:
        """score(M, t) / ref(t) per target task (NaN where ref is NaN or 0)."""
        raw = self.scores(state, base, key)
        out = {}
        for t in self.tasks:
            ref = self.reference(base, t)
            out[t] = raw[t] / ref if math.isfinite(ref) and ref > 0 else float("nan")
        return out

    def quality(self, plan: Plan) -> float:
        """Realized quality of a plan (merged by its left fold; a one-expert plan is the expert itself)."""
        base = self.catalogue.base_of(plan.order[0]).name
        key = ("expert", plan.order[0]) if plan.k == 1 else ("plan", plan.order, plan.ops)
        return self.quality_of(lambda: self.merges.state(plan), base, key)

    def all_at_once(self, experts: Sequence[str], method: str, setting: Mapping[str, Any] | None = None) -> float:
        """Realized quality of one k-way merge of ``experts``: ``linear`` with equal weights, or a task-vector method
        (TIES, task arithmetic, ...) over the shared base with ``setting``'s per-model / global parameters."""
        from .operators import get_operator, merge_state_dicts

        experts = sorted(experts)
        base = self.catalogue.base_of(experts[0]).name
        op = get_operator(method)
        setting = dict(setting or {})
        per_model = {k: v for k, v in setting.items() if k in op.model_params}
        glob = {k: v for k, v in setting.items() if k in op.global_params}

        def merged() -> dict[str, torch.Tensor]:
            return merge_state_dicts(method, [self.merges.expert(e) for e in experts],
                                     self.merges.expert(base) if op.needs_base else None,
                                     [dict(per_model) for _ in experts], glob, self.merges.layers(base))

        return self.quality_of(merged, base, ("all", tuple(experts), method, tuple(sorted(setting.items()))))


def _mean_normalized(values: Mapping[str, float]) -> float:
    vals = [v for v in values.values() if math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def random_plans(experts: Sequence[str], ops: Sequence[OpChoice], n: int, seed: int = 0) -> list[Plan]:
    """``n`` plans over ``experts`` with a uniformly random order and operator per step."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        order = list(experts)
        rng.shuffle(order)
        out.append(Plan(tuple(order), tuple(rng.choice(list(ops)) for _ in range(len(order) - 1))))
    return out


def oracle_search(realizer: Realizer, experts: Sequence[str], ops: Sequence[OpChoice], progress: bool = False,
                  plans: Sequence[Plan] | None = None) -> tuple[Plan, float, list[tuple[Plan, float]]]:
    """Exhaustive search over real merges: every order × operator sequence of ``experts`` (or the given ``plans``):
    (best, its quality, all (plan, quality))."""
    plans = list(enumerate_plans(experts, ops)) if plans is None else list(plans)
    results = [(p, realizer.quality(p)) for p in tqdm(plans, desc="oracle (real merges)", disable=not progress)]
    best = sorted(results, key=lambda r: (-(r[1] if math.isfinite(r[1]) else -np.inf), r[0].key()))[0]
    return best[0], best[1], results


#: The all-at-once k-way merges every plan is compared with: (label, method, setting).
ALL_AT_ONCE: tuple[tuple[str, str, dict[str, float]], ...] = (
    ("linear", "linear", {}), ("ties_d0.2", "ties", {"density": 0.2, "lambda": 1.0}),
    ("ties_d0.5", "ties", {"density": 0.5, "lambda": 1.0}), ("ta_l0.5", "task_arithmetic", {"lambda": 0.5}),
    ("ta_l1", "task_arithmetic", {"lambda": 1.0}))


def oracle_plans(catalogue: Catalogue, tasks: Sequence[str], ops: Sequence[OpChoice], k: int, base: str,
                 min_k: int = 1, subset: Sequence[str] | None = None, limit: int | None = None) -> list[Plan] | None:
    """The plans an oracle merges for real: every plan of ``min_k``..k experts of ``base`` the planner searches
    (one expert per task, swapped first-step twins once), or, given ``subset``, every order × operator sequence of
    those experts (canonical). None when they number more than ``limit``: counted (:meth:`Planner.space`) before
    any is enumerated, since the spaces of larger k run to millions of plans."""
    pool = candidate_experts(catalogue, tasks, base)
    planner = Planner(lambda *a: {}, pool, tasks, ops, distinct_tasks=True, order_free=True)
    if subset is not None:
        if limit is not None and planner.space(len(subset), list(subset)) > limit:
            return None
        return [p for p in enumerate_plans(list(subset), ops) if planner.canonical(p)]
    if limit is not None and sum(planner.space(j) for j in range(min_k, k + 1)) > limit:
        return None
    return [p for j in range(min_k, k + 1) for p in _valid_plans(planner, j, list(pool))]


def baselines(realizer: Realizer, chosen: Plan, ops: Sequence[OpChoice], fixed_op: OpChoice | None = None,
              n_random: int = 5, oracle_max_plans: int = 0, ties_setting: Mapping[str, Any] | None = None,
              seed: int = 0, progress: bool = False, full: Plan | None = None, pool: Sequence[str] | None = None,
              min_k: int = 1) -> dict[str, Any]:
    """Real-merge baselines for a chosen plan (see the module docstring). ``full``: the planner's best plan that
    merges every target task's expert (default ``chosen``): the all-at-once merges and random plans use its
    experts. ``pool``: the candidate experts (default the full plan's), for *keep the best single expert*.

    Keys: planner_quality, full_plan_quality, all_at_once_<label> per :data:`ALL_AT_ONCE` (``all_at_once_ties`` is
    ``ties_setting``'s, default density 0.5), all_at_once_best, random_order_quality (mean) and
    random_order_qualities, fixed_op, fixed_op_quality (None without ``fixed_op``), best_single_quality and
    best_single (hindsight over the pool), oracle_quality / oracle_plan / oracle_scope / oracle_plans (None when
    neither every plan of sizes ``min_k``..k nor every order × operator sequence of the chosen subset fits in
    ``oracle_max_plans``)."""
    full = full or chosen
    subset = sorted(full.order)
    out: dict[str, Any] = {"planner_quality": realizer.quality(chosen), "full_plan_quality": realizer.quality(full)}
    for label, method, setting in ALL_AT_ONCE:
        out[f"all_at_once_{label}"] = realizer.all_at_once(subset, method, setting) if len(subset) > 1 else None
    out["all_at_once_ties"] = (realizer.all_at_once(subset, "ties", ties_setting) if ties_setting and len(subset) > 1
                               else out["all_at_once_ties_d0.5"])
    merged = [v for k, v in out.items() if k.startswith("all_at_once_") and v is not None]
    out["all_at_once_best"] = max(merged) if merged else None
    rand = [realizer.quality(p) for p in random_plans(subset, ops, n_random, seed)] if len(subset) > 1 else []
    out["random_order_qualities"] = rand
    out["random_order_quality"] = float(np.mean(rand)) if rand else None
    if fixed_op is not None and chosen.k > 1:
        out["fixed_op"] = fixed_op.label
        out["fixed_op_quality"] = realizer.quality(Plan(chosen.order, tuple(fixed_op for _ in chosen.ops)))
    else:
        out["fixed_op"], out["fixed_op_quality"] = None, None
    singles = {e: realizer.quality(Plan((e,))) for e in (pool or full.order)}
    out["best_single"] = max(singles, key=lambda e: (singles[e], e))
    out["best_single_quality"] = singles[out["best_single"]]
    base = realizer.catalogue.base_of(chosen.order[0]).name
    k = full.k
    every = oracle_plans(realizer.catalogue, realizer.tasks, ops, k, base, min_k, limit=oracle_max_plans)
    own = (oracle_plans(realizer.catalogue, realizer.tasks, ops, k, base, subset=chosen.order, limit=oracle_max_plans)
           if chosen.k > 1 else None)
    out["oracle_quality"] = out["oracle_plan"] = out["oracle_scope"] = out["oracle_plans"] = None
    for scope, plans in (("every plan", every), ("orders × operators of the planner's subset", own)):
        if plans and len(plans) <= oracle_max_plans:
            best, q, _ = oracle_search(realizer, [], ops, progress, plans=plans)
            out.update(oracle_quality=q, oracle_plan=best.describe(), oracle_scope=scope, oracle_plans=len(plans))
            break
    return out


# ============================================================================================ multi-document recipes
def plan_documents(plan_: Plan, catalogue: Catalogue, seed: int = 0) -> list[dict[str, Any]]:
    """One recipe document per step (absolute model paths; step j > 1 names the previous result ``"@step<j-1>"``)."""
    if plan_.k < 2:
        raise ValueError("a plan of one expert has no merge step")
    base = catalogue.base_of(plan_.order[0]).name
    docs = []
    for j, (op, e) in enumerate(zip(plan_.ops, plan_.order[1:]), start=1):
        a = plan_.order[0] if j == 1 else f"{REF_PREFIX}step{j - 1}"
        doc = step_recipe(j, a, e, base, op, seed)
        docs.append(map_model_names(doc, lambda n: n if n.startswith(REF_PREFIX) else str(catalogue.path(n).resolve())))
    return docs


def write_plan_recipe(plan_: Plan, catalogue: Catalogue, path: str | os.PathLike[str], seed: int = 0,
                      comment: str | None = None) -> Path:
    """Write the plan as a multi-document YAML recipe (atomically); ``simmerge merge`` executes it."""
    return write_documents(plan_documents(plan_, catalogue, seed), path, comment or plan_.describe())



# ============================================================================================ the command
def _cmd_plan(args: argparse.Namespace) -> int:
    from .predictor import load_predictor, predictor_path

    catalogue = Catalogue.load(args.catalogue)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks: give at least one task (comma-separated)")
    if args.k < 2:
        raise ValueError(f"--k must be at least 2, got {args.k}")
    predictor = load_predictor(args.predictor or predictor_path(catalogue.name.removeprefix("transfer-")))
    ops = predictor_ops(predictor, args.ops.split(",") if args.ops else None)
    scorer = PredictorScorer(predictor, catalogue, n_probes=args.n_probes, seed=args.seed)
    min_k = args.k if args.min_k is None else args.min_k
    result = plan(catalogue, tasks, args.k, scorer, ops, base=args.base, beam_width=args.beam,
                  exhaustive_limit=args.exhaustive_limit, top=args.top, progress=not args.quiet, min_k=min_k)
    best = result.plan
    size = f"{min_k} to {args.k}" if min_k < args.k else f"{args.k}"
    print(f"# plan of {size} experts of {result.base} for {', '.join(tasks)} ({result.method} search over "
          f"{result.space} plans, {result.step_calls} scored steps; predictor: {predictor.family})")
    for rank, p in enumerate(result.ranked, start=1):
        print(f"{rank:>2}  predicted {p.predicted:.3f}  {p.describe()}")
    print("per-task predicted: " + ", ".join(f"{t}={v:.3f}" for t, v in best.task_predicted))
    if best.k == 1:
        print(f"advice: keep {best.order[0]} alone; no merge of up to {args.k} experts is predicted to do better")
        return 0
    out = Path(args.out) if args.out else Path(f"plan-{result.base}-{'-'.join(tasks)}-k{args.k}.yml")
    write_plan_recipe(best, catalogue, out, args.seed,
                      comment=f"simmerge plan: {best.describe()}\npredicted quality {best.predicted:.4f} on "
                              f"{', '.join(tasks)}\nrun: simmerge merge {out} OUT")
    print(f"recipe: {out}  (run `simmerge merge {out} OUT`)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``simmerge plan CATALOGUE --tasks T1,T2 --k K``."""
    p = subparsers.add_parser("plan", help="plan a multi-way merge (subset, order, operators) with the predictor",
                              description="Search subsets, orders and per-step operators of k experts for the "
                                          "target tasks with the predictor (no evaluation), print the plan and "
                                          "write a multi-document recipe that `simmerge merge` executes.")
    p.add_argument("catalogue", help="catalogue folder or catalogue.json")
    p.add_argument("--tasks", required=True, help="target tasks, comma-separated")
    p.add_argument("--k", type=int, required=True, help="number of experts to merge")
    p.add_argument("--min-k", type=int, help="also consider plans of this many experts up to k, leaving some target "
                   "tasks' experts out (default: exactly k)")
    p.add_argument("--predictor", help="predictor .skops file (default build/predictor/<catalogue name>.skops)")
    p.add_argument("--ops", help="only these operators, comma-separated (default: every predictor candidate)")
    p.add_argument("--base", help="only experts of this base (default: the best plan over every base)")
    p.add_argument("--beam", type=int, default=8, help="beam width when the space is too large (default 8)")
    p.add_argument("--exhaustive-limit", type=int, default=EXHAUSTIVE_LIMIT,
                   help=f"search exhaustively up to this many plans (default {EXHAUSTIVE_LIMIT})")
    p.add_argument("--n-probes", type=int, default=32, help="probe prompts per task for the features (default 32)")
    p.add_argument("--top", type=int, default=5, help="plans to list")
    p.add_argument("--seed", type=int, default=0, help="seed written into the recipe (DARE masks)")
    p.add_argument("--out", help="recipe file to write (default plan-<base>-<tasks>-k<k>.yml)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_plan)


# ============================================================================================ the chapter's study
def fixed_op_from_labels(labels: pd.DataFrame) -> OpChoice:
    """The best fixed (method, setting) of a labels table (same-base pairs), as an :class:`OpChoice`."""
    from .labels import best_fixed, merge_quality

    q = merge_quality(labels[labels.same_base.astype(bool)])
    method, setting = best_fixed(q)
    row = labels[(labels.method == method) & (labels.setting == setting)].iloc[0]
    return OpChoice.make(method, row.parameters)


def multiway_study(catalogue: Catalogue, predictor: Any, ks: Sequence[int], ops: Sequence[OpChoice],
                   n_eval: int = 50, n_probes: int = 32, beam_width: int = 8,
                   exhaustive_limit: int = EXHAUSTIVE_LIMIT, oracle_max_plans: int = 300, n_random: int = 5,
                   fixed_op: OpChoice | None = None, top_realized: int = 5, seed: int = 0,
                   progress: bool = True, scorer: PredictorScorer | None = None, min_k: int = 1,
                   task_sets: Mapping[int, Sequence[str]] | None = None,
                   scores_cache: dict | None = None) -> dict[int, dict[str, Any]]:
    """For each k: target tasks T = the catalogue's first k tasks (or ``task_sets[k]``); the planner chooses, with
    the predictor only, a plan of ``min_k``..k experts (one per task, so it may leave a task's expert out) on one
    base; then everything is merged for real and evaluated (:func:`baselines`): the chosen plan, the planner's best
    plan merging all k tasks' experts, the ``top_realized`` best predicted plans (planned vs realized), and every
    baseline. k values with no base holding an expert of every target task are reported as skipped. Pass a
    ``scorer`` used before to reuse its predicted steps and prefix merges, and one ``scores_cache`` to several
    studies to score each model on each task once."""
    import time

    if scorer is None:
        scorer = PredictorScorer(predictor, catalogue, n_probes=n_probes, seed=seed)
    merges = scorer.merges
    cache = {} if scores_cache is None else scores_cache
    out: dict[int, dict[str, Any]] = {}
    for k in ks:
        tasks = list(task_sets[k]) if task_sets is not None else list(catalogue.tasks[:k])
        if len(tasks) < k:
            out[k] = {"skipped": f"the catalogue has only {len(catalogue.tasks)} tasks"}
            continue
        lo = min(min_k, k)
        t0 = time.perf_counter()
        try:
            result = plan(catalogue, tasks, k, scorer, ops, beam_width=beam_width, exhaustive_limit=exhaustive_limit,
                          top=max(top_realized, 1), progress=progress, min_k=lo)
        except ValueError as exc:
            out[k] = {"skipped": str(exc)}
            continue
        plan_seconds = time.perf_counter() - t0
        full = result.extra["by_size"].get(k)
        if full is None:
            out[k] = {"skipped": f"base {result.base} has no expert for every task of {tasks}"}
            continue
        realizer = Realizer(catalogue, tasks, n_eval=n_eval, seed=seed, merges=merges, scores_cache=cache)
        t1 = time.perf_counter()
        chosen = result.plan
        row: dict[str, Any] = {"chosen": chosen, "full": full, "tasks": tasks, "base": result.base,
                               "search": result.method, "space": result.space, "step_calls": result.step_calls,
                               "plan": chosen.describe(), "chosen_k": chosen.k, "full_plan": full.describe(),
                               "predicted_quality": chosen.predicted, "full_predicted": full.predicted,
                               "task_predicted": dict(chosen.task_predicted), "plan_seconds": plan_seconds}
        pool = list(candidate_experts(catalogue, tasks, result.base))
        row.update(baselines(realizer, chosen, ops, fixed_op, n_random, oracle_max_plans, seed=seed,
                             progress=progress, full=full, pool=pool, min_k=lo))
        row["task_realized"] = realizer.normalized(lambda: merges.state(chosen), result.base,
                                                   ("expert", chosen.order[0]) if chosen.k == 1 else
                                                   ("plan", chosen.order, chosen.ops))
        row["ranked"] = [{"plan": p.describe(), "k": p.k, "predicted": p.predicted, "realized": realizer.quality(p)}
                         for p in result.ranked[:top_realized]]
        row["baseline_seconds"] = time.perf_counter() - t1
        row["evaluations"] = realizer.evaluations
        out[k] = row
    return out


#: The non-oracle baselines of the study (key of :func:`baselines` -> label); the claim "the planner beats every
#: baseline" is checked against these.
BASELINE_NAMES = {"all_at_once_linear": "all-at-once linear", "all_at_once_ties_d0.2": "all-at-once TIES d0.2",
                  "all_at_once_ties_d0.5": "all-at-once TIES d0.5", "all_at_once_ta_l0.5": "all-at-once TA λ0.5",
                  "all_at_once_ta_l1": "all-at-once TA λ1", "fixed_op_quality": "best fixed operator every step",
                  "random_order_quality": "random plans (mean)", "best_single_quality": "best single expert"}


def study_frame(study: Mapping[int, Mapping[str, Any]]) -> pd.DataFrame:
    """The study as a long table: k, approach, quality (realized; ``planner (predicted)`` is the prediction)."""
    names = {"predicted_quality": "planner (predicted)", "planner_quality": "planner (realized)",
             "full_plan_quality": "planner, all k experts", **BASELINE_NAMES, "oracle_quality": "oracle (real merges)"}
    rows = []
    for k, r in study.items():
        for key, label in names.items():
            if r.get(key) is not None:
                rows.append({"k": int(k), "approach": label, "quality": float(r[key])})
    return pd.DataFrame(rows, columns=["k", "approach", "quality"])


def study_summary(study: Mapping[int, Mapping[str, Any]], tol: float = 0.0) -> pd.DataFrame:
    """Per k: the planner's realized quality, the best non-oracle baseline (:data:`BASELINE_NAMES`) and the margin
    over it, whether the planner matched or beat every one (within ``tol``), the oracle and the gap to it, how
    many experts the plan kept and what merging all k of them would have realized."""
    rows = []
    for k, r in sorted(study.items()):
        if "skipped" in r:
            continue
        base = {label: r[key] for key, label in BASELINE_NAMES.items() if r.get(key) is not None}
        best = max(base, key=base.get)
        oracle = r.get("oracle_quality")
        rows.append({"k": int(k), "planner": r["planner_quality"], "predicted": r["predicted_quality"],
                     "experts_kept": r["chosen_k"], "all_k_plan": r["full_plan_quality"], "best_baseline": best,
                     "best_baseline_quality": base[best], "margin": r["planner_quality"] - base[best],
                     "beats_every_baseline": r["planner_quality"] >= base[best] - tol,
                     "oracle": oracle, "gap_to_oracle": None if oracle is None else oracle - r["planner_quality"],
                     "oracle_scope": r.get("oracle_scope")})
    return pd.DataFrame(rows)


# ============================================================================================ tasks never trained on
def task_halves(catalogue: Catalogue) -> tuple[list[str], list[str]]:
    """The catalogue's tasks in two halves (first and second half of its task list)."""
    n = len(catalogue.tasks) // 2
    return list(catalogue.tasks[:n]), list(catalogue.tasks[n:2 * n])


def half_predictors(features: pd.DataFrame, labels: pd.DataFrame, reference: pd.DataFrame | None,
                    catalogue: Catalogue, family: str = "forest", feature_set: str = "all", seed: int = 0
                    ) -> dict[str, tuple[list[str], Any]]:
    """Two predictors, each fitted only on the pairs whose tasks both lie in one half of the catalogue's tasks
    (:func:`task_halves`): ``{"A": (tasks, predictor), "B": (tasks, predictor)}``. Planning the other half's tasks
    with one of them plans on tasks it never trained on."""
    from .predictor import fit_predictor, training_table

    table = training_table(features, labels, reference)
    tasks_of = {e.name: set(e.tasks) for e in catalogue.experts()}
    out = {}
    for name, tasks in zip("AB", task_halves(catalogue)):
        inside = [tasks_of[a] | tasks_of[b] <= set(tasks) for a, b in zip(table.a, table.b)]
        part = table[inside]
        if part.pair.nunique() < 2:
            raise ValueError(f"half {name} ({tasks}): fewer than two labelled pairs to fit a predictor on")
        predictor = fit_predictor(part, family=family, feature_set=feature_set, seed=seed, classifier=False,
                                  metadata={"tasks": tasks})
        out[name] = (list(tasks), predictor)
    return out


def heldout_study(catalogue: Catalogue, halves: Mapping[str, tuple[Sequence[str], Any]], ks: Sequence[int],
                  ops: Sequence[OpChoice], scorer: PredictorScorer, n_eval: int = 50, beam_width: int = 8,
                  exhaustive_limit: int = EXHAUSTIVE_LIMIT, seed: int = 0, progress: bool = False,
                  scores_cache: dict | None = None) -> pd.DataFrame:
    """Plans on tasks the predictor trained on, and on tasks it never saw: for each k and each half's first k tasks,
    a plan by each half's predictor (:func:`half_predictors`), merged and evaluated. ``scorer``: a scorer whose
    computed features (and merges) the halves' scorers share (:meth:`PredictorScorer.with_predictor`).

    One row per (k, target half, predictor half): seen (the predictor's half is the target's), plan, experts kept,
    predicted, realized, the best single expert of either base on those tasks (hindsight) and the realized quality
    of keeping it."""
    cache = {} if scores_cache is None else scores_cache
    scorers = {name: scorer.with_predictor(p) for name, (_, p) in halves.items()}
    rows = []
    for k in ks:
        for target, (tasks_all, _) in halves.items():
            tasks = list(tasks_all[:k])
            if len(tasks) < k:
                continue
            realizer = Realizer(catalogue, tasks, n_eval=n_eval, seed=seed, merges=scorer.merges, scores_cache=cache)
            singles = {e.name: realizer.quality(Plan((e.name,))) for e in catalogue.experts()
                       if set(e.tasks) & set(tasks)}
            best_single = max(singles, key=lambda e: (singles[e], e))
            for name, sc in scorers.items():
                result = plan(catalogue, tasks, k, sc, ops, beam_width=beam_width, exhaustive_limit=exhaustive_limit,
                              top=1, progress=progress, min_k=1)
                rows.append({"k": k, "tasks": ",".join(tasks), "target": target, "predictor": name,
                             "seen": name == target, "plan": result.plan.describe(), "experts_kept": result.plan.k,
                             "predicted": result.plan.predicted, "realized": realizer.quality(result.plan),
                             "best_single": best_single, "best_single_quality": singles[best_single]})
    return pd.DataFrame(rows)
