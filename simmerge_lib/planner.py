"""Chapter 05 — multi-way planning: which experts to merge, in which order, with which operator at each step.

**Plans.** For target tasks T, a plan over experts of one base is a subset S (|S| = k), an order
pi = (e_1, ..., e_k) and an operator choice o_j (operator + setting) per step, read as a *left fold* of 2-way merges:

    M_1 = e_1,    M_j = merge_{o_{j-1}}(M_{j-1}, e_j)   (j = 2..k),   result M_k.

Step j is the 2-way merge of the labels table (:func:`simmerge_lib.labels.job_recipe`) with a = M_{j-1} (the running
model: a ``weight`` is its share, SLERP's ``t`` runs from it) and b = e_j. For a fixed S there are
|S|! * |O|^(|S|-1) plans (:func:`enumerate_plans`, :func:`count_plans`).

**Scoring without evaluating.** A *step scorer* (:class:`StepScorer`) returns, for a prefix M_{j-1}, the next expert
e and every operator choice o, the predicted normalized score yhat_o(t) of merge_o(M_{j-1}, e) on each task t of
tasks(M_{j-1}) ∪ tasks(e). :class:`PredictorScorer` computes the features of the *running merged model* against e on
the fly (the prefix merge is built in memory and probed on unlabeled prompts; no labelled data is touched) and asks
the chapter-04 predictor. The 2-way predictor's targets are normalized by the best *parent's* own score, so a plan's
per-task prediction chains multiplicatively:

    qhat(M_1, t) = 1 for t in tasks(e_1)
    qhat(M_j, t) = yhat_{o_{j-1}}(t) * qhat(M_{j-1}, t)   if t not in tasks(e_j)   (a skill carried by the prefix)
    qhat(M_j, t) = yhat_{o_{j-1}}(t)                      if t in tasks(e_j)       (relative to e_j's own score)
    qhat(M_j, t) = 0                                     if no expert of the prefix serves t

and the *predicted quality* of a (partial) plan is mean_{t in T} qhat(M, t).

**Search.** :func:`exhaustive_search` scores every plan over every k-subset of the candidate pool (step tables are
memoized per (prefix, expert), so shared prefixes are merged and probed once); :func:`beam_search` keeps the
``width`` best partial plans at each depth (ties broken by the plan's key, so with a width at least the number of
partial plans it returns exactly the exhaustive optimum). :func:`plan` picks exhaustive search when the space has
at most ``exhaustive_limit`` plans.

**Realized quality** (:class:`Realizer`) merges a plan for real (in memory, the same operator code as the engine)
and evaluates it: quality = mean_{t in T} score(M_k, t) / ref(t), with ref(t) the best own-task score of the base's
experts of t (same evaluator and n). Baselines (:func:`baselines`): all-at-once linear (equal weights) and TIES of
the same subset, random plans (order and operators drawn uniformly) over the same subset, the best fixed operator at
every step in the planner's order, and (small k) the exhaustive oracle over real merges.

**Multi-document recipes.** :func:`write_plan_recipe` writes one mergekit-format YAML document per step, separated by
``---``; each document carries a ``name`` (``step1``, ``step2``, ...) and a later step names an earlier result as
``"@<name>"`` (e.g. ``model: "@step1"``, also allowed in ``base_model``). ``simmerge merge plan.yml OUT`` runs
:func:`merge_multi`: each step is merged by the streaming engine into ``.OUT.steps/<name>`` (removed at the end
unless ``keep_steps``), the last document into ``OUT``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from .catalogue import Catalogue
from .labels import job_recipe, setting_label

#: Plans per search at or below which :func:`plan` searches exhaustively.
EXHAUSTIVE_LIMIT = 500
#: How a recipe document names an earlier step's result: ``"@" + name``.
REF_PREFIX = "@"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


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

    Returns ``{op: {task: yhat}}`` with an entry for every op in ``ops``."""

    def __call__(self, prefix: Plan, expert: str, ops: Sequence[OpChoice]) -> Mapping[OpChoice, Mapping[str, float]]:
        ...


class Planner:
    """Scores plans with a :class:`StepScorer` (memoized per (prefix, expert)) and searches over them.

    ``expert_tasks`` maps each candidate expert to its tasks; ``tasks`` are the target tasks T."""

    def __init__(self, scorer: StepScorer, expert_tasks: Mapping[str, Sequence[str]], tasks: Sequence[str],
                 ops: Sequence[OpChoice]):
        if not ops:
            raise ValueError("planner: no operator choices")
        self.scorer, self.tasks, self.ops = scorer, list(tasks), list(dict.fromkeys(ops))
        self.expert_tasks = {e: list(ts) for e, ts in expert_tasks.items()}
        self._memo: dict[tuple, Mapping[OpChoice, Mapping[str, float]]] = {}
        self.step_calls = 0

    @property
    def experts(self) -> list[str]:
        return list(self.expert_tasks)

    def _step(self, prefix: Plan, expert: str) -> Mapping[OpChoice, Mapping[str, float]]:
        key = (prefix.order, prefix.ops, expert)
        if key not in self._memo:
            self.step_calls += 1
            self._memo[key] = self.scorer(Plan(prefix.order, prefix.ops), expert, self.ops)
        return self._memo[key]

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


def _best(plans: Sequence[Plan]) -> list[Plan]:
    # NaN predictions sort last; ties broken by the plan key so that every search agrees on the winner.
    return sorted(plans, key=lambda p: (-(p.predicted if math.isfinite(p.predicted) else -np.inf), p.key()))


def exhaustive_search(planner: Planner, k: int, experts: Sequence[str] | None = None, progress: bool = False,
                      top: int = 1) -> list[Plan]:
    """Score every plan over k-subsets of ``experts`` (default: the planner's); the ``top`` best, best first."""
    pool = list(experts) if experts is not None else planner.experts
    total = count_plans(len(pool), len(planner.ops), k)
    scored = [planner.score(p) for p in tqdm(enumerate_plans(pool, planner.ops, k), total=total,
                                             desc=f"exhaustive k={k}", disable=not progress)]
    return _best(scored)[:top]


def beam_search(planner: Planner, k: int, width: int = 8, experts: Sequence[str] | None = None,
                progress: bool = False, top: int = 1) -> list[Plan]:
    """Grow plans one expert at a time, keeping the ``width`` best partial plans (by predicted quality) per depth."""
    pool = list(experts) if experts is not None else planner.experts
    if not 1 <= k <= len(pool):
        raise ValueError(f"k must be between 1 and {len(pool)}, got {k}")
    if width < 1:
        raise ValueError(f"beam width must be at least 1, got {width}")
    beam = _best([planner.start(e) for e in pool])[:width]
    for _ in tqdm(range(k - 1), desc=f"beam k={k} width={width}", disable=not progress):
        grown = [planner.extend(p, e, op) for p in beam for e in pool if e not in p.order for op in planner.ops]
        beam = _best(grown)[:width]
    return beam[:top]


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

    ``predictor`` is a :class:`simmerge_lib.predictor.Predictor` (or anything with ``feature_names`` and
    ``predict_rows(rows)`` over rows carrying the features, ``task``, ``method`` and ``p_*`` columns)."""

    def __init__(self, predictor: Any, catalogue: Catalogue, n_probes: int = 32, seed: int = 0,
                 cache: Any = None, merges: _Merges | None = None):
        from .features import ProbeCache

        self.predictor, self.catalogue, self.n_probes = predictor, catalogue, n_probes
        self.merges = merges or _Merges(catalogue, seed)
        self.cache = cache or ProbeCache(disk_dir=None)
        self._refs: dict[tuple, Any] = {}
        self._skeleton: dict[str, Any] = {}
        self.feature_rows: list[pd.DataFrame] = []  # every step's features (for inspection)
        self._tables: dict[tuple, dict[OpChoice, dict[str, float]]] = {}  # reused across searches

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
                    from .evaluate import load_model
                    from .checkpoint import quiet_transformers

                    with quiet_transformers():
                        self._skeleton[base] = load_model(self.catalogue.path(base))
                model, tok = self._skeleton[base]
                self._refs[key] = ModelRef.memory(model=model, state_dict=self.merges.state(plan),
                                                  name=plan.describe(), tokenizer=tok,
                                                  like=self.catalogue.path(base))
        return self._refs[key]

    def features(self, prefix: Plan, expert: str) -> pd.DataFrame:
        """The owner-oriented feature rows (chapter 04) of the pair (running model, expert), one per task of
        tasks(prefix) ∪ tasks(expert): the running model against the expert on the tasks it carries, the expert
        against the running model on its own."""
        from .features import STRUCTURAL_COLUMNS, ModelRef, pair_features, swap_structural
        from .probes import kit_probes

        owned, incoming = self._tasks(prefix.order), self._tasks([expert])
        base = self.catalogue.base_of(expert).name
        base_ref = self._refs.setdefault(("base", base), ModelRef.folder(self.catalogue.path(base), base))
        running, exp_ref = self._ref(prefix), self._ref(Plan((expert,)))
        probes = kit_probes(owned + incoming, self.n_probes)
        # one pass over the weights: the other orientation's structural features are these, swapped
        forward = pair_features(running, exp_ref, base_ref, base_ref, owned, probes=probes, cache=self.cache)
        forward["a"], forward["b"] = prefix.describe(), expert
        parts = [forward]
        if incoming:
            backward = pair_features(exp_ref, running, base_ref, base_ref, incoming, probes=probes, cache=self.cache,
                                     structural=False)
            swapped = swap_structural(forward[STRUCTURAL_COLUMNS].iloc[0].to_dict())
            backward = backward.assign(**{c: swapped[c] for c in STRUCTURAL_COLUMNS})
            backward["a"], backward["b"] = expert, prefix.describe()
            parts.append(backward)
        out = pd.concat(parts, ignore_index=True).assign(task_of_a=1.0)
        out["owner"], out["other"], out["pair"] = out.a, out.b, prefix.describe() + "|" + expert
        return out

    def __call__(self, prefix: Plan, expert: str, ops: Sequence[OpChoice]) -> dict[OpChoice, dict[str, float]]:
        key = (prefix.order, prefix.ops, expert, tuple(ops))
        if key in self._tables:
            return self._tables[key]
        feats = self.features(prefix, expert)
        self.feature_rows.append(feats)
        predicted = self.predictor.predict_rows(feats)
        out: dict[OpChoice, dict[str, float]] = {}
        for op in ops:
            name = f"{op.method}|{setting_label(op.setting)}"
            if name not in predicted.columns:
                raise ValueError(f"the predictor has no candidate {name!r} (it knows {list(self.predictor.candidates)})")
            out[op] = dict(zip(feats.task, predicted[name].astype(float)))
        self._tables[key] = out
        return out


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


def prepare(profile: str, progress: bool = True) -> tuple[Catalogue, pd.DataFrame, Any]:
    """The chapter's inputs for a profile: the catalogue, its labels (both via chapter 04's
    :func:`simmerge_lib.predictor.load_tables`, which builds what is missing) and a predictor
    (:func:`load_or_fit_predictor`)."""
    from .predictor import load_tables

    features, labels, reference, catalogue = load_tables(profile, progress=progress)
    return catalogue, labels, load_or_fit_predictor(profile, features, labels, reference)


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
    """A search's outcome: the best plan, the runners-up, how it was searched and what it cost."""

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
         progress: bool = False) -> PlanResult:
    """The best predicted plan of k experts for ``tasks`` (over each base, or only ``base``)."""
    unknown = sorted(set(tasks) - set(catalogue.tasks))
    if unknown:
        raise ValueError(f"task(s) {unknown} not in catalogue {catalogue.name!r} (its tasks: {catalogue.tasks})")
    bases = [base] if base else [b.name for b in catalogue.bases()]
    results = []
    for b in bases:
        pool = candidate_experts(catalogue, tasks, b)
        if len(pool) < k:
            continue
        planner = Planner(scorer, pool, tasks, ops)
        space = count_plans(len(pool), len(planner.ops), k)
        if space <= exhaustive_limit:
            ranked, how = exhaustive_search(planner, k, progress=progress, top=top), "exhaustive"
        else:
            ranked, how = beam_search(planner, k, beam_width, progress=progress, top=top), "beam"
        results.append(PlanResult(ranked[0], ranked, b, list(tasks), how, space, planner.step_calls))
    if not results:
        raise ValueError(f"no base of catalogue {catalogue.name!r} has {k} experts serving {list(tasks)}")
    return _best_result(results)


def _best_result(results: Sequence[PlanResult]) -> PlanResult:
    return sorted(results, key=lambda r: (-(r.plan.predicted if math.isfinite(r.plan.predicted) else -np.inf),
                                          r.base))[0]


# ============================================================================================ real merges
class Realizer:
    """Merges plans for real (in memory) and evaluates them on the target tasks (labelled data: baselines only).

    quality(M) = mean_{t in T} score(M, t) / ref(t), ref(t) = the best own-task score of the base's experts of t."""

    def __init__(self, catalogue: Catalogue, tasks: Sequence[str], n_eval: int = 50, seed: int = 0,
                 merges: _Merges | None = None):
        from .evaluate import resolve_evaluator

        self.catalogue, self.tasks, self.n_eval = catalogue, list(tasks), n_eval
        self.merges = merges or _Merges(catalogue, seed)
        self.evaluator = resolve_evaluator(catalogue.evaluator)
        self._skeleton: dict[str, Any] = {}
        self._ref: dict[tuple[str, str], float] = {}
        self._cache: dict[tuple, dict[str, float]] = {}
        self.evaluations = 0

    def _model(self, base: str) -> Any:
        if base not in self._skeleton:
            from .evaluate import load_model
            from .checkpoint import quiet_transformers

            with quiet_transformers():
                self._skeleton[base] = load_model(self.catalogue.path(base))
        return self._skeleton[base]

    def scores(self, state: Mapping[str, torch.Tensor], base: str, key: tuple | None = None) -> dict[str, float]:
        """Raw scores of a state dict (a model of ``base``'s architecture) on the target tasks."""
        if key is not None and key in self._cache:
            return self._cache[key]
        from .evaluate import evaluate_state_dict

        model, tok = self._model(base)
        frame = evaluate_state_dict(model, tok, dict(state), self.tasks, self.n_eval, self.evaluator)
        self.evaluations += 1
        out = dict(zip(frame.task, frame.score.astype(float)))
        if key is not None:
            self._cache[key] = out
        return out

    def reference(self, base: str, task: str) -> float:
        """ref(t): the best score on ``task`` of the base's experts of that task (NaN when there is none)."""
        if (base, task) not in self._ref:
            best = float("nan")
            for e in self.catalogue.experts(base):
                if task in e.tasks:
                    s = self.scores(self.merges.expert(e.name), base, ("expert", e.name))[task]
                    best = s if not math.isfinite(best) else max(best, s)
            self._ref[(base, task)] = best
        return self._ref[(base, task)]

    def quality_of(self, state: Mapping[str, torch.Tensor], base: str, key: tuple | None = None) -> float:
        """Mean normalized score over the target tasks (tasks whose ref is NaN or 0 are skipped)."""
        raw = self.scores(state, base, key)
        vals = []
        for t in self.tasks:
            ref = self.reference(base, t)
            if math.isfinite(ref) and ref > 0:
                vals.append(raw[t] / ref)
        return float(np.mean(vals)) if vals else float("nan")

    def quality(self, plan: Plan) -> float:
        """Realized quality of a plan (merged by its left fold)."""
        base = self.catalogue.base_of(plan.order[0]).name
        return self.quality_of(self.merges.state(plan), base, ("plan", plan.order, plan.ops))

    def all_at_once(self, experts: Sequence[str], method: str, setting: Mapping[str, Any] | None = None) -> float:
        """Realized quality of one k-way merge of ``experts``: ``linear`` with equal weights, or a task-vector method
        (TIES, task arithmetic, ...) over the shared base with ``setting``'s per-model / global parameters."""
        from .operators import get_operator, merge_state_dicts

        base = self.catalogue.base_of(experts[0]).name
        op = get_operator(method)
        setting = dict(setting or {})
        per_model = {k: v for k, v in setting.items() if k in op.model_params}
        glob = {k: v for k, v in setting.items() if k in op.global_params}
        merged = merge_state_dicts(method, [self.merges.expert(e) for e in experts],
                                   self.merges.expert(base) if op.needs_base else None,
                                   [dict(per_model) for _ in experts], glob, self.merges.layers(base))
        return self.quality_of(merged, base, ("all", tuple(experts), method, tuple(sorted(setting.items()))))


def random_plans(experts: Sequence[str], ops: Sequence[OpChoice], n: int, seed: int = 0) -> list[Plan]:
    """``n`` plans over ``experts`` with a uniformly random order and operator per step."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        order = list(experts)
        rng.shuffle(order)
        out.append(Plan(tuple(order), tuple(rng.choice(list(ops)) for _ in range(len(order) - 1))))
    return out


def oracle_search(realizer: Realizer, experts: Sequence[str], ops: Sequence[OpChoice], progress: bool = False
                  ) -> tuple[Plan, float, list[tuple[Plan, float]]]:
    """Exhaustive search over real merges of every order × operator sequence of ``experts``: (best, its quality,
    all (plan, quality))."""
    plans = list(enumerate_plans(experts, ops))
    results = [(p, realizer.quality(p)) for p in tqdm(plans, desc="oracle (real merges)", disable=not progress)]
    best = sorted(results, key=lambda r: (-(r[1] if math.isfinite(r[1]) else -np.inf), r[0].key()))[0]
    return best[0], best[1], results


def baselines(realizer: Realizer, chosen: Plan, ops: Sequence[OpChoice], fixed_op: OpChoice | None = None,
              n_random: int = 5, oracle_max_plans: int = 0, ties_setting: Mapping[str, Any] | None = None,
              seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Real-merge baselines for the chosen plan's subset (see the module docstring). Keys: planner_quality,
    all_at_once_linear, all_at_once_ties, random_order_quality (mean), random_order_qualities, fixed_op,
    fixed_op_quality (None without ``fixed_op``), oracle_quality / oracle_plan (None when the space exceeds
    ``oracle_max_plans``)."""
    subset = sorted(chosen.order)
    out: dict[str, Any] = {"planner_quality": realizer.quality(chosen)}
    out["all_at_once_linear"] = realizer.all_at_once(subset, "linear")
    out["all_at_once_ties"] = realizer.all_at_once(subset, "ties", ties_setting or {"density": 0.5, "lambda": 1.0})
    rand = [realizer.quality(p) for p in random_plans(subset, ops, n_random, seed)] if chosen.k > 1 else []
    out["random_order_qualities"] = rand
    out["random_order_quality"] = float(np.mean(rand)) if rand else None
    if fixed_op is not None and chosen.k > 1:
        out["fixed_op"] = fixed_op.label
        out["fixed_op_quality"] = realizer.quality(Plan(chosen.order, tuple(fixed_op for _ in chosen.ops)))
    else:
        out["fixed_op"], out["fixed_op_quality"] = None, None
    space = count_plans(len(subset), len(ops))
    if chosen.k > 1 and space <= oracle_max_plans:
        best, q, _ = oracle_search(realizer, subset, ops, progress)
        out["oracle_quality"], out["oracle_plan"] = q, best.describe()
    else:
        out["oracle_quality"], out["oracle_plan"] = None, None
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
        docs.append(_map_models(doc, lambda n: n if n.startswith(REF_PREFIX) else str(catalogue.path(n).resolve())))
    return docs


def _map_models(doc: Mapping[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    out = dict(doc)
    out["models"] = [{**m, "model": fn(m["model"])} if isinstance(m, Mapping) else fn(m) for m in doc["models"]]
    for key in ("base_model", "tokenizer_source"):
        if isinstance(out.get(key), str) and out[key] != "base":
            out[key] = fn(out[key])
    return out


def write_plan_recipe(plan_: Plan, catalogue: Catalogue, path: str | os.PathLike[str], seed: int = 0,
                      comment: str | None = None) -> Path:
    """Write the plan as a multi-document YAML recipe (atomically); ``simmerge merge`` executes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = "".join(f"# {line}\n" for line in (comment or plan_.describe()).splitlines())
    text = head + yaml.safe_dump_all(plan_documents(plan_, catalogue, seed), sort_keys=False, explicit_start=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def read_documents(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The documents of a (multi-document) recipe file, checked: names unique and well-formed, every ``@name``
    reference naming an earlier document. A single document without ``name`` is returned as is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: recipe file not found")
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({str(exc).replace(chr(10), ' ')})") from None
    if not docs:
        raise ValueError(f"{path}: no recipe document")
    seen: list[str] = []
    for i, doc in enumerate(docs, start=1):
        if not isinstance(doc, Mapping):
            raise ValueError(f"{path}: document {i} is not a mapping")
        name = doc.get("name", f"step{i}" if len(docs) > 1 else None)
        if name is not None and (not isinstance(name, str) or not _NAME_RE.match(name)):
            raise ValueError(f"{path}: document {i} has an invalid name {name!r} (letters, digits, _ . -)")
        if name in seen:
            raise ValueError(f"{path}: document {i} repeats the name {name!r}")
        for ref in _references(doc):
            if ref not in seen:
                raise ValueError(f"{path}: document {i} names {REF_PREFIX}{ref}, which is not an earlier document "
                                 f"(earlier: {seen or 'none'})")
        seen.append(name)
    return [dict(d) for d in docs]


def _references(doc: Mapping[str, Any]) -> list[str]:
    names = [m.get("model") if isinstance(m, Mapping) else m for m in doc.get("models") or []]
    names += [doc.get("base_model"), doc.get("tokenizer_source")]
    return [n[len(REF_PREFIX):] for n in names if isinstance(n, str) and n.startswith(REF_PREFIX)]


def is_multi_document(path: str | os.PathLike[str]) -> bool:
    """Whether a recipe file holds several documents (or a named one): then :func:`merge_multi` runs it."""
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except (OSError, yaml.YAMLError):
        return False  # let the single-recipe path report the problem
    return len(docs) > 1 or (len(docs) == 1 and isinstance(docs[0], Mapping) and "name" in docs[0])


def merge_multi(path: str | os.PathLike[str], out: str | os.PathLike[str], keep_steps: bool = False,
                force: bool = False, resume: bool = False, **engine_kwargs: Any) -> Path:
    """Execute a multi-document recipe with the streaming engine: each document in order, ``@name`` references
    resolved to the earlier outputs, intermediates under ``.OUT.steps/`` (removed unless ``keep_steps``), the last
    document into ``out``. ``resume`` keeps finished intermediate steps of an interrupted run."""
    from .engine import merge
    from .recipe import Recipe

    path, out = Path(path), Path(out)
    docs = read_documents(path)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (pass --force to overwrite)")
    steps_dir = out.parent / f".{out.name}.steps"
    outputs: dict[str, str] = {}
    for i, doc in enumerate(docs, start=1):
        name = doc.pop("name", f"step{i}")
        resolved = _map_models(doc, lambda n: outputs[n[len(REF_PREFIX):]] if n.startswith(REF_PREFIX) else n)
        recipe = Recipe.from_dict(resolved, root=path.resolve().parent, source=f"{path} (document {i}: {name})")
        last = i == len(docs)
        target = out if last else steps_dir / name
        if not last and resume and target.is_dir() and (target / "config.json").is_file():
            outputs[name] = str(target.resolve())
            continue
        merge(recipe, target, force=force if last else True, resume=resume, **engine_kwargs)
        outputs[name] = str(target.resolve())
    if not keep_steps and steps_dir.exists():
        shutil.rmtree(steps_dir)
    return out


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
    result = plan(catalogue, tasks, args.k, scorer, ops, base=args.base, beam_width=args.beam,
                  exhaustive_limit=args.exhaustive_limit, top=args.top, progress=not args.quiet)
    best = result.plan
    print(f"# plan of {args.k} experts of {result.base} for {', '.join(tasks)} ({result.method} search over "
          f"{result.space} plans, {result.step_calls} scored steps; predictor: {predictor.family})")
    for rank, p in enumerate(result.ranked, start=1):
        print(f"{rank:>2}  predicted {p.predicted:.3f}  {p.describe()}")
    print("per-task predicted: " + ", ".join(f"{t}={v:.3f}" for t, v in best.task_predicted))
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
#: The settings of each operator searched in the study: one each, so that the exhaustive oracle stays affordable.
STUDY_SETTINGS: dict[str, list[dict[str, float]]] = {
    "linear": [{"weight": 0.5}], "slerp": [{"t": 0.5}], "task_arithmetic": [{"lambda": 1.0}],
    "ties": [{"density": 0.5}], "dare_linear": [{"density": 0.5}], "dare_ties": [{"density": 0.5}]}


def study_ops(predictor: Any, methods: Sequence[str] | None = None) -> list[OpChoice]:
    """The study's candidates: per operator of the predictor, its :data:`STUDY_SETTINGS` that the predictor knows
    (else its first setting)."""
    by_method: dict[str, list[OpChoice]] = {}
    for op in predictor_ops(predictor, methods):
        by_method.setdefault(op.method, []).append(op)
    out = []
    for method, choices in by_method.items():
        wanted = [OpChoice.make(method, s) for s in STUDY_SETTINGS.get(method, [])]
        known = [op for op in wanted if op in choices]
        out += known or choices[:1]
    return out


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
                   progress: bool = True, scorer: PredictorScorer | None = None) -> dict[int, dict[str, Any]]:
    """For each k: target tasks = the catalogue's first k tasks, plan k experts with the predictor (no evaluation),
    then merge for real: the chosen plan, the ``top_realized`` best predicted plans (planned vs realized), and every
    baseline (:func:`baselines`). k values with no base holding k experts for the tasks are reported as skipped.
    Pass a ``scorer`` used before to reuse its predicted steps and prefix merges."""
    import time

    if scorer is None:
        scorer = PredictorScorer(predictor, catalogue, n_probes=n_probes, seed=seed)
    merges = scorer.merges
    out: dict[int, dict[str, Any]] = {}
    for k in ks:
        tasks = list(catalogue.tasks[:k])
        if len(tasks) < k:
            out[k] = {"skipped": f"the catalogue has only {len(catalogue.tasks)} tasks"}
            continue
        t0 = time.perf_counter()
        try:
            result = plan(catalogue, tasks, k, scorer, ops, beam_width=beam_width,
                          exhaustive_limit=exhaustive_limit, top=max(top_realized, 1), progress=progress)
        except ValueError as exc:
            out[k] = {"skipped": str(exc)}
            continue
        plan_seconds = time.perf_counter() - t0
        realizer = Realizer(catalogue, tasks, n_eval=n_eval, seed=seed, merges=merges)
        t1 = time.perf_counter()
        row: dict[str, Any] = {"chosen": result.plan, "tasks": tasks, "base": result.base, "search": result.method,
                               "space": result.space,
                               "step_calls": result.step_calls, "plan": result.plan.describe(),
                               "predicted_quality": result.plan.predicted, "plan_seconds": plan_seconds}
        row.update(baselines(realizer, result.plan, ops, fixed_op, n_random, oracle_max_plans, seed=seed,
                             progress=progress))
        row["ranked"] = [{"plan": p.describe(), "predicted": p.predicted, "realized": realizer.quality(p)}
                         for p in result.ranked[:top_realized]]
        row["baseline_seconds"] = time.perf_counter() - t1
        row["evaluations"] = realizer.evaluations
        out[k] = row
    return out


def study_frame(study: Mapping[int, Mapping[str, Any]]) -> pd.DataFrame:
    """The study as a long table: k, approach, quality (realized; ``predicted`` is the planner's prediction)."""
    names = {"predicted_quality": "planner (predicted)", "planner_quality": "planner (realized)",
             "all_at_once_linear": "all-at-once linear", "all_at_once_ties": "all-at-once TIES",
             "random_order_quality": "random plans (mean)", "fixed_op_quality": "best fixed operator",
             "oracle_quality": "oracle (real merges)"}
    rows = []
    for k, r in study.items():
        for key, label in names.items():
            if r.get(key) is not None:
                rows.append({"k": int(k), "approach": label, "quality": float(r[key])})
    return pd.DataFrame(rows, columns=["k", "approach", "quality"])
