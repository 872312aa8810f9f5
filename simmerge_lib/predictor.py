"""Chapter 04 — the SimMerge predictor: choose a pair's merge from cheap similarity signals, without merging.

**Rows.** Merge quality averages the parents' tasks, and each task belongs to one parent, its *owner*. So the
predictor reads one row per pair × parent task, *owner-oriented*: the features row ``(owner, other, task)`` of
chapter 01 (how the owner and the other expert compare on that task's probes, how far each moved from its base
there, how their task vectors relate). The question a row answers: *does the owner's skill survive merging with the
other expert, under each candidate?* Nothing depends on the order in which the catalogue lists the two experts, and
the row names no task: an unseen task is described by its probes (:data:`~simmerge_lib.features.FEATURE_DOCS`).

**Targets** of a row (owner o, other x, task t): y_c = norm_score(merge_c(o, x), t) for every candidate c of the
labels (chapter 03), and y_keep = norm_score(x alone, t), what keeping the *other* expert would leave of this task
(from the labels' reference table).

**Models** (scikit-learn; one multi-output model each, so one fit serves every candidate):

* *advantage*: y_c - mean_c y_c for all candidates at once: which candidate is better *for this row* (the row's
  difficulty, shared by every candidate, is removed: it carries no information about the choice);
* *level*: (mean_c y_c, y_keep): how well this row merges at all, and what the other parent alone keeps;
* a *classifier* of the pair's best candidate (pair level: both owner rows' features, averaged), P̂(c).

**Selection.** Q̂(c) = mean over the pair's rows of (level + advantage_c). The choice is the argmax of

    score(c) = Q̂(c) + v (P̂(c) - 1/|C|) + m [c = best fixed],

two views of the same question — how good each candidate is, and which one is best — combined at a scale fixed on
the training pairs: v = |C| x the standard deviation of the pairs' measured advantages (a classifier sure of a
candidate is worth about one typical advantage). The best fixed candidate of the training pairs gets a head start
``margin`` m (a hedge against predicted noise). *Keep the
better parent* is predicted too: Q̂_keep(p) = ½ [1 + ŷ_keep(row of the task p does not own)] (a parent keeps its own
task fully); when no candidate is predicted to beat it, the predictor *abstains* and advises keeping that parent.

**Protocol** (:func:`nested_evaluation`). Leave-one-task-out (every pair with the held-out task is tested; nothing
with it is trained on) and leave-one-expert-out (every pair with the held-out expert is tested; pairs with it *or
its siblings* — the same task on the same base — are not trained on). The model family and the feature set are
chosen inside each split by grouped cross-validation on its training pairs, and so is the margin: nothing scored
reaches a choice. Every split is checked by :func:`check_split`. Per held-out pair: chosen quality, oracle
(max_c Q_c), best fixed (the training pairs' best candidate), and the baselines of :data:`BASELINES`.
*Gap closure* = (mean chosen - mean best fixed) / (mean oracle - mean best fixed); confidence intervals come from a
*cluster* bootstrap over the held-out groups (tasks, or experts), because pairs sharing a task or an expert are
correlated (:func:`cluster_bootstrap_ci`).

**Persistence** with skops (:func:`save_predictor`, :func:`load_predictor`): loading checks every type in the file
against :data:`TRUSTED_TYPES` and refuses anything else (no arbitrary pickle code runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import ExtraTreesRegressor, RandomForestClassifier, RandomForestRegressor
from sklearn.impute import SimpleImputer
from sklearn.linear_model import RidgeCV
from sklearn.multioutput import MultiOutputRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from .checkpoint import atomic_folder, write_json_atomic
from .features import DESCRIPTOR_COLUMNS, FEATURE_COLUMNS
from .paths import build_path

#: Model families compared inside each split.
FAMILIES = ("ridge", "forest", "extra")
#: Hedge margins compared inside each split (the best fixed candidate's head start).
MARGINS = (0.0, 0.005, 0.01, 0.02)
#: Feature sets compared inside each split: every signal, or only the functional (probe) ones.
FEATURE_SETS = ("all", "functional")
#: A choice within ``TOL`` of the oracle is a hit; wins and losses need a margin > ``TOL``.
TOL = 0.01
PREDICTOR_FORMAT = 4
#: The baselines every evaluation reports beside SimMerge (columns of the records, see :func:`evaluate_split`).
BASELINES = ("best_fixed", "keep_parent", "task_pair_lookup", "ablation", "classifier", "oracle")
#: A pair's rows are joined on these columns; a candidate is named ``method|setting``.
ROW_KEYS = ["pair", "task"]

#: Types (beyond skops' defaults) a predictor file may contain; anything else makes :func:`load_predictor` refuse.
TRUSTED_TYPES = [
    "numpy.dtype", "numpy.ndarray", "numpy.float64", "numpy.int64", "numpy.random.mtrand.RandomState",
    "numpy.random._pcg64.PCG64", "numpy.random._mt19937.MT19937", "builtins.slice", "builtins.object",
    "sklearn.tree._tree.Tree", "sklearn.utils._bunch.Bunch", "collections.OrderedDict",
]


def _quiet(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run with BLAS / OpenMP pools limited to one thread: on tables this small, thread start-up and contention
    (on a shared laptop CPU) cost far more than the arithmetic."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with threadpool_limits(limits=1), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nan-means over all-NaN imputed columns
            return fn(*args, **kwargs)

    wrapper.__doc__, wrapper.__name__ = fn.__doc__, fn.__name__
    return wrapper


# ============================================================================================ the training table
def pair_key(a: pd.Series | str, b: pd.Series | str) -> pd.Series | str:
    """The key of a pair: ``"a|b"`` (labels write a pair in catalogue order)."""
    return a + "|" + b


def feature_columns(frame: pd.DataFrame, feature_set: str = "all") -> list[str]:
    """The feature columns present in ``frame`` (``fn_*`` / ``st_*``, in :data:`FEATURE_COLUMNS` order first);
    ``feature_set="functional"`` keeps the ``fn_*`` ones only."""
    known = [c for c in FEATURE_COLUMNS if c in frame.columns]
    extra = sorted(c for c in frame.columns if c.startswith(("fn_", "st_")) and c not in known)
    cols = known + extra
    if feature_set == "functional":
        return [c for c in cols if c.startswith("fn_")]
    if feature_set != "all":
        raise ValueError(f"feature_set must be one of {FEATURE_SETS}, got {feature_set!r}")
    return cols


def candidate_name(method: str | pd.Series, setting: str | pd.Series) -> str | pd.Series:
    return method + "|" + setting


def owner_rows(features: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """The owner-oriented feature rows of ``pairs`` (columns a, b, task: the pair in catalogue order and one of its
    parent tasks): the features row (x, y, task) with x the parent that owns the task (``task_of_a == 1``).

    Adds columns pair, owner, other. Raises when a pair × task has no such row (features of another catalogue)."""
    feats = features[features.task_of_a == 1]
    cols = ["a", "b", "task", *[c for c in features.columns if c.startswith(("fn_", "st_"))]]
    oriented = feats[cols].rename(columns={"a": "owner", "b": "other"}).drop_duplicates(["owner", "other", "task"])
    rows = pairs[["a", "b", "task"]].drop_duplicates().copy()
    rows["pair"] = pair_key(rows.a, rows.b)
    forward = rows.merge(oriented, left_on=["a", "b", "task"], right_on=["owner", "other", "task"], how="inner")
    backward = rows.merge(oriented, left_on=["b", "a", "task"], right_on=["owner", "other", "task"], how="inner")
    out = pd.concat([forward, backward], ignore_index=True).drop_duplicates(ROW_KEYS)
    if len(out) < len(rows):
        missing = rows.merge(out[ROW_KEYS], on=ROW_KEYS, how="left", indicator=True).query("_merge == 'left_only'")
        examples = sorted(missing.pair + "/" + missing.task)[:3]
        raise ValueError(f"{len(missing)} pair × task(s) have no owner-oriented features row (e.g. {examples}): "
                         "compute features with tasks='parents' for both orders of every pair of the labels")
    return out.reset_index(drop=True)


def training_table(features: pd.DataFrame, labels: pd.DataFrame, reference: pd.DataFrame | None = None
                   ) -> pd.DataFrame:
    """One row per same-base pair × parent task, owner-oriented (:func:`owner_rows`), with the targets.

    Columns: pair, a, b, task, owner, other, base_a, base_b, the feature columns, ``y__<method|setting>`` per
    candidate (the merge's normalized score on the task) and, given the labels' ``reference`` table,
    ``keep_other`` (the other expert alone on the task, normalized the same way). Cross-base pairs are left out:
    there every merge fails and choosing among failures teaches nothing."""
    needed = ["a", "b", "task", "method", "setting", "parameters", "parent_task", "norm_score", "same_base",
              "base_a", "base_b", "score", "n_eval"]
    missing = [c for c in needed if c not in labels.columns]
    if missing:
        raise ValueError(f"labels table: missing column(s) {missing}")
    for col in ("a", "b", "task", "task_of_a"):
        if col not in features.columns:
            raise ValueError(f"features table: missing column {col!r}")
    lab = labels[labels.parent_task.astype(bool) & labels.same_base.astype(bool)].dropna(subset=["norm_score"])
    if lab.empty:
        raise ValueError("labels table: no same-base pair with a normalized score")
    lab = lab.assign(candidate=candidate_name(lab.method, lab.setting))
    y = lab.pivot_table(index=["a", "b", "task"], columns="candidate", values="norm_score", aggfunc="mean")
    y.columns = [f"y__{c}" for c in y.columns]
    info = lab.drop_duplicates(["a", "b"])[["a", "b", "base_a", "base_b"]]
    rows = owner_rows(features, y.reset_index()[["a", "b", "task"]])
    table = rows.merge(info, on=["a", "b"]).merge(y.reset_index(), on=["a", "b", "task"])
    if reference is not None:
        # normalizer of the task: the owner's own score (score / norm_score of any job of the pair)
        ref = (lab.score / lab.norm_score).groupby([lab.a, lab.b, lab.task]).median().rename("ref").reset_index()
        n = lab.groupby(["a", "b"]).n_eval.first().rename("n_eval").reset_index()
        alone = reference[["model", "task", "n_eval", "score"]].rename(columns={"model": "other",
                                                                                 "score": "other_score"})
        table = table.merge(ref, on=["a", "b", "task"]).merge(n, on=["a", "b"])
        table = table.merge(alone, on=["other", "task", "n_eval"], how="left")
        table["keep_other"] = table.other_score / table.ref
        table = table.drop(columns=["ref", "n_eval", "other_score"])
    return table.sort_values(["pair", "task"], kind="stable").reset_index(drop=True)


def candidates_of(table: pd.DataFrame) -> list[str]:
    """The candidates (``method|setting``) of a training table, in column order."""
    return [c[3:] for c in table.columns if c.startswith("y__")]


def pair_quality(table: pd.DataFrame) -> pd.DataFrame:
    """Per pair × candidate: the measured merge quality (the mean over the pair's rows). Index pair, columns
    candidates."""
    ys = [f"y__{c}" for c in candidates_of(table)]
    q = table.groupby("pair", sort=False)[ys].mean()
    q.columns = [c[3:] for c in q.columns]
    return q


def keep_parent_quality(table: pd.DataFrame) -> pd.Series:
    """Per pair: keeping the better parent, measured: max over parents p of ½ [1 + keep_other(row p does not own)]
    (NaN without a ``keep_other`` column)."""
    if "keep_other" not in table.columns:
        return pd.Series(np.nan, index=table.pair.unique())
    # the row of task t keeps `other` alone: that is parent `other` keeping its own task (1) and t (keep_other)
    per_parent = table.assign(q=(1.0 + table.keep_other) / 2).groupby(["pair", "other"]).q.mean()
    return per_parent.groupby(level=0, sort=False).max()


# ================================================================================================ the models
def _regressor(family: str, seed: int) -> Any:
    """A multi-output regressor. The forests fit one forest per output: a shared forest would split on what moves
    every candidate's score at once (the row's difficulty), not on what separates them."""
    if family == "ridge":
        return RidgeCV(alphas=np.logspace(-2, 3, 11))
    if family == "forest":
        return MultiOutputRegressor(RandomForestRegressor(n_estimators=60, min_samples_leaf=4, max_features=0.5,
                                                          random_state=seed, n_jobs=1))
    if family == "extra":
        return MultiOutputRegressor(ExtraTreesRegressor(n_estimators=60, min_samples_leaf=4, max_features=0.5,
                                                        random_state=seed, n_jobs=1))
    raise ValueError(f"unknown model family {family!r}; expected one of {list(FAMILIES)}")


def _pipeline(estimator: Any, numeric: Sequence[str], categorical: Sequence[str] = ()) -> Pipeline:
    """Impute (median) and scale the numeric columns, one-hot the categorical ones (an unseen value → all zeros),
    then the estimator."""
    num = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler())
    parts: list[tuple[str, Any, list[str]]] = [("num", num, list(numeric))]
    if categorical:
        parts.append(("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=False), list(categorical)))
    return Pipeline([("prep", ColumnTransformer(parts)), ("model", estimator)])


@dataclass
class Predictor:
    """A fitted SimMerge predictor (see the module docstring): advantage and level models over owner-oriented rows.

    ``constant`` lists inputs replaced by their training median (the ablation); ``task_conditioned`` adds the task's
    one-hot to the inputs (a variant that may look the task up; the headline predictor names no task)."""

    family: str
    feature_names: list[str]
    candidates: list[str]
    advantage: Pipeline
    level: Pipeline
    fixed: str
    margin: float = 0.0
    task_conditioned: bool = False
    constant: dict[str, float] = field(default_factory=dict)
    classifier: Pipeline | None = None
    vote_weight: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def inputs(self) -> list[str]:
        return [*self.feature_names, *(["task"] if self.task_conditioned else [])]

    def _x(self, rows: pd.DataFrame) -> pd.DataFrame:
        missing = [c for c in self.feature_names if c not in rows.columns]
        if missing:
            raise ValueError(f"rows lack the predictor's input column(s) {missing[:5]}{' …' if len(missing) > 5 else ''}")
        x = rows[self.inputs].copy()
        for col, value in self.constant.items():
            x[col] = value
        return x

    @_quiet
    def predict_rows(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Per owner-oriented row: predicted normalized score of every candidate, and ``keep_other``."""
        x = self._x(rows)
        level = self.level.predict(x)
        adv = self.advantage.predict(x)
        out = pd.DataFrame(adv + level[:, [0]], columns=self.candidates, index=rows.index)
        out["keep_other"] = level[:, 1]
        return out

    def rank(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Per pair of ``rows`` and candidate: ``predicted`` quality Q̂, ``score`` (+ ``margin`` for the best fixed
        candidate) and ``rank`` (1 = chosen). Columns pair, candidate, method, setting, predicted, score, rank."""
        pred = self.predict_rows(rows)
        q = pred[self.candidates].groupby(rows.pair.to_numpy(), sort=False).mean()
        long = q.stack().rename("predicted").reset_index()
        long.columns = ["pair", "candidate", "predicted"]
        long["score"] = long.predicted + np.where(long.candidate == self.fixed, self.margin, 0.0)
        if self.classifier is not None and self.vote_weight:
            votes = self.vote(rows).stack().rename("vote").reset_index()
            votes.columns = ["pair", "candidate", "vote"]
            long = long.merge(votes, on=["pair", "candidate"], how="left")
            long["score"] += self.vote_weight * (long.vote.fillna(0.0) - 1.0 / len(self.candidates))
            long = long.drop(columns="vote")
        long = long.sort_values(["pair", "score"], ascending=[True, False], kind="stable")
        long["rank"] = long.groupby("pair", sort=False).cumcount() + 1
        long[["method", "setting"]] = long.candidate.str.split("|", n=1, expand=True)
        return long.reset_index(drop=True)

    def keep_parent(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Per pair: the predicted quality of keeping each parent alone, and the better one (columns pair, parent,
        keep_predicted)."""
        pred = self.predict_rows(rows)
        per_parent = ((1.0 + pred.keep_other) / 2).groupby([rows.pair.to_numpy(), rows.other.to_numpy()]).mean()
        best = per_parent.groupby(level=0, sort=False).idxmax()
        return pd.DataFrame({"pair": best.index, "parent": [i[1] for i in best],
                             "keep_predicted": per_parent.loc[list(best)].to_numpy()})

    def recommend(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Per pair: the chosen candidate, its predicted quality, the better parent's predicted quality, the margin
        between them and ``abstain`` (True when no candidate is predicted to beat keeping that parent)."""
        ranked = self.rank(rows).query("rank == 1").set_index("pair")
        keep = self.keep_parent(rows).set_index("pair")
        out = ranked[["candidate", "method", "setting", "predicted"]].join(keep)
        out["margin_over_parent"] = out.predicted - out.keep_predicted
        out["abstain"] = out.margin_over_parent < 0
        return out.reset_index()

    @_quiet
    def vote(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The classifier's probability that each candidate is the pair's best (pairs × candidates; a candidate that
        never won a training pair gets 0)."""
        x = self._x(rows).drop(columns=["task"], errors="ignore").groupby(rows.pair.to_numpy(), sort=False).mean()
        proba = self.classifier.predict_proba(x)
        return pd.DataFrame(proba, index=x.index, columns=self.classifier.classes_).reindex(columns=self.candidates,
                                                                                            fill_value=0.0)

    def classify(self, rows: pd.DataFrame) -> pd.Series:
        """The classifier's candidate per pair, alone (a baseline; empty without a classifier)."""
        if self.classifier is None:
            return pd.Series(dtype=object)
        return self.vote(rows).idxmax(axis=1).rename("classified")


@_quiet
def fit_predictor(table: pd.DataFrame, family: str = "forest", feature_set: str = "all", seed: int = 0,
                  margin: float = 0.0, task_conditioned: bool = False, ablate: Iterable[str] = (),
                  classifier: bool = True, metadata: Mapping[str, Any] | None = None) -> Predictor:
    """Fit a :class:`Predictor` on a :func:`training_table`. ``ablate``: feature columns replaced by a constant (their
    training median) in training and prediction."""
    if table.empty:
        raise ValueError("fit_predictor: empty training table")
    feats = feature_columns(table, feature_set)
    cands = candidates_of(table)
    y = table[[f"y__{c}" for c in cands]].to_numpy(float)
    keep = table.keep_other.to_numpy(float) if "keep_other" in table.columns else np.full(len(table), np.nan)
    mean = np.nanmean(y, axis=1)
    adv = np.nan_to_num(y - mean[:, None])
    keep = np.where(np.isnan(keep), np.nanmean(keep) if np.isfinite(keep).any() else 0.5, keep)
    constant = {c: float(np.nanmedian(table[c])) if table[c].notna().any() else 0.0 for c in ablate if c in feats}
    cat = ["task"] if task_conditioned else []
    x = table[[*feats, *cat]].copy()
    for col, value in constant.items():
        x[col] = value
    advantage = _pipeline(_regressor(family, seed), feats, cat).fit(x, adv)
    level = _pipeline(_regressor(family, seed), feats, cat).fit(x, np.column_stack([mean, keep]))
    quality = pair_quality(table)
    fixed = str(quality.mean().idxmax())
    clf, vote_weight = None, 0.0
    if classifier and quality.shape[0] >= 2:
        best = quality.idxmax(axis=1)
        px = x[feats].groupby(table.pair.to_numpy(), sort=False).mean().loc[best.index]
        model = RandomForestClassifier(n_estimators=100, min_samples_leaf=2, random_state=seed, n_jobs=1)
        clf = _pipeline(model, feats).fit(px, best.to_numpy())
        vote_weight = float(len(cands) * quality.sub(quality.mean(axis=1), axis=0).to_numpy().std())
    meta = {"n_rows": int(len(table)), "n_pairs": int(table.pair.nunique()), "feature_set": feature_set,
            **dict(metadata or {})}
    return Predictor(family, feats, cands, advantage, level, fixed, float(margin), task_conditioned, constant,
                     clf, vote_weight, meta)


def similarity_columns(table: pd.DataFrame) -> list[str]:
    """The feature columns that compare models (every ``fn_*`` / ``st_*`` but the task descriptors)."""
    return [c for c in feature_columns(table) if c not in DESCRIPTOR_COLUMNS]


# ================================================================================================ splits
@dataclass(frozen=True)
class Split:
    """One held-out group: the pairs trained on and the pairs tested on (keys ``"a|b"``)."""

    name: str
    kind: str  # "task" or "expert"
    held_out: tuple[str, ...]  # the task, or the expert and its siblings
    train: tuple[str, ...]
    test: tuple[str, ...]


def _pairs(table: pd.DataFrame) -> pd.DataFrame:
    """Per pair: a, b, the set of its tasks and its two experts' (task, base) identities."""
    info = table.groupby("pair", sort=False).agg(a=("a", "first"), b=("b", "first"), base=("base_a", "first"),
                                                 tasks=("task", frozenset))
    return info


def expert_tasks(table: pd.DataFrame) -> dict[str, str]:
    """Each expert's task: the task of the rows it owns."""
    return dict(zip(table.owner, table.task))


def siblings(table: pd.DataFrame) -> dict[str, set[str]]:
    """Each expert's siblings and itself: the experts of the same task on the same base."""
    task_of = expert_tasks(table)
    base_of = {**dict(zip(table.a, table.base_a)), **dict(zip(table.b, table.base_b))}
    groups: dict[tuple[str, str], set[str]] = {}
    for e, t in task_of.items():
        groups.setdefault((t, base_of[e]), set()).add(e)
    return {e: groups[(t, base_of[e])] for e, t in task_of.items()}


def leave_one_task_out(table: pd.DataFrame) -> list[Split]:
    """One split per task t: test = the pairs with t among their tasks; train = every other pair (so t's rows,
    features and pairs never reach training)."""
    info = _pairs(table)
    splits = []
    for task in sorted(table.task.unique()):
        has = info.tasks.map(lambda ts, t=task: t in ts)
        splits.append(Split(f"task={task}", "task", (task,), tuple(info.index[~has]), tuple(info.index[has])))
    return splits


def leave_one_expert_out(table: pd.DataFrame) -> list[Split]:
    """One split per expert e: test = the pairs with e; train = the pairs with neither e nor any sibling of e (the
    same task on the same base: a near-duplicate that would let a per-task lookup pass for a prediction)."""
    info = _pairs(table)
    sib = siblings(table)
    splits = []
    for expert in sorted(sib):
        held = sib[expert]
        touches = info.a.isin(held) | info.b.isin(held)
        test = info.a.eq(expert) | info.b.eq(expert)
        splits.append(Split(f"expert={expert}", "expert", tuple(sorted(held)), tuple(info.index[~touches]),
                            tuple(info.index[test])))
    return splits


def grouped_folds(table: pd.DataFrame, kind: str, k: int = 3, seed: int = 0) -> list[Split]:
    """``k`` folds of held-out groups for the inner cross-validation: tasks (``kind="task"``) or expert sibling
    groups (``"expert"``), each fold built like the outer splits."""
    rng = np.random.default_rng(seed)
    info = _pairs(table)
    if kind == "task":
        groups = [frozenset([t]) for t in sorted(table.task.unique())]
    else:
        groups = sorted({frozenset(s) for s in siblings(table).values()}, key=sorted)
    if len(groups) < 2:
        return []
    order = rng.permutation(len(groups))
    folds = [[groups[i] for i in order[j::k]] for j in range(min(k, len(groups)))]
    splits = []
    for j, fold in enumerate(folds):
        held = frozenset().union(*fold)
        if kind == "task":
            test = info.tasks.map(lambda ts, h=held: bool(ts & h))
            train = ~test
        else:
            test = info.a.isin(held) | info.b.isin(held)
            train = ~test
        splits.append(Split(f"fold{j}", kind, tuple(sorted(held)), tuple(info.index[train]), tuple(info.index[test])))
    return [s for s in splits if s.train and s.test]


def check_split(table: pd.DataFrame, split: Split) -> None:
    """Raise AssertionError if anything held out reaches training: a shared pair, a held-out task among a
    training pair's tasks, or a held-out expert or sibling in a training pair."""
    train, test = set(split.train), set(split.test)
    assert not train & test, f"{split.name}: pairs in both train and test"
    rows = table[table.pair.isin(train)]
    if split.kind == "task":
        assert not rows.task.isin(split.held_out).any(), f"{split.name}: held-out task in training rows"
        assert not rows.owner.map(expert_tasks(table)).isin(split.held_out).any() and \
            not rows.other.map(expert_tasks(table)).isin(split.held_out).any(), f"{split.name}: held-out task's expert"
    else:
        assert not (rows.a.isin(split.held_out) | rows.b.isin(split.held_out)).any(), \
            f"{split.name}: held-out expert or sibling in a training pair"


# ============================================================================================ evaluation
def task_pair_lookup(train: pd.DataFrame, test: pd.DataFrame, fixed: str) -> pd.Series:
    """Per test pair: the candidate with the best mean quality over the training pairs of the same two tasks
    (``fixed`` where no training pair has them)."""
    def task_pair(frame: pd.DataFrame) -> pd.Series:
        return frame.groupby("pair", sort=False).task.agg(lambda s: "+".join(sorted(s)))

    quality = pair_quality(train)
    by_tasks = quality.groupby(task_pair(train).loc[quality.index].to_numpy()).mean()
    best = by_tasks.idxmax(axis=1)
    return task_pair(test).map(best).fillna(fixed)


def evaluate_split(table: pd.DataFrame, split: Split, family: str = "forest", feature_set: str = "all",
                   margin: float = 0.0, seed: int = 0, baselines: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fit on the split's training pairs, choose for its test pairs.

    Returns (records, candidates): one record per test pair — ``simmerge`` (the chosen candidate's measured
    quality), ``best_fixed``, ``oracle``, ``keep_parent`` (measured), the baselines of :data:`BASELINES`, the
    predicted keep-parent quality and ``abstain`` — and one row per test pair × candidate (predicted, measured)."""
    check_split(table, split)
    train = table[table.pair.isin(split.train)]
    test = table[table.pair.isin(split.test)]
    model = fit_predictor(train, family, feature_set, seed, margin)
    quality = pair_quality(test)
    ranked = model.rank(test)
    advice = model.recommend(test).set_index("pair")
    keep = keep_parent_quality(test)
    picks = {"simmerge": advice.candidate}
    if baselines:
        ablated = fit_predictor(train, family, feature_set, seed, margin, task_conditioned=True,
                                ablate=[c for c in similarity_columns(train) if c in model.feature_names])
        picks.update({"ablation": ablated.rank(test).query("rank == 1").set_index("pair").candidate,
                      "classifier": model.classify(test),
                      "task_pair_lookup": task_pair_lookup(train, test, model.fixed)})
    records = pd.DataFrame(index=quality.index)
    for name, choice in picks.items():
        choice = choice.reindex(quality.index).fillna(model.fixed)
        records[name] = [quality.at[p, c] for p, c in choice.items()]
    records["chosen"] = advice.candidate.reindex(quality.index)
    records["best_fixed"] = quality[model.fixed]
    records["oracle"] = quality.max(axis=1)
    records["keep_parent"] = keep.reindex(quality.index)
    records["keep_predicted"] = advice.keep_predicted.reindex(quality.index)
    records["predicted"] = advice.predicted.reindex(quality.index)
    records["abstain"] = advice.abstain.reindex(quality.index).astype(bool)
    records.insert(0, "split", split.name)
    records["fixed_candidate"] = model.fixed
    measured = quality.stack().rename("quality").reset_index()
    measured.columns = ["pair", "candidate", "quality"]
    cand = ranked.merge(measured, on=["pair", "candidate"], how="left").assign(split=split.name, fixed=model.fixed)
    return records.rename_axis("pair").reset_index(), cand


def gap_closure(records: pd.DataFrame, column: str = "simmerge") -> float:
    """(mean chosen - mean best fixed) / (mean oracle - mean best fixed) over the records (1 = the oracle, 0 = no
    better than the best fixed candidate)."""
    gap = records.oracle.mean() - records.best_fixed.mean()
    return float((records[column].mean() - records.best_fixed.mean()) / gap) if gap > 1e-12 else float("nan")


def cluster_bootstrap_ci(records: pd.DataFrame, stat: Callable[[pd.DataFrame], float] = gap_closure,
                         cluster: str = "split", n_boot: int = 1000, seed: int = 0, level: float = 0.95
                         ) -> tuple[float, float]:
    """Percentile interval of ``stat`` when whole clusters (held-out groups: a task, or an expert) are resampled
    with replacement: pairs of one group are correlated, so they move together."""
    groups = [g for _, g in records.groupby(cluster, sort=False)]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(groups), len(groups))
        draws.append(stat(pd.concat([groups[i] for i in pick], ignore_index=True)))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return float(np.nanpercentile(draws, lo)), float(np.nanpercentile(draws, hi))


def spearman(candidates: pd.DataFrame) -> float:
    """Spearman's ρ of predicted against measured quality over all held-out pairs × candidates."""
    c = candidates.dropna(subset=["predicted", "quality"])
    return float(spearmanr(c.predicted, c.quality).statistic) if len(c) > 2 else float("nan")


def within_pair_spearman(candidates: pd.DataFrame) -> float:
    """The mean over pairs of Spearman's ρ between predicted and measured quality of the pair's candidates."""
    values = []
    for _, g in candidates.dropna(subset=["predicted", "quality"]).groupby(["split", "pair"]):
        if len(g) > 2 and np.ptp(g.quality) > 0 and np.ptp(g.predicted) > 0:
            values.append(spearmanr(g.predicted, g.quality).statistic)
    return float(np.mean(values)) if values else float("nan")


def abstain_precision(records: pd.DataFrame) -> float:
    """Among held-out pairs where the predictor advised keeping a parent, the share where keeping the better parent
    really beat the merge it would have chosen (NaN when it never abstained)."""
    held = records[records.abstain]
    return float((held.keep_parent > held.simmerge).mean()) if len(held) else float("nan")


def selection_metrics(records: pd.DataFrame, candidates: pd.DataFrame, tol: float = TOL) -> dict[str, float]:
    """Headline metrics of an evaluation: qualities of SimMerge and every baseline, gap closures, regret, hit rate,
    Spearman (pooled and within pairs), abstentions."""
    out: dict[str, float] = {"pairs": float(records.pair.nunique()), "records": float(len(records))}
    for col in ["simmerge", *BASELINES]:
        if col in records.columns:
            out[f"quality_{col}"] = float(records[col].mean())
    for col in ["simmerge", "ablation", "classifier", "task_pair_lookup"]:
        if col in records.columns:
            out[f"gap_closure_{col}"] = gap_closure(records, col)
    out["mean_regret"] = float((records.oracle - records.simmerge).mean())
    out["selection_accuracy"] = float((records.simmerge >= records.oracle - tol).mean())
    out["win_rate_vs_fixed"] = float((records.simmerge > records.best_fixed + tol).mean())
    out["loss_rate_vs_fixed"] = float((records.simmerge < records.best_fixed - tol).mean())
    out["spearman"] = spearman(candidates)
    out["spearman_within_pair"] = within_pair_spearman(candidates)
    out["abstain_rate"] = float(records.abstain.mean())
    out["abstain_precision"] = abstain_precision(records)
    out["merge_beats_parent_when_not_abstaining"] = float(
        (records.loc[~records.abstain, "simmerge"] > records.loc[~records.abstain, "keep_parent"]).mean())
    return out


def regret_with_margin(candidates: pd.DataFrame, margin: float) -> float:
    """Mean regret (oracle - chosen) of an evaluation's candidates (scored with no margin) had the best fixed
    candidate of each split had a head start of ``margin``: the margin only moves the choice, so nothing is refit."""
    score = candidates.score + np.where(candidates.candidate == candidates.fixed, margin, 0.0)
    chosen = candidates.assign(_s=score).sort_values("_s", ascending=False, kind="stable")
    chosen = chosen.drop_duplicates(["split", "pair"]).set_index(["split", "pair"]).quality
    oracle = candidates.groupby(["split", "pair"]).quality.max()
    return float((oracle - chosen.reindex(oracle.index)).mean())


def choose_design(table: pd.DataFrame, kind: str = "expert", families: Sequence[str] = ("ridge", "forest"),
                  feature_sets: Sequence[str] = ("all",), margins: Sequence[float] = MARGINS, seed: int = 0
                  ) -> tuple[str, str, float]:
    """(family, feature set, margin) with the lowest mean regret in grouped cross-validation on ``table`` (folds of
    held-out tasks, ``kind="task"``, or of expert sibling groups, ``"expert"``): how every split of
    :func:`nested_evaluation` chooses, and how the final predictor is chosen on a whole catalogue."""
    folds = grouped_folds(table, kind, seed=seed)
    options = [(f, s) for f in families for s in feature_sets]
    if not folds or len(options) * len(margins) == 1:
        return (*options[0], margins[0])
    best, choice = np.inf, (*options[0], margins[0])
    for family, fset in options:
        cands = pd.concat([evaluate_split(table, fold, family, fset, 0.0, seed, baselines=False)[1] for fold in folds])
        for m in margins:
            regret = regret_with_margin(cands, m)
            if regret < best - 1e-12:
                best, choice = regret, (family, fset, float(m))
    return choice


@_quiet
def _nested_split(table: pd.DataFrame, split: Split, scheme: str, families: Sequence[str],
                  feature_sets: Sequence[str], margins: Sequence[float], seed: int
                  ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    train = table[table.pair.isin(split.train)]
    family, fset, margin = choose_design(train, scheme, families, feature_sets, margins, seed)
    records, candidates = evaluate_split(table, split, family, fset, margin, seed)
    return records, candidates, {"split": split.name, "family": family, "feature_set": fset, "margin": margin}


def nested_evaluation(table: pd.DataFrame, scheme: str = "task", families: Sequence[str] = ("ridge", "forest"),
                      feature_sets: Sequence[str] = ("all",), margins: Sequence[float] = MARGINS, seed: int = 0,
                      n_boot: int = 1000, progress: bool = True, workers: int | None = None,
                      cache: bool = False) -> dict[str, Any]:
    """Held-out evaluation with every choice nested: for each outer split (``scheme``: ``"task"`` =
    leave-one-task-out, ``"expert"`` = leave-one-expert-out with siblings), the family, feature set and margin are
    chosen by grouped cross-validation on the split's training pairs only, then the predictor is refit there and
    scored on the held-out pairs (splits run in ``workers`` processes, default one per core; the result does not
    depend on it). Returns records, candidates, choices, metrics and cluster-bootstrap intervals (clusters = the
    held-out groups) of SimMerge's and every baseline's gap closure.

    With ``cache``, the result is kept in ``build/predictor/nested/<key>/`` (parquet + JSON), ``key`` hashing the
    table's content, every argument that changes the result and :data:`PREDICTOR_FORMAT` (bump it when the
    predictor's code changes what it computes): chapter 04 and ``benchmarks/selection_quality.py`` then share one
    computation, which takes minutes on the default profile."""
    if scheme not in ("task", "expert"):
        raise ValueError(f"scheme must be 'task' or 'expert', got {scheme!r}")
    folder = None
    if cache:
        folder = _nested_cache_dir(table, scheme, families, feature_sets, margins, seed, n_boot)
        cached = _read_nested(folder)
        if cached is not None:
            return cached
    result = _nested_evaluation(table, scheme, families, feature_sets, margins, seed, n_boot, progress, workers)
    if folder is not None:
        _write_nested(folder, result)
    return result


def _nested_cache_dir(table: pd.DataFrame, scheme: str, families: Sequence[str], feature_sets: Sequence[str],
                      margins: Sequence[float], seed: int, n_boot: int) -> Path:
    digest = hashlib.sha256(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
    digest.update(json.dumps([list(table.columns), scheme, list(families), list(feature_sets),
                              [float(m) for m in margins], seed, n_boot, PREDICTOR_FORMAT]).encode())
    return build_path("predictor", "nested", f"{scheme}-{digest.hexdigest()[:16]}")


_NESTED_FRAMES = ("records", "candidates", "choices")


def _read_nested(folder: Path) -> dict[str, Any] | None:
    try:
        out: dict[str, Any] = {name: pd.read_parquet(folder / f"{name}.parquet") for name in _NESTED_FRAMES}
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):  # absent or unreadable: compute again
        return None
    out["metrics"] = summary["metrics"]
    out["ci"] = {k: tuple(v) for k, v in summary["ci"].items()}
    return out


def _write_nested(folder: Path, result: Mapping[str, Any]) -> None:
    with atomic_folder(folder, force=True) as partial:
        for name in _NESTED_FRAMES:
            result[name].to_parquet(partial / f"{name}.parquet", index=False)
        write_json_atomic(partial / "summary.json", {
            "metrics": {k: float(v) for k, v in result["metrics"].items()},
            "ci": {k: [float(x) for x in v] for k, v in result["ci"].items()}})


def _nested_evaluation(table: pd.DataFrame, scheme: str, families: Sequence[str], feature_sets: Sequence[str],
                       margins: Sequence[float], seed: int, n_boot: int, progress: bool, workers: int | None
                       ) -> dict[str, Any]:
    from joblib import Parallel, delayed

    splits = leave_one_task_out(table) if scheme == "task" else leave_one_expert_out(table)
    workers = int(workers or os.cpu_count() or 1)
    jobs = (delayed(_nested_split)(table, s, scheme, families, feature_sets, margins, seed) for s in splits)
    results = list(tqdm(Parallel(n_jobs=workers, return_as="generator")(jobs), total=len(splits),
                        desc=f"nested[{scheme}]", disable=not progress, leave=False))
    records = pd.concat([r for r, _, _ in results], ignore_index=True)
    candidates = pd.concat([c for _, c, _ in results], ignore_index=True)
    choices = [choice for _, _, choice in results]
    ci = {col: cluster_bootstrap_ci(records, lambda r, c=col: gap_closure(r, c), n_boot=n_boot, seed=seed)
          for col in ("simmerge", "ablation", "classifier", "task_pair_lookup")}
    return {"records": records, "candidates": candidates, "choices": pd.DataFrame(choices),
            "metrics": selection_metrics(records, candidates), "ci": ci}


def transfer_records(predictor: Predictor, train_table: pd.DataFrame, transfer_table: pd.DataFrame
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Apply a predictor unchanged to another catalogue's pairs: the best fixed candidate comes from ``train_table``
    (the catalogue it was trained on); nothing about the new catalogue is used but its features."""
    quality = pair_quality(transfer_table)
    fixed = str(pair_quality(train_table).mean().idxmax())
    advice = predictor.recommend(transfer_table).set_index("pair")
    records = pd.DataFrame(index=quality.index)
    records["split"] = "transfer"
    records["simmerge"] = [quality.at[p, c] for p, c in advice.candidate.reindex(quality.index).items()]
    records["best_fixed"] = quality[fixed] if fixed in quality.columns else np.nan
    records["oracle"] = quality.max(axis=1)
    records["keep_parent"] = keep_parent_quality(transfer_table).reindex(quality.index)
    records["abstain"] = advice.abstain.reindex(quality.index).astype(bool)
    measured = quality.stack().rename("quality").reset_index()
    measured.columns = ["pair", "candidate", "quality"]
    cand = predictor.rank(transfer_table).merge(measured, on=["pair", "candidate"]).assign(split="transfer")
    return records.rename_axis("pair").reset_index(), cand


# ============================================================================================ persistence
def predictor_path(profile: str) -> Path:
    """Where a profile's predictor lives: ``build/predictor/<profile>.skops``."""
    return build_path("predictor", f"{profile}.skops")


def _versions() -> dict[str, str]:
    import sklearn
    import skops

    from . import __version__
    return {"sklearn": sklearn.__version__, "skops": skops.__version__, "numpy": np.__version__,
            "pandas": pd.__version__, "simmerge_lib": __version__}


def save_predictor(predictor: Predictor, path: str | os.PathLike[str]) -> Path:
    """Write the predictor with skops, atomically; metadata includes feature names, candidates and versions."""
    import skops.io as sio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": PREDICTOR_FORMAT, "family": predictor.family, "feature_names": list(predictor.feature_names),
             "candidates": list(predictor.candidates), "advantage": predictor.advantage, "level": predictor.level,
             "fixed": predictor.fixed, "margin": float(predictor.margin),
             "task_conditioned": bool(predictor.task_conditioned), "constant": json.dumps(predictor.constant),
             "classifier": predictor.classifier, "vote_weight": float(predictor.vote_weight),
             "metadata": json.dumps({**predictor.metadata, "versions": _versions()})}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        sio.dump(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_predictor(path: str | os.PathLike[str]) -> Predictor:
    """Load a predictor saved by :func:`save_predictor`, refusing any type outside skops' defaults and
    :data:`TRUSTED_TYPES` (so a tampered file cannot run code)."""
    import skops.io as sio

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictor file (train and save one with chapter 04, "
                                "notebooks/04_predictor_training.ipynb)")
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # noqa: BLE001 - a corrupt file surfaces as many exception types
        raise ValueError(f"{path}: not a skops predictor file ({type(exc).__name__}: {exc})") from None
    refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if refused:
        raise ValueError(f"{path}: refusing to load untrusted type(s) {refused}")
    state = sio.load(path, trusted=list(untrusted))
    if not isinstance(state, dict) or state.get("format") != PREDICTOR_FORMAT:
        raise ValueError(f"{path}: not a simmerge predictor of format {PREDICTOR_FORMAT} (retrain it with chapter 04)")
    return Predictor(family=state["family"], feature_names=list(state["feature_names"]),
                     candidates=list(state["candidates"]), advantage=state["advantage"], level=state["level"],
                     fixed=state["fixed"], margin=float(state["margin"]),
                     task_conditioned=bool(state["task_conditioned"]), constant=json.loads(state["constant"]),
                     classifier=state["classifier"], vote_weight=float(state["vote_weight"]),
                     metadata=json.loads(state["metadata"]))


# ============================================================================================ the profile's tables
def load_tables(profile: str, transfer: bool = False, build: bool = True, progress: bool = True
                ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, Any]:
    """(features, labels, reference, catalogue) of a profile's catalogue, or of its transfer catalogue
    (``transfer=True``): read from ``build/`` when present; otherwise, with ``build``, trained / computed /
    collected with the profile's settings (chapters 00, 01 and 03), else FileNotFoundError."""
    from . import zoo
    from .catalogue import Catalogue
    from .features import features_path, load_or_compute
    from .labels import collect_labels, labels_path, load_labels, make_jobs, profile_settings, reference_path
    from .probes import N_PROBES

    name = f"transfer-{profile}" if transfer else profile
    fpath, lpath = features_path(name), labels_path(name)
    if not build and not (fpath.is_file() and lpath.is_file()):
        missing = [str(p) for p in (fpath, lpath) if not p.is_file()]
        raise FileNotFoundError(f"{', '.join(missing)}: missing (run chapters 00, 01 and 03 for profile {name!r})")
    if not build:
        catalogue = Catalogue.load(zoo.catalogue_dir(name))
    else:
        catalogue = (zoo.build_transfer_catalogue(profile, progress=progress) if transfer
                     else zoo.build_catalogue(profile, progress=progress))
    features = load_or_compute(catalogue, name, n_probes=N_PROBES.get(profile), progress=progress)
    jobs = make_jobs(catalogue, **profile_settings(profile))
    if lpath.is_file() and not build:
        labels = load_labels(lpath)
    else:
        labels = collect_labels(catalogue, jobs, lpath, progress=progress)
    reference = pd.read_parquet(reference_path(lpath))
    return features, labels, reference, catalogue


# ============================================================================================ synthetic tables
def synthetic_tables(n_tasks: int = 4, n_bases: int = 2, seed: int = 0, noise: float = 0.01
                     ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Features, labels and reference tables with a planted rule, for tests and teaching.

    Per base, two experts per task (siblings); expert e has a direction d_e (a random share of one shared direction
    plus noise) and a size s_e. Same-base pair (a, b): ``st_tv_cos`` = cos(d_a, d_b); on the owner's task, the
    owner keeps q = 0.9 - 0.1 s_other under every candidate, plus: task arithmetic (lambda 1) + 0.08 (1 - 2 cos),
    TIES - 0.08 (1 - 2 cos), linear 0: task arithmetic wins when the task vectors are nearly orthogonal, TIES when
    they align. ``fn_b_base_kl`` = s_other (the other expert's size, seen on the owner's probes); the other expert
    alone keeps 0.5 of the task. Cross-base pairs get features but no labels."""
    rng = np.random.default_rng(seed)
    tasks = ["reverse", "sort", "max", "min", "double", "shift"][:n_tasks]
    shared = rng.normal(size=8)
    experts = [(f"base{b}-{t}" + ("" if k == 0 else "-2"), f"base{b}", t)
               for b in range(n_bases) for k in range(2) for t in tasks]
    direction = {e: rng.uniform(0, 2.5) * shared + rng.normal(size=8) for e, _, _ in experts}
    size = {e: float(rng.uniform(0, 1)) for e, _, _ in experts}
    grid = [("linear", "weight=0.5", '{"weight": 0.5}'), ("task_arithmetic", "lambda=1", '{"lambda": 1.0}'),
            ("ties", "density=0.5", '{"density": 0.5}')]
    frows, lrows, rrows = [], [], []
    for i, (a, ba, ta) in enumerate(experts):
        rrows += [{"model": a, "task": t, "n_eval": 100, "score": 1.0 if t == ta else 0.5} for t in tasks]
        for j, (b, bb, tb) in enumerate(experts):
            if i == j or ta == tb:
                continue
            cos = float(direction[a] @ direction[b] / np.linalg.norm(direction[a]) / np.linalg.norm(direction[b]))
            cos = cos if ba == bb else 0.0
            for t in (ta, tb):
                owner_is_a = t == ta
                frows.append({"a": a, "b": b, "task": t, "same_base": int(ba == bb), "task_of_a": float(owner_is_a),
                              "st_tv_cos": cos, "fn_b_base_kl": size[b] + rng.normal(0, 0.02),
                              "fn_a_base_kl": size[a] + rng.normal(0, 0.02), "fn_base_entropy": 0.5})
            if i > j or ba != bb:
                continue  # labels: same-base pairs, in catalogue order
            for method, setting, params in grid:
                bonus = {"linear": 0.0, "task_arithmetic": 0.08, "ties": -0.08}[method] * (1 - 2 * cos)
                for t, other in ((ta, b), (tb, a)):
                    q = 0.9 - 0.1 * size[other] + bonus + rng.normal(0, noise)
                    lrows.append({"job_key": f"{a}|{b}|{method}|{setting}", "a": a, "b": b, "base_a": ba,
                                  "base_b": bb, "same_base": True, "method": method, "setting": setting,
                                  "parameters": params, "task": t, "parent_task": True, "score": q, "norm_score": q,
                                  "norm_even": np.nan, "norm_odd": np.nan, "char_score": np.nan, "seed": 0,
                                  "n_eval": 100, "seconds": 0.0, "versions": "{}", "recipe": ""})
    return pd.DataFrame(frows), pd.DataFrame(lrows), pd.DataFrame(rrows)


# ============================================================================================ the command
def recommend_rows(catalogue: Any, a: str, b: str, n_probes: int) -> pd.DataFrame:
    """The owner-oriented feature rows of the pair (a, b) of a catalogue, computed now (both orders)."""
    from .features import pair_features

    bases = [catalogue.path(catalogue.base_of(x).name) for x in (a, b)]
    tasks = [t for t in catalogue.tasks if t in set(catalogue.entry(a).tasks) | set(catalogue.entry(b).tasks)]
    forward = pair_features(catalogue.path(a), catalogue.path(b), *bases, tasks, n_probes=n_probes)
    backward = pair_features(catalogue.path(b), catalogue.path(a), *bases[::-1], tasks, n_probes=n_probes)
    forward["a"], forward["b"], backward["a"], backward["b"] = a, b, b, a
    feats = pd.concat([forward, backward], ignore_index=True)
    feats["task_of_a"] = [1.0 if t in catalogue.entry(x).tasks else 0.0 for x, t in zip(feats.a, feats.task)]
    return owner_rows(feats, pd.DataFrame({"a": a, "b": b, "task": tasks}))


def _recommend(args: argparse.Namespace) -> int:
    from .catalogue import Catalogue
    from .labels import job_recipe, setting_parameters
    from .probes import N_PROBES
    from .recipe import Recipe

    catalogue = Catalogue.load(args.catalogue)
    predictor = load_predictor(args.predictor or predictor_path(catalogue.name.removeprefix("transfer-")))
    for name in (args.a, args.b):
        if catalogue.entry(name).role != "expert":
            raise ValueError(f"{name!r} is a base of catalogue {catalogue.name!r}; recommend merges two experts")
    if set(catalogue.entry(args.a).tasks) == set(catalogue.entry(args.b).tasks):
        raise ValueError(f"{args.a!r} and {args.b!r} serve the same task(s); recommend combines two skills")
    rows = recommend_rows(catalogue, args.a, args.b, args.n_probes or N_PROBES["default"])
    ranked = predictor.rank(rows)
    advice = predictor.recommend(rows).iloc[0]
    print(f"# {args.a} + {args.b} — predicted merge quality (predictor: {predictor.family}; the best fixed "
          f"candidate {predictor.fixed} gets a head start of {predictor.margin:g})")
    print(ranked[["rank", "method", "setting", "predicted"]].head(args.top).to_string(index=False, float_format="%.3f"))
    print(f"\n# keeping {advice.parent} alone: predicted {advice.keep_predicted:.3f}; the best merge is predicted "
          f"{advice.margin_over_parent:+.3f} against it")
    if advice.abstain:
        print(f"# advice: do not merge — no candidate is predicted to beat keeping {advice.parent} "
              f"(predicted margin {advice.margin_over_parent:+.3f})")
        return 0
    pair = sorted((args.a, args.b), key=[m.name for m in catalogue.models].index)
    recipe = job_recipe(advice.method, pair[0], pair[1], catalogue.base_of(pair[0]).name,
                        setting_parameters(advice.setting), args.seed)
    paths = {m.name: str(catalogue.path(m.name)) for m in catalogue.models}
    recipe["models"] = [{**m, "model": paths[m["model"]]} for m in recipe["models"]]
    if "base_model" in recipe:
        recipe["base_model"] = paths[recipe["base_model"]]
    text = Recipe.from_dict(recipe, source="recommendation").to_yaml()
    print("\n# recipe (mergekit format): save as recipe.yaml and run `simmerge merge recipe.yaml OUT`")
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("recommend", help="rank merge candidates for two experts by predicted quality",
                              description="Compute the pair's features, rank every candidate by the predictor's "
                                          "quality, compare with keeping the better parent, and print the recipe "
                                          "of the best merge (or advise not to merge).")
    p.add_argument("a", help="one expert")
    p.add_argument("b", help="the other expert (the order does not matter)")
    p.add_argument("--catalogue", default=str(build_path("zoo", "default")), help="catalogue folder "
                   "(default build/zoo/default)")
    p.add_argument("--predictor", help="predictor .skops file (default build/predictor/<catalogue name>.skops)")
    p.add_argument("--n-probes", type=int, help="probe prompts per task for the features (default 32)")
    p.add_argument("--top", type=int, default=20, help="rows of the ranking to print")
    p.add_argument("--seed", type=int, default=0, help="seed written into the recipe (DARE masks)")
    p.add_argument("--out", help="also write the recipe YAML here")
    p.set_defaults(func=_recommend)
