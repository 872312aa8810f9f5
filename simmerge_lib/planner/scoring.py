"""The predictor as a step scorer: features of the running merged model against the next expert, computed on
the fly (or read from the catalogue's features table), predicted by the chapter-04 predictor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..catalogue import Catalogue
from ..checkpoint import quiet_transformers
from ..evaluate import load_model
from ..features import STRUCTURAL_COLUMNS, ModelRef, ProbeCache, pair_features, swap_structural
from ..operators import Candidate
from ..predictor import PREDICTOR_FORMAT, fit_predictor, load_predictor, predictor_path, training_table
from ..probes import kit_probes
from .merges import Merges
from .plans import Plan


class PredictorScorer:
    """Step scorer backed by the chapter-04 predictor: features of the running merged model (built in memory) against
    the next expert, on the probes of tasks(prefix) ∪ tasks(expert), then ``predictor.predict_rows`` per candidate.

    ``predictor`` is a :class:`simmerge_lib.predictor.Predictor` (or anything with ``feature_names``, ``candidates``
    and ``predict_rows(rows)`` returning one column per candidate and ``keep_other``). ``table``: the catalogue's
    features table (chapter 01), read for steps between two experts instead of recomputing them (its probe count
    must be ``n_probes``). Every step's rows are computed once (a first step and its swapped twin share them) and a
    :meth:`batch` of steps is predicted in one call."""

    def __init__(self, predictor: Any, catalogue: Catalogue, n_probes: int = 32, seed: int = 0,
                 cache: Any = None, merges: Merges | None = None, table: pd.DataFrame | None = None):
        self.predictor, self.catalogue, self.n_probes = predictor, catalogue, n_probes
        self.merges = merges or Merges(catalogue, seed)
        self.cache = cache or ProbeCache(disk_dir=None)
        self._refs: dict[tuple, Any] = {}
        self._skeleton: dict[str, Any] = {}
        self.feature_rows: list[pd.DataFrame] = []  # every step's features (for inspection)
        self._rows: dict[tuple, pd.DataFrame] = {}  # feature rows per step (and per keep request)
        self._tables: dict[tuple, dict[Candidate, dict[str, float]]] = {}  # reused across searches
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
        key = (plan.order, plan.ops)
        if key not in self._refs:
            if plan.k == 1:
                self._refs[key] = ModelRef.folder(self.catalogue.path(plan.order[0]), plan.order[0])
            else:
                base = self.catalogue.base_of(plan.order[0]).name
                if base not in self._skeleton:
                    with quiet_transformers():
                        self._skeleton[base] = load_model(self.catalogue.path(base))
                model, tok = self._skeleton[base]
                self._refs[key] = ModelRef.memory(model=model, state_dict=self.merges.state(plan),
                                                  name=plan.describe(), tokenizer=tok,
                                                  like=self.catalogue.path(base))
        return self._refs[key]

    def _base_ref(self, expert: str) -> Any:
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

    def batch(self, requests: Sequence[tuple[Plan, str]], ops: Sequence[Candidate]
              ) -> list[dict[Candidate, dict[str, float]]]:
        """Step tables of many (prefix, expert) requests: their feature rows, then one prediction for all."""
        names = {op: op.key for op in ops}
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

    def __call__(self, prefix: Plan, expert: str, ops: Sequence[Candidate]) -> dict[Candidate, dict[str, float]]:
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


def predictor_ops(predictor: Any, methods: Sequence[str] | None = None) -> list[Candidate]:
    """The predictor's candidates (``method|setting``) as :class:`Candidate`, optionally only some methods."""
    ops = [Candidate.make(*name.split("|", 1)) for name in predictor.candidates]
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
