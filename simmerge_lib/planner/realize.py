"""Plans merged for real and evaluated (labelled data: baselines only): :class:`Realizer`, the all-at-once,
random, fixed-operator, best-single and oracle baselines (see the package docstring)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..catalogue import Catalogue
from ..checkpoint import quiet_transformers
from ..evaluate import evaluate_state_dict, load_model, resolve_evaluator
from ..operators import Candidate, get_operator
from ..recipe import Recipe
from .merges import Merges
from .plans import Plan, Planner, _valid_plans, candidate_experts, enumerate_plans


class Realizer:
    """Merges plans for real (in memory) and evaluates them on the target tasks (labelled data: baselines only).

    quality(M) = mean_{t in T} score(M, t) / ref(t), ref(t) = the best own-task score of the base's experts of t.
    Scores are cached per (model, task), so a model is scored on a task once whatever the target sets asking for
    it (pass one ``scores_cache`` dict to several realizers to share them)."""

    def __init__(self, catalogue: Catalogue, tasks: Sequence[str], n_eval: int = 50, seed: int = 0,
                 merges: Merges | None = None, scores_cache: dict | None = None):
        self.catalogue, self.tasks, self.n_eval = catalogue, list(tasks), n_eval
        self.merges = merges or Merges(catalogue, seed)
        self.evaluator = resolve_evaluator(catalogue.evaluator)
        self._skeleton: dict[str, Any] = {}
        self._ref: dict[tuple[str, str], float] = {}
        self._cache: dict[tuple, float] = scores_cache if scores_cache is not None else {}
        self.evaluations = 0

    def _model(self, base: str) -> Any:
        if base not in self._skeleton:
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
        experts = sorted(experts)
        base = self.catalogue.base_of(experts[0]).name
        recipe = all_at_once_recipe(experts, base, method, setting)
        setting = dict(setting or {})

        def merged() -> dict[str, torch.Tensor]:
            return recipe.merge_states(self.merges.expert, self.merges.layers(base))

        return self.quality_of(merged, base, ("all", tuple(experts), method, tuple(sorted(setting.items()))))


def all_at_once_recipe(experts: Sequence[str], base: str, method: str, setting: Mapping[str, Any] | None = None
                       ) -> Recipe:
    """One k-way merge of ``experts`` as a recipe: ``setting``'s per-model parameters on every expert (equal
    weights), its global ones as the recipe's; ``base`` is named only when the operator needs it (a base named for
    linear would join the average)."""
    op = get_operator(method)
    setting = dict(setting or {})
    per_model = {k: v for k, v in setting.items() if k in op.model_params}
    glob = {k: v for k, v in setting.items() if k in op.global_params}
    doc: dict[str, Any] = {"merge_method": method, "models": [{"model": e, "parameters": dict(per_model)}
                                                              for e in experts], "parameters": glob}
    if op.needs_base:
        doc["base_model"] = base
    return Recipe.from_dict(doc, source=f"all-at-once {method}")


def _mean_normalized(values: Mapping[str, float]) -> float:
    vals = [v for v in values.values() if math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def random_plans(experts: Sequence[str], ops: Sequence[Candidate], n: int, seed: int = 0) -> list[Plan]:
    """``n`` plans over ``experts`` with a uniformly random order and operator per step."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        order = list(experts)
        rng.shuffle(order)
        out.append(Plan(tuple(order), tuple(rng.choice(list(ops)) for _ in range(len(order) - 1))))
    return out


def oracle_search(realizer: Realizer, experts: Sequence[str], ops: Sequence[Candidate], progress: bool = False,
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


def oracle_plans(catalogue: Catalogue, tasks: Sequence[str], ops: Sequence[Candidate], k: int, base: str,
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


def baselines(realizer: Realizer, chosen: Plan, ops: Sequence[Candidate], fixed_op: Candidate | None = None,
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
