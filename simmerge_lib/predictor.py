"""Chapter 04 — the SimMerge predictor: choose a pair's merge operator and setting from features, without merging.

**Data.** The features table (chapter 01: one row per ordered pair × task) is joined with the labels table
(chapter 03: one row per pair × operator × setting × task) on ``(a, b, task)`` over each pair's *parent* tasks
(:func:`training_table`). One training row is then a pair × task × candidate, with target

    y = norm_score(merge_c(a, b), t)          (c = operator × setting, t in tasks(a) ∪ tasks(b))

Pairs are *ordered as the labels define them*: a setting's ``weight`` is the first model's share and SLERP's ``t``
goes from the first model (0) to the second (1), and the features of the ordered row ``(a, b)`` are used with it.
Asking about ``(b, a)`` uses the features row ``(b, a)`` and the same reading of the settings, so an asymmetric
recommendation is always relative to the first model named.

**Models** (scikit-learn pipelines: median imputation, standard scaling of the features, one-hot task → estimator):

* a *level* regressor of the mean quality of a pair on a task, mean_c y, and one *per-operator* regressor of each
  candidate's advantage over that mean, y - mean_c y (its setting's parameters are inputs). The prediction is
  ŷ_c = level + advantage_c: the advantage removes the pair's difficulty, which is shared by every candidate and
  carries no information about which one to pick;
* a direct *classifier* of the best candidate (pair level: features averaged over the parent tasks, multi-hot tasks).

**Selection.** q̂(a, b, c) = mean over parent tasks t of ŷ_c(a, b, t); the choice is argmax_c q̂ over operator ×
setting (:meth:`Predictor.rank`). Families (:data:`FAMILIES`: ridge, random forest, gradient boosting, MLP) are
compared by grouped cross-validation (:func:`choose_family`: folds of *experts*, so that no test pair shares an expert
with a training pair).

**Evaluation** (held-out groups only, :func:`leave_one_task_out`, :func:`leave_one_expert_out`; every split is checked
by :func:`check_split`). Per held-out pair: chosen quality q(ĉ), oracle max_c q(c), best fixed q(c*) where c* is the
candidate with the best mean quality on the *training* pairs of that split. Metrics (:func:`selection_metrics`):

* selection accuracy = share of pairs with q(ĉ) >= oracle - tol (ties within ``tol`` count as hits);
* mean regret = mean(oracle - q(ĉ));
* gap closure = (mean q(ĉ) - mean q(c*)) / (mean oracle - mean q(c*)) over the held-out pairs (1 = oracle,
  0 = no better than the best fixed choice, < 0 worse); the means make pairs with no gap weigh nothing;
* win / loss rate vs each fixed operator o (at its best setting on the training pairs): share of pairs with
  q(ĉ) > q(o) + tol, resp. q(ĉ) < q(o) - tol;
* Spearman: rank correlation of q̂ and q over a pair's candidates, averaged over pairs.

Confidence intervals are percentile bootstrap intervals over held-out pairs (:func:`bootstrap_ci`).

**Persistence** with skops (:func:`save_predictor`, :func:`load_predictor`): the file holds the fitted pipelines and
the metadata (feature names, tasks, candidates, training catalogue name and hash, versions); loading checks every
type in the file against :data:`TRUSTED_TYPES` and refuses anything else (no arbitrary pickle code runs).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.compose import ColumnTransformer
from sklearn.dummy import DummyClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.ensemble import (GradientBoostingClassifier, GradientBoostingRegressor, RandomForestClassifier,
                              RandomForestRegressor)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from .features import FEATURE_COLUMNS
from .paths import build_path

#: The numeric parameters a grid setting may carry (missing ones are 0 for that operator's rows).
PARAM_COLUMNS = ["p_weight", "p_t", "p_lambda", "p_density"]
#: Model families compared by grouped cross-validation.
FAMILIES = ("ridge", "forest", "gbm", "mlp")
#: Selection tolerance: a choice within ``TOL`` of the oracle is a hit; wins and losses need a margin > ``TOL``.
TOL = 0.01
#: The hedge margins compared by :func:`choose_margin` and :func:`nested_evaluation`.
MARGINS = (0.0, 0.005, 0.01, 0.02, 0.05)
PREDICTOR_FORMAT = 2
#: Which parent was fine-tuned on a row's task (features :func:`~simmerge_lib.features.task_owner`: 1 a, 0 b).
OWNER_COLUMN = "task_of_a"
#: Derived input of the per-operator models: the share the setting gives the task's own expert (see
#: :func:`owner_share`).
OWNER_SHARE = "p_owner_share"
#: Prefix of a row's *mirror* columns: the features of the same pair in the other order, (b, a) (:func:`with_mirror`).
MIRROR_PREFIX = "mirror__"
#: Setting parameters that name the first model's share: swapping the pair maps v → 1 - v (linear weight, SLERP t).
MIRRORED_PARAMS = ("p_weight", "p_t")

#: Types (beyond skops' defaults) a predictor file may contain; anything else makes :func:`load_predictor` refuse.
TRUSTED_TYPES = [
    "numpy.dtype", "numpy.ndarray", "numpy.float64", "numpy.int64", "numpy.random.mtrand.RandomState",
    "numpy.random._pcg64.PCG64", "numpy.random._mt19937.MT19937", "builtins.slice", "builtins.object",
    "sklearn._loss.link.IdentityLink", "sklearn._loss.link.LogitLink", "sklearn._loss.link.MultinomialLogit",
    "sklearn._loss.link.Interval", "sklearn._loss._loss.CyHalfSquaredError", "sklearn._loss._loss.CyHalfBinomialLoss",
    "sklearn._loss._loss.CyHalfMultinomialLoss", "sklearn._loss.loss.HalfSquaredError",
    "sklearn._loss.loss.HalfBinomialLoss", "sklearn._loss.loss.HalfMultinomialLoss",
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.utils._bunch.Bunch", "collections.OrderedDict", "sklearn.tree._tree.Tree",
    "sklearn.ensemble._gb_losses.LeastSquaresError", "sklearn.dummy.DummyRegressor",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
]


F = TypeVar("F", bound=Callable[..., Any])


def _single_threaded(fn: F) -> F:
    """Run with BLAS / OpenMP pools limited to one thread: on tables this small, thread start-up and contention
    (on a shared laptop CPU) cost far more than the arithmetic, up to 20x for the MLP."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with threadpool_limits(limits=1), warnings.catch_warnings():
            # the MLP's iteration cap is deliberate (small tables; early stopping): its warning is noise here
            warnings.simplefilter("ignore", ConvergenceWarning)
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# ============================================================================================ the training table
def _params(parameters: str) -> dict[str, float]:
    data = json.loads(parameters) if isinstance(parameters, str) and parameters else {}
    return {f"p_{k}": float(v) for k, v in data.items() if f"p_{k}" in PARAM_COLUMNS}


def pair_key(a: pd.Series | str, b: pd.Series | str) -> pd.Series | str:
    """The key of an ordered pair: ``"a|b"``."""
    return a + "|" + b


def feature_columns(frame: pd.DataFrame) -> list[str]:
    """The feature columns present in ``frame`` (``fn_*`` / ``st_*``, in :data:`FEATURE_COLUMNS` order first)."""
    known = [c for c in FEATURE_COLUMNS if c in frame.columns]
    extra = sorted(c for c in frame.columns if c.startswith(("fn_", "st_")) and c not in known)
    return known + extra


def owner_share(rows: pd.DataFrame) -> np.ndarray:
    """The share of the row's task's own expert in the candidate's merge: with s_a the first model's share (linear
    ``weight``; SLERP 1 - ``t``; 0.5 for the operators that treat the two models alike) and o = ``task_of_a``,
    o * s_a + (1 - o) * (1 - s_a). NaN where o is unknown (the pipelines impute it).

    Without it a model sees weight 0.3 both where the task's expert gets 30% and where it gets 70%: on the default
    catalogue choosing between favouring a and favouring b is 90% of the oracle's lead over the best fixed setting."""
    keys = rows.parameters.map(lambda p: tuple(_params(p))).to_numpy() if "parameters" in rows.columns else None
    share_a = np.full(len(rows), 0.5)
    if keys is not None:
        has_w = np.array(["p_weight" in k for k in keys], bool)
        has_t = np.array(["p_t" in k for k in keys], bool)
        share_a[has_w] = rows.p_weight.to_numpy(float)[has_w]
        share_a[has_t] = 1.0 - rows.p_t.to_numpy(float)[has_t]
    owner = rows[OWNER_COLUMN].to_numpy(float) if OWNER_COLUMN in rows.columns else np.full(len(rows), np.nan)
    return owner * share_a + (1.0 - owner) * (1.0 - share_a)


def with_mirror(frame: pd.DataFrame, features: pd.DataFrame | None = None) -> pd.DataFrame:
    """``frame`` with each (a, b, task) row's *mirror*: the features of (b, a, task), taken from ``features``
    (default: ``frame`` itself), as columns ``mirror__<feature>`` (NaN where that order was not computed).

    The merge of (a, b) with a setting is the merge of (b, a) with the mirrored setting (weight w ↔ 1 - w, SLERP
    t ↔ 1 - t, the others unchanged), so a symmetric predictor can score a candidate from both orders."""
    source = frame if features is None else features
    feats = feature_columns(frame)
    mirror = (source[["a", "b", "task", *feats]].drop_duplicates(["a", "b", "task"])
              .rename(columns={"a": "b", "b": "a", **{c: MIRROR_PREFIX + c for c in feats}}))
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith(MIRROR_PREFIX)])
    return frame.merge(mirror, on=["a", "b", "task"], how="left")


def candidate_table(labels: pd.DataFrame) -> pd.DataFrame:
    """The candidates (operator × setting) of a labels table: columns method, setting, parameters, p_*."""
    cand = labels[["method", "setting", "parameters"]].drop_duplicates(["method", "setting"]).reset_index(drop=True)
    params = pd.DataFrame([_params(p) for p in cand.parameters], columns=PARAM_COLUMNS).fillna(0.0)
    return pd.concat([cand, params], axis=1)


def training_table(features: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Join features (pair × task) and labels (pair × candidate × task) on the parent tasks.

    One row per pair × task × candidate with: a, b, pair, task, same_base, method, setting, parameters, p_*,
    the feature columns and ``norm_score`` (the target). Rows whose norm_score is NaN are dropped; labels of pairs
    that have no features row raise (the two tables come from different catalogues or pair sets)."""
    for name, frame, cols in (("features", features, ["a", "b", "task"]),
                              ("labels", labels, ["a", "b", "task", "method", "setting", "parameters",
                                                  "parent_task", "norm_score", "same_base"])):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise ValueError(f"{name} table: missing column(s) {missing}")
    feats = feature_columns(features)
    if not feats:
        raise ValueError("features table: no feature columns (fn_* / st_*)")
    lab = labels[labels.parent_task.astype(bool)]
    lab = lab[["a", "b", "same_base", "method", "setting", "parameters", "task", "norm_score"]]
    owner = [OWNER_COLUMN] if OWNER_COLUMN in features.columns else []
    fea = features[["a", "b", "task", *owner, *feats]].drop_duplicates(["a", "b", "task"])
    table = lab.merge(fea, on=["a", "b", "task"], how="left", indicator=True)
    lost = table[table["_merge"] == "left_only"]
    if len(lost):
        pairs = sorted(set(pair_key(lost.a, lost.b) + "/" + lost.task))
        raise ValueError(f"labels of {len(pairs)} pair × task(s) have no features row (e.g. {pairs[:3]}); compute "
                         "features for the labels' catalogue with tasks='parents' or 'all'")
    table = table.drop(columns="_merge").dropna(subset=["norm_score"]).reset_index(drop=True)
    params = pd.DataFrame([_params(p) for p in table.parameters], columns=PARAM_COLUMNS).fillna(0.0)
    table = pd.concat([table, params], axis=1)
    table.insert(2, "pair", pair_key(table.a, table.b))
    table["same_base"] = table.same_base.astype(bool)
    return with_mirror(table, features)


def pair_quality(table: pd.DataFrame, column: str = "norm_score") -> pd.DataFrame:
    """Per pair × candidate: the mean of ``column`` over the pair's parent tasks (merge quality, or its prediction).

    Columns: pair, a, b, same_base, method, setting, quality."""
    keys = ["pair", "a", "b", "same_base", "method", "setting"]
    return table.groupby(keys, sort=False)[column].mean().rename("quality").reset_index()


# ================================================================================================ the models
def _regressor(family: str, seed: int) -> Any:
    if family == "ridge":
        return RidgeCV(alphas=np.logspace(-3, 3, 13))
    if family == "forest":
        return RandomForestRegressor(n_estimators=60, min_samples_leaf=3, max_features=0.5, random_state=seed,
                                     n_jobs=1)
    if family == "gbm":
        # the classic (single-threaded) booster: on tables this small the histogram one's thread pool costs more
        return GradientBoostingRegressor(n_estimators=100, learning_rate=0.08, max_depth=3, min_samples_leaf=5,
                                         subsample=0.8, random_state=seed)
    if family == "mlp":
        # early stopping on a 10% validation split: the tables are small and a fixed epoch count over-fits them
        return MLPRegressor(hidden_layer_sizes=(64, 32), alpha=1e-2, learning_rate_init=1e-3, max_iter=300,
                            early_stopping=True, n_iter_no_change=15, random_state=seed)
    raise ValueError(f"unknown model family {family!r}; expected one of {list(FAMILIES)}")


def _classifier(family: str, seed: int) -> Any:
    if family == "ridge":
        return LogisticRegression(C=0.5, max_iter=500)
    if family == "forest":
        return RandomForestClassifier(n_estimators=60, min_samples_leaf=2, random_state=seed, n_jobs=1)
    if family == "gbm":
        # one tree per class and round: keep the rounds few, there are up to ~15 classes
        return GradientBoostingClassifier(n_estimators=30, learning_rate=0.1, max_depth=2, subsample=0.8,
                                          random_state=seed)
    if family == "mlp":
        return MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-2, max_iter=300, random_state=seed)
    raise ValueError(f"unknown model family {family!r}; expected one of {list(FAMILIES)}")


def make_pipeline_for(estimator: Any, numeric: Sequence[str], categorical: Sequence[str] = ("task",)) -> Pipeline:
    """Impute (median) and scale the numeric columns, one-hot the categorical ones (unknown values → all zeros,
    so a task never seen in training gets no task-specific offset), then the estimator."""
    num = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler())
    parts: list[tuple[str, Any, list[str]]] = [("num", num, list(numeric))]
    if categorical:
        parts.append(("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=False), list(categorical)))
    return Pipeline([("prep", ColumnTransformer(parts)), ("model", estimator)])


def _pair_frame(table: pd.DataFrame, feats: Sequence[str], tasks: Sequence[str]) -> pd.DataFrame:
    """Pair-level inputs of the classifier: features averaged over the parent tasks, plus a multi-hot of tasks."""
    rows = table.drop_duplicates(["pair", "task"])
    x = rows.groupby("pair", sort=False)[list(feats)].mean()
    hot = pd.crosstab(rows.pair, rows.task).reindex(index=x.index, columns=list(tasks), fill_value=0).clip(0, 1)
    hot.columns = [f"task_{t}" for t in tasks]
    return pd.concat([x, hot.astype(float)], axis=1)


@dataclass
class Predictor:
    """Fitted SimMerge predictor: level + per-operator advantage regressors, and a best-candidate classifier."""

    family: str
    feature_names: list[str]
    tasks: list[str]
    candidates: pd.DataFrame
    level: Pipeline
    regressors: dict[str, Pipeline]
    classifier: Pipeline | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: The best fixed candidate on the training pairs (method, setting) and the head start it gets in the ranking:
    #: a candidate must be predicted ``margin`` better to replace it (a hedge against predicted noise).
    fixed: tuple[str, str] | None = None
    margin: float = 0.0
    #: Score a candidate from both orders of the pair when the rows carry their mirror (:func:`with_mirror`):
    #: q̂(a, b, c) = ½ [ŷ(a, b, c) + ŷ(b, a, mirror(c))]. The models are fit on one order only; averaging the two
    #: predictions cancels part of their error (measured on default, leave-one-expert-out, chapter 04: gap closure
    #: 0.48 → 0.53 with the owner share; 0.11 → 0.22 at margin 0 before it existed).
    symmetric: bool = True

    @property
    def methods(self) -> list[str]:
        return list(self.regressors)

    def _check(self, features: pd.DataFrame) -> None:
        missing = [c for c in self.feature_names if c not in features.columns]
        if missing:
            raise ValueError(f"features lack the predictor's input column(s) {missing[:5]}"
                             f"{' …' if len(missing) > 5 else ''}")

    def predict_rows(self, rows: pd.DataFrame) -> np.ndarray:
        """ŷ for rows that carry the features, ``task``, ``method`` and the ``p_*`` setting columns."""
        self._check(rows)
        out = self.level.predict(rows[[*self.feature_names, "task"]]).astype(float)
        rows = rows.assign(**{OWNER_SHARE: owner_share(rows)})
        for method, model in self.regressors.items():
            mask = (rows.method == method).to_numpy()
            if mask.any():
                out[mask] += model.predict(rows.loc[mask, [*self.feature_names, *PARAM_COLUMNS, OWNER_SHARE, "task"]])
        unknown = ~rows.method.isin(self.regressors).to_numpy()
        if unknown.any():
            raise ValueError(f"no regressor for operator(s) {sorted(set(rows.method[unknown]))}")
        return out

    def predict_symmetric(self, rows: pd.DataFrame) -> np.ndarray:
        """ŷ averaged over the two orders of each pair: ½ [ŷ(a, b, c) + ŷ(b, a, mirror(c))] on rows that carry
        their ``mirror__`` features, the one-sided ŷ on rows that do not."""
        own = self.predict_rows(rows)
        mirror_cols = [MIRROR_PREFIX + c for c in self.feature_names]
        if not set(mirror_cols) <= set(rows.columns):
            return own
        has = rows[mirror_cols].notna().any(axis=1).to_numpy()
        if not has.any():
            return own
        flipped = rows.loc[has].copy()
        flipped[self.feature_names] = rows.loc[has, mirror_cols].to_numpy()
        if OWNER_COLUMN in flipped.columns:
            flipped[OWNER_COLUMN] = 1.0 - flipped[OWNER_COLUMN]
        for col in MIRRORED_PARAMS:
            carries = flipped.parameters.map(lambda p, c=col: c in _params(p)).to_numpy(bool)
            flipped.loc[carries, col] = 1.0 - flipped.loc[carries, col]
        out = own.copy()
        out[has] = (own[has] + self.predict_rows(flipped)) / 2
        return out

    def expand(self, features: pd.DataFrame) -> pd.DataFrame:
        """Cross the features rows (pair × task) with every candidate (operator × setting)."""
        self._check(features)
        mirror = [MIRROR_PREFIX + c for c in self.feature_names if MIRROR_PREFIX + c in features.columns]
        base = features[[c for c in ("pair", "a", "b", "task", OWNER_COLUMN) if c in features.columns]
                        + self.feature_names + mirror].copy()
        if "pair" not in base.columns:
            base.insert(0, "pair", pair_key(base.a, base.b))
        base = base.drop_duplicates(["pair", "task"])
        cand = self.candidates[["method", "setting", "parameters", *PARAM_COLUMNS]]
        return base.merge(cand, how="cross")

    @_single_threaded
    def rank(self, features: pd.DataFrame) -> pd.DataFrame:
        """Predicted quality of every candidate for every pair in ``features`` (its rows = the tasks averaged).

        Columns: pair, a, b, method, setting, parameters, predicted, score (= predicted, + ``margin`` for the fixed
        candidate), rank (1 = chosen: highest score), sorted per pair."""
        rows = self.expand(features)
        rows["predicted"] = self.predict_symmetric(rows) if self.symmetric else self.predict_rows(rows)
        q = rows.groupby(["pair", "a", "b", "method", "setting", "parameters"], sort=False).predicted.mean()
        q = q.reset_index()
        q["score"] = q.predicted
        if self.fixed is not None and self.margin:
            q.loc[(q.method == self.fixed[0]) & (q.setting == self.fixed[1]), "score"] += self.margin
        q = q.sort_values(["pair", "score"], ascending=[True, False], kind="stable")
        q["rank"] = q.groupby("pair", sort=False).cumcount() + 1
        return q.reset_index(drop=True)

    def select(self, features: pd.DataFrame) -> pd.DataFrame:
        """The chosen candidate per pair (argmax of predicted quality)."""
        return self.rank(features).query("rank == 1").reset_index(drop=True)

    @_single_threaded
    def classify(self, features: pd.DataFrame) -> pd.Series:
        """The classifier's pick (``"method|setting"``) per pair; empty when the predictor has no classifier."""
        if self.classifier is None:
            return pd.Series(dtype=object)
        frame = features.copy()
        if "pair" not in frame.columns:
            frame["pair"] = pair_key(frame.a, frame.b)
        x = _pair_frame(frame, self.feature_names, self.tasks)
        return pd.Series(self.classifier.predict(x), index=x.index, name="classified")


@_single_threaded
def fit_predictor(table: pd.DataFrame, family: str = "gbm", seed: int = 0, classifier: bool = True,
                  metadata: Mapping[str, Any] | None = None, cv_folds: int = 4, margin: float = 0.0,
                  symmetric: bool = True) -> Predictor:
    """Fit a :class:`Predictor` on a :func:`training_table` (``margin``, ``symmetric``: see :class:`Predictor`).

    ``family`` is one of :data:`FAMILIES`, or ``"auto"``: the family with the lowest mean regret in
    :func:`choose_family` (grouped CV over ``cv_folds`` folds of experts, on this table only)."""
    if table.empty:
        raise ValueError("fit_predictor: empty training table")
    if family == "auto":
        family = str(choose_family(table, seed=seed, k=cv_folds).iloc[0].family)
    feats = feature_columns(table)
    tasks = sorted(table.task.unique())
    # pair difficulty: the mean over candidates of each pair × task, shared by every candidate
    level_y = table.groupby(["pair", "task"]).norm_score.transform("mean")
    level_rows = table.assign(_level=level_y).drop_duplicates(["pair", "task"])
    level = make_pipeline_for(_regressor(family, seed), feats)
    level.fit(level_rows[[*feats, "task"]], level_rows._level)
    regressors = {}
    advantage = table.norm_score - level_y
    inputs = table.assign(**{OWNER_SHARE: owner_share(table)})
    for method in dict.fromkeys(table.method):
        mask = (table.method == method).to_numpy()
        model = make_pipeline_for(_regressor(family, seed), [*feats, *PARAM_COLUMNS, OWNER_SHARE])
        model.fit(inputs.loc[mask, [*feats, *PARAM_COLUMNS, OWNER_SHARE, "task"]], advantage[mask])
        regressors[method] = model
    clf = None
    if classifier:
        q = pair_quality(table)
        best = q.loc[q.groupby("pair", sort=False).quality.idxmax()].set_index("pair")
        x = _pair_frame(table, feats, tasks)
        y = (best.method + "|" + best.setting).reindex(x.index)
        est = _classifier(family, seed) if y.nunique() > 1 else DummyClassifier(strategy="most_frequent")
        clf = make_pipeline_for(est, list(x.columns), categorical=())
        clf.fit(x, y)
    candidates = table[["method", "setting", "parameters", *PARAM_COLUMNS]].drop_duplicates(["method", "setting"])
    meta = {"n_rows": int(len(table)), "n_pairs": int(table.pair.nunique()), **dict(metadata or {})}
    fixed = _fixed_choices(pair_quality(table))[0]
    return Predictor(family, feats, tasks, candidates.reset_index(drop=True), level, regressors, clf, meta, fixed,
                     float(margin), symmetric)


# ================================================================================================ splits
@dataclass(frozen=True)
class Split:
    """One held-out group: the pairs trained on and the pairs tested on (keys ``"a|b"``)."""

    name: str
    kind: str  # "task", "expert" or "experts"
    held_out: tuple[str, ...]
    train: tuple[str, ...]
    test: tuple[str, ...]


def _pair_info(table: pd.DataFrame) -> pd.DataFrame:
    info = table.groupby("pair", sort=False).agg(a=("a", "first"), b=("b", "first"),
                                                 tasks=("task", lambda s: frozenset(s)))
    return info


def leave_one_task_out(table: pd.DataFrame) -> list[Split]:
    """One split per task t: test = the pairs with t among their parent tasks, train = every other pair (so t's
    rows, features and pairs never reach training)."""
    info = _pair_info(table)
    splits = []
    for task in sorted(table.task.unique()):
        has = info.tasks.map(lambda ts, t=task: t in ts)
        splits.append(Split(f"task={task}", "task", (task,), tuple(info.index[~has]), tuple(info.index[has])))
    return splits


def expert_folds(table: pd.DataFrame, k: int | None = None, seed: int = 0) -> list[Split]:
    """Folds of experts: fold g tests the pairs with an expert in group g and trains on the pairs with no expert in
    group g (so no test expert is seen in training). ``k=None``: one expert per fold (leave-one-expert-out)."""
    info = _pair_info(table)
    experts = sorted(set(info.a) | set(info.b))
    if k is None or k >= len(experts):
        groups = [[e] for e in experts]
        kind = "expert"
    else:
        order = np.random.default_rng(seed).permutation(len(experts))
        groups = [sorted(experts[i] for i in order[g::k]) for g in range(k)]
        kind = "experts"
    splits = []
    for group in groups:
        hit = info.a.isin(group) | info.b.isin(group)
        if hit.all() or not hit.any():
            continue  # nothing left to train on / nothing to test
        name = f"expert={group[0]}" if kind == "expert" else f"experts={','.join(group)}"
        splits.append(Split(name, kind, tuple(group), tuple(info.index[~hit]), tuple(info.index[hit])))
    return splits


def leave_one_expert_out(table: pd.DataFrame) -> list[Split]:
    """One split per expert e: test = the pairs containing e, train = the pairs without e."""
    return expert_folds(table, None)


def check_split(table: pd.DataFrame, split: Split) -> None:
    """Raise AssertionError if anything held out leaks into training: a shared pair (in either order), a held-out
    expert in a training pair, or a held-out task among a training pair's tasks."""
    train, test = set(split.train), set(split.test)
    flipped = {"|".join(p.split("|")[::-1]) for p in test}
    assert not train & (test | flipped), f"{split.name}: pairs in both train and test"
    rows = table[table.pair.isin(train)]
    if split.kind == "task":
        assert not rows.task.isin(split.held_out).any(), f"{split.name}: held-out task in training rows"
        info = _pair_info(table)
        assert not any(set(split.held_out) & info.tasks[p] for p in train), f"{split.name}: held-out task's pair"
    else:
        assert not (rows.a.isin(split.held_out) | rows.b.isin(split.held_out)).any(), \
            f"{split.name}: held-out expert in a training pair"


# ============================================================================================ evaluation
def _fixed_choices(train_q: pd.DataFrame) -> tuple[tuple[str, str], dict[str, str]]:
    """Best fixed candidate overall and each operator's best setting, by mean quality over the training pairs."""
    means = train_q.groupby(["method", "setting"], sort=False).quality.mean()
    best = means.idxmax()
    per_method = {m: str(s.idxmax()[1]) for m, s in means.groupby(level=0, sort=False)}
    return (str(best[0]), str(best[1])), per_method


def evaluate_split(table: pd.DataFrame, split: Split, family: str = "gbm", seed: int = 0,
                   predictor: Predictor | None = None, margin: float = 0.0, symmetric: bool = True
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fit on the split's training pairs (unless ``predictor`` is given), choose for its test pairs.

    Returns (records, candidates): one record per test pair (chosen, oracle, fixed and per-operator fixed
    qualities, within-pair Spearman, the classifier's choice) and one row per test pair × candidate (predicted,
    measured)."""
    check_split(table, split)
    train = table[table.pair.isin(split.train)]
    test = table[table.pair.isin(split.test)]
    model = predictor or fit_predictor(train, family, seed, margin=margin, symmetric=symmetric)
    fixed, per_method = _fixed_choices(pair_quality(train))
    return _score_choices(model, test, fixed, per_method, split.name)


def _score_choices(model: Predictor, test: pd.DataFrame, fixed: tuple[str, str], per_method: Mapping[str, str],
                   split: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    measured = pair_quality(test)
    ranked = model.rank(test)
    cand = measured.merge(ranked[["pair", "method", "setting", "predicted", "score", "rank"]],
                          on=["pair", "method", "setting"], how="left")
    cand.insert(0, "split", split)
    picks = model.classify(test)
    records = []
    for pair, g in cand.groupby("pair", sort=False):
        g = g.dropna(subset=["predicted"])
        if g.empty:
            continue
        chosen = g.loc[g.score.idxmax()]
        top = g.loc[g.quality.idxmax()]
        q = dict(zip(g.method + "|" + g.setting, g.quality))
        rec = {"split": split, "pair": pair, "a": chosen.a, "b": chosen.b, "same_base": bool(chosen.same_base),
               "chosen_method": chosen.method, "chosen_setting": chosen.setting, "chosen": float(chosen.quality),
               "predicted": float(chosen.predicted), "oracle": float(top.quality), "oracle_method": top.method,
               "oracle_setting": top.setting, "fixed_method": fixed[0], "fixed_setting": fixed[1],
               "fixed": q.get(f"{fixed[0]}|{fixed[1]}", np.nan),
               "spearman": _spearman(g.predicted, g.quality)}
        for method, setting in per_method.items():
            rec[f"fixed_{method}"] = q.get(f"{method}|{setting}", np.nan)
        if pair in picks.index:
            rec["classifier"] = q.get(str(picks[pair]), np.nan)
        records.append(rec)
    return pd.DataFrame(records), cand


def _spearman(x: pd.Series, y: pd.Series) -> float:
    if len(x) < 3 or np.ptp(np.asarray(y, float)) == 0 or np.ptp(np.asarray(x, float)) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def evaluate(table: pd.DataFrame, splits: Sequence[Split], family: str = "gbm", seed: int = 0,
             progress: bool = True, margin: float = 0.0, symmetric: bool = True
             ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`evaluate_split` over ``splits``, concatenated (records, candidates)."""
    recs, cands = [], []
    for split in tqdm(splits, desc=f"evaluate[{family}]", disable=not progress, leave=False):
        r, c = evaluate_split(table, split, family, seed, margin=margin, symmetric=symmetric)
        recs.append(r)
        cands.append(c)
    return pd.concat(recs, ignore_index=True), pd.concat(cands, ignore_index=True)


def selection_metrics(records: pd.DataFrame, tol: float = TOL) -> dict[str, float]:
    """The headline metrics of a records table (see the module docstring for the formulas)."""
    chosen, oracle = records.chosen.to_numpy(float), records.oracle.to_numpy(float)
    fixed = records.fixed.to_numpy(float)
    gap = oracle.mean() - fixed.mean()
    out = {"pairs": float(records.pair.nunique()), "records": float(len(records)),
           "quality_simmerge": float(chosen.mean()), "quality_best_fixed": float(fixed.mean()),
           "quality_oracle": float(oracle.mean()), "selection_accuracy": float(np.mean(chosen >= oracle - tol)),
           "mean_regret": float(np.mean(oracle - chosen)), "fixed_regret": float(np.mean(oracle - fixed)),
           "gap_closure": float((chosen.mean() - fixed.mean()) / gap) if gap > 1e-12 else float("nan"),
           "spearman": float(np.nanmean(records.spearman)) if records.spearman.notna().any() else float("nan")}
    for col in [c for c in records.columns if c.startswith("fixed_") and c not in ("fixed_method", "fixed_setting")]:
        other = records[col].to_numpy(float)
        out[f"win_rate_vs_{col[6:]}"] = float(np.mean(chosen > other + tol))
        out[f"loss_rate_vs_{col[6:]}"] = float(np.mean(chosen < other - tol))
    if "classifier" in records.columns:
        cq = records.classifier.to_numpy(float)
        out["quality_classifier"] = float(np.nanmean(cq))
        out["gap_closure_classifier"] = (float((np.nanmean(cq) - fixed.mean()) / gap) if gap > 1e-12
                                         else float("nan"))
    return out


def bootstrap_ci(records: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 tol: float = TOL) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of :func:`selection_metrics`, resampling held-out *pairs* (all records of a
    drawn pair come along, so a pair tested in several splits counts as one unit)."""
    groups = [g for _, g in records.groupby("pair", sort=False)]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        pick = rng.integers(0, len(groups), len(groups))
        sample = pd.concat([groups[i] for i in pick], ignore_index=True)
        for k, v in selection_metrics(sample, tol).items():
            draws.setdefault(k, []).append(v)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: (float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi)))
            for k, v in draws.items() if k not in ("pairs", "records") and np.isfinite(v).any()}


def choose_family(table: pd.DataFrame, families: Sequence[str] = FAMILIES, k: int = 4, seed: int = 0,
                  progress: bool = False) -> pd.DataFrame:
    """Grouped cross-validation of model families over ``k`` folds of experts (:func:`expert_folds`).

    One row per family: mean_regret, gap_closure, selection_accuracy, spearman; sorted best (lowest regret) first."""
    splits = expert_folds(table, k, seed)
    if not splits:
        raise ValueError("choose_family: too few experts for grouped cross-validation")
    rows = []
    for family in families:
        records, _ = evaluate(table, splits, family, seed, progress=progress)
        m = selection_metrics(records)
        rows.append({"family": family, **{k_: m[k_] for k_ in ("mean_regret", "gap_closure", "selection_accuracy",
                                                                 "spearman", "quality_simmerge")}})
    return pd.DataFrame(rows).sort_values("mean_regret", kind="stable").reset_index(drop=True)


def with_margin(records: pd.DataFrame, candidates: pd.DataFrame, margin: float) -> pd.DataFrame:
    """The records an evaluation would give with :attr:`Predictor.margin` = ``margin``, without refitting: the
    margin only moves the choice, so it is re-applied to the candidates' predictions (each split's fixed choice)."""
    fixed = records[["split", "pair", "fixed_method", "fixed_setting"]]
    cand = candidates.dropna(subset=["predicted"]).merge(fixed, on=["split", "pair"])
    is_fixed = (cand.method == cand.fixed_method) & (cand.setting == cand.fixed_setting)
    cand = cand.assign(score=cand.predicted + margin * is_fixed)
    best = cand.loc[cand.groupby(["split", "pair"], sort=False).score.idxmax()]
    best = best.set_index(["split", "pair"])[["method", "setting", "quality", "predicted"]]
    out = records.set_index(["split", "pair"]).copy()
    out["chosen_method"], out["chosen_setting"] = best.method, best.setting
    out["chosen"], out["predicted"] = best.quality, best.predicted
    return out.reset_index()[records.columns]


def choose_margin(table: pd.DataFrame, family: str, margins: Sequence[float] = MARGINS,
                  k: int = 4, seed: int = 0) -> pd.DataFrame:
    """Grouped cross-validation of the hedge margin (folds of experts, as :func:`choose_family`).

    One row per margin: mean_regret, gap_closure, selection_accuracy; sorted best (lowest regret) first, ties to
    the smaller margin."""
    records, cand = evaluate(table, expert_folds(table, k, seed), family, seed, progress=False)
    rows = []
    for margin in margins:
        m = selection_metrics(with_margin(records, cand, margin))
        rows.append({"margin": float(margin), **{k_: m[k_] for k_ in ("mean_regret", "gap_closure",
                                                                        "selection_accuracy")}})
    return pd.DataFrame(rows).sort_values(["mean_regret", "margin"], kind="stable").reset_index(drop=True)


def nested_evaluation(table: pd.DataFrame, scheme: str = "expert", families: Sequence[str] = ("forest", "gbm"),
                      margins: Sequence[float] = MARGINS, k: int = 4, seed: int = 0, n_boot: int = 1000,
                      progress: bool = True, tol: float = TOL) -> dict[str, Any]:
    """:func:`heldout_evaluation` with the model family and the hedge margin chosen *inside* each split.

    For every held-out group, grouped cross-validation over ``k`` folds of experts of that split's *training* pairs
    picks the (family, margin) with the lowest mean regret (ties: the earlier family, the smaller margin); a
    predictor with that choice is then fit on all training pairs and scored on the held-out pairs. Nothing about
    the held-out pairs informs any choice, unlike choosing once on the whole catalogue.
    Returns {"records", "candidates", "choices" (split, family, margin), "metrics", "ci"}."""
    if scheme not in ("expert", "task"):
        raise ValueError(f"scheme must be 'expert' or 'task', got {scheme!r}")
    splits = leave_one_expert_out(table) if scheme == "expert" else leave_one_task_out(table)
    recs, cands, choices = [], [], []
    for split in tqdm(splits, desc="nested evaluation", disable=not progress, leave=False):
        check_split(table, split)
        train = table[table.pair.isin(split.train)]
        family, margin = families[0], float(margins[0])  # one option: nothing to choose, no inner CV
        if len(families) * len(margins) > 1:
            best = math.inf
            for fam in families:
                records, cand = evaluate(train, expert_folds(train, k, seed), fam, seed, progress=False)
                for m in margins:
                    regret = selection_metrics(with_margin(records, cand, m))["mean_regret"]
                    if regret < best - 1e-12:
                        best, family, margin = regret, fam, float(m)
        r, c = evaluate_split(table, split, family, seed, margin=margin)
        recs.append(r)
        cands.append(c)
        choices.append({"split": split.name, "family": family, "margin": margin})
    records = pd.concat(recs, ignore_index=True)
    return {"records": records, "candidates": pd.concat(cands, ignore_index=True),
            "choices": pd.DataFrame(choices), "metrics": selection_metrics(records, tol),
            "ci": bootstrap_ci(records, n_boot, seed, tol=tol)}


def noise_gap(labels: pd.DataFrame, n_sim: int = 200, seed: int = 0) -> float:
    """The oracle - fixed gap that evaluation noise alone would produce: a null-model simulation.

    For each pair, every candidate is given the same true accuracy per parent task, p_t = mean over candidates of
    the measured score; scores are redrawn as Binomial(n_eval, p_t) / n_eval, normalized like the labels, and
    averaged over the tasks. The mean over pairs and draws of max_c q(c) - q(c_0) is the gap an oracle would show
    over a fixed choice even if no candidate were better than another (compare it with the measured gap)."""
    rng = np.random.default_rng(seed)
    rows = labels[labels.parent_task.astype(bool)].dropna(subset=["norm_score"])
    gaps = []
    for _, pair in rows.groupby(["a", "b"], sort=False):
        score = pair.pivot_table(index=["method", "setting"], columns="task", values="score", aggfunc="mean")
        norm = pair.pivot_table(index=["method", "setting"], columns="task", values="norm_score", aggfunc="mean")
        if len(score) < 2:
            continue
        factor = (norm / score.where(score > 0)).mean().fillna(0.0).to_numpy()  # 1 / ref(t), shared by candidates
        p = score.mean().to_numpy().clip(0, 1)
        n = int(pair.n_eval.iloc[0]) if "n_eval" in pair else 50
        draws = rng.binomial(n, p, size=(n_sim, len(score), len(p))) / n * factor
        q = draws.mean(axis=2)
        gaps.append(float((q.max(axis=1) - q[:, 0]).mean()))
    return float(np.mean(gaps)) if gaps else float("nan")


def transfer_records(predictor: Predictor, train_table: pd.DataFrame, transfer_table: pd.DataFrame
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Apply a predictor unchanged to another catalogue's pairs. The fixed choices come from ``train_table`` (the
    catalogue it was trained on): nothing about the new catalogue is used except its features to choose."""
    fixed, per_method = _fixed_choices(pair_quality(train_table))
    return _score_choices(predictor, transfer_table, fixed, per_method, "transfer")


def permutation_importance_table(predictor: Predictor, table: pd.DataFrame, n_repeats: int = 3, seed: int = 0
                                 ) -> pd.DataFrame:
    """Permutation importance of each feature for *selection*: the increase of mean regret on ``table`` when the
    feature's values are shuffled across its pair × task rows (the other features of a row stay; its mirror column,
    the same feature of the other order, is shuffled with the same permutation so the feature is gone from both).

    Columns: feature, importance (mean increase of regret), std. All shuffled copies are ranked in one batch."""
    rng = np.random.default_rng(seed)
    measured = pair_quality(table)
    oracle = measured.groupby("pair").quality.max()
    rows_ = table.drop_duplicates(["pair", "task"]).reset_index(drop=True)
    copies, keys = [rows_.assign(_copy="base")], ["base"]
    for feat in predictor.feature_names:
        for r in range(n_repeats):
            shuffled = rows_.copy()
            order = rng.permutation(len(shuffled))
            for col in (feat, MIRROR_PREFIX + feat):
                if col in shuffled.columns:
                    shuffled[col] = shuffled[col].to_numpy()[order]
            copies.append(shuffled.assign(_copy=f"{feat}#{r}"))
            keys.append(f"{feat}#{r}")
    batch = pd.concat(copies, ignore_index=True)
    batch["pair"] = batch.pair + "@" + batch._copy  # each copy is a separate "pair" for the ranking
    ranked = predictor.rank(batch)
    chosen = ranked[ranked["rank"] == 1].copy()
    chosen[["orig", "copy"]] = chosen.pair.str.rsplit("@", n=1, expand=True)
    chosen = chosen.merge(measured[["pair", "method", "setting", "quality"]].rename(columns={"pair": "orig"}),
                          on=["orig", "method", "setting"])
    chosen["regret"] = oracle.reindex(chosen.orig).to_numpy() - chosen.quality.to_numpy()
    regret = chosen.groupby("copy").regret.mean()
    base = float(regret["base"])
    out = []
    for feat in predictor.feature_names:
        scores = [float(regret[f"{feat}#{r}"]) - base for r in range(n_repeats)]
        out.append({"feature": feat, "importance": float(np.mean(scores)), "std": float(np.std(scores))})
    return pd.DataFrame(out).sort_values("importance", ascending=False, kind="stable").reset_index(drop=True)


def heldout_importance(table: pd.DataFrame, family: str = "gbm", k: int = 4, seed: int = 0, n_repeats: int = 2
                       ) -> pd.DataFrame:
    """:func:`permutation_importance_table` on held-out pairs: for each of ``k`` folds of experts, fit on the
    training pairs and permute on the test pairs; the importances are averaged over the folds."""
    frames = []
    for split in expert_folds(table, k, seed):
        check_split(table, split)
        model = fit_predictor(table[table.pair.isin(split.train)], family, seed, classifier=False)
        frames.append(permutation_importance_table(model, table[table.pair.isin(split.test)], n_repeats, seed))
    if not frames:
        raise ValueError("heldout_importance: too few experts for folds")
    out = pd.concat(frames).groupby("feature", sort=False).agg(importance=("importance", "mean"),
                                                               std=("importance", "std")).reset_index()
    return out.sort_values("importance", ascending=False, kind="stable").reset_index(drop=True)


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
    """Write the predictor with skops (atomically); metadata includes feature names, tasks, candidates, versions."""
    import skops.io as sio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**predictor.metadata, "versions": _versions()}
    state = {"format": PREDICTOR_FORMAT, "family": predictor.family, "feature_names": list(predictor.feature_names),
             "tasks": list(predictor.tasks), "candidates": json.dumps(predictor.candidates.to_dict("records")),
             "metadata": json.dumps(meta), "level": predictor.level, "regressors": dict(predictor.regressors),
             "classifier": predictor.classifier, "fixed": list(predictor.fixed) if predictor.fixed else None,
             "margin": float(predictor.margin), "symmetric": bool(predictor.symmetric)}
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
        raise ValueError(f"{path}: not a simmerge predictor (format {PREDICTOR_FORMAT} expected)")
    return Predictor(family=state["family"], feature_names=list(state["feature_names"]), tasks=list(state["tasks"]),
                     candidates=pd.DataFrame(json.loads(state["candidates"])), level=state["level"],
                     regressors=dict(state["regressors"]), classifier=state["classifier"],
                     metadata=json.loads(state["metadata"]),
                     fixed=tuple(state["fixed"]) if state.get("fixed") else None, margin=float(state.get("margin", 0)),
                     symmetric=bool(state.get("symmetric", False)))


# ============================================================================================ the profile's tables
def load_tables(profile: str, transfer: bool = False, build: bool = True, progress: bool = True
                ) -> tuple[pd.DataFrame, pd.DataFrame, Any]:
    """(features, labels, catalogue) of a profile's catalogue, or of its transfer catalogue (``transfer=True``).

    Reads ``build/features/<name>.parquet`` and ``build/labels/<name>.parquet`` when they exist (name = the profile,
    or ``transfer-<profile>``); otherwise, with ``build``, trains / computes / collects what is missing with the
    profile's settings (chapters 00, 01 and 03), else raises FileNotFoundError."""
    from . import zoo
    from .catalogue import Catalogue
    from .features import features_path, load_or_compute
    from .labels import collect_labels, labels_path, load_labels, make_jobs, profile_settings
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
    if fpath.is_file():
        features = pd.read_parquet(fpath)
        if OWNER_COLUMN not in features.columns:  # written before the column existed: a catalogue fact
            from .features import add_task_owner

            features = add_task_owner(features, catalogue)
    else:
        features = load_or_compute(catalogue, name, n_probes=N_PROBES.get(profile), progress=progress)
    if lpath.is_file():
        labels = load_labels(lpath)
    else:
        jobs = make_jobs(catalogue, **profile_settings(profile))
        labels = collect_labels(catalogue, jobs, lpath, progress=progress)
    return features, labels, catalogue


def heldout_evaluation(table: pd.DataFrame, scheme: str = "expert", family: str = "gbm", seed: int = 0,
                       n_boot: int = 1000, progress: bool = True, tol: float = TOL, margin: float = 0.0,
                       symmetric: bool = True) -> dict[str, Any]:
    """Evaluate ``family`` on held-out groups (``scheme`` = ``"expert"``: leave-one-expert-out, ``"task"``:
    leave-one-task-out). Returns {"records", "candidates", "metrics", "ci"}."""
    if scheme not in ("expert", "task"):
        raise ValueError(f"scheme must be 'expert' or 'task', got {scheme!r}")
    splits = leave_one_expert_out(table) if scheme == "expert" else leave_one_task_out(table)
    records, cand = evaluate(table, splits, family, seed, progress, margin, symmetric)
    return {"records": records, "candidates": cand, "metrics": selection_metrics(records, tol),
            "ci": bootstrap_ci(records, n_boot, seed, tol=tol)}


# ============================================================================================ synthetic tables
def synthetic_tables(n_experts: int = 6, tasks: Sequence[str] = ("reverse", "sort", "max"), n_bases: int = 2,
                     seed: int = 0, noise: float = 0.02) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A features table and a labels table with a planted rule, for tests and teaching.

    Each expert has a random direction (a random share of one common direction plus noise); for a same-base pair
    ``st_tv_cos`` is the cosine of the directions (0 across bases) and ``fn_js_mean`` a noisy function of it.
    Quality: linear (weight 0.5) = 0.6 + 0.3 cos, TIES = 0.8 - 0.2 cos, linear (0.3 / 0.7) a little below linear 0.5,
    plus noise: the best operator flips at cos = 0.4."""
    rng = np.random.default_rng(seed)
    experts = []
    for b in range(n_bases):
        for i in range(n_experts):
            experts.append((f"base{b}-e{i}", f"base{b}", tasks[i % len(tasks)]))
    shared = rng.normal(size=8)  # a component some experts share, so that cosines spread over (-0.5, 1)
    dirs = {e: rng.uniform(0, 3) * shared + rng.normal(size=8) for e, _, _ in experts}
    frows, lrows = [], []
    grid = [("linear", "weight=0.3", '{"weight": 0.3}'), ("linear", "weight=0.5", '{"weight": 0.5}'),
            ("linear", "weight=0.7", '{"weight": 0.7}'), ("ties", "density=0.2", '{"density": 0.2}')]
    for i, (a, ba, ta) in enumerate(experts):
        for j, (b, bb, tb) in enumerate(experts):
            if i == j or ta == tb:
                continue
            da, db = dirs[a], dirs[b]
            cos = float(da @ db / np.linalg.norm(da) / np.linalg.norm(db)) if ba == bb else 0.0
            parents = [t for t in tasks if t in (ta, tb)]
            for t in parents:
                frows.append({"a": a, "b": b, "task": t, "same_base": int(ba == bb), "st_tv_cos": cos,
                              "fn_js_mean": 0.5 - 0.4 * cos + rng.normal(0, 0.02),
                              "st_sign_conflict": rng.uniform(0.3, 0.6)})
            if i > j:
                continue  # labels hold unordered pairs in catalogue order, features both orders
            for method, setting, params in grid:
                base_q = 0.6 + 0.3 * cos if method == "linear" else 0.8 - 0.2 * cos
                if setting in ("weight=0.3", "weight=0.7"):
                    base_q -= 0.05
                for t in tasks:
                    parent = t in parents
                    lrows.append({"job_key": f"{a}|{b}|{method}|{setting}", "a": a, "b": b, "base_a": ba,
                                  "base_b": bb, "same_base": ba == bb, "method": method, "setting": setting,
                                  "parameters": params, "task": t, "parent_task": parent,
                                  "score": 0.0, "norm_score": float(base_q + rng.normal(0, noise)) if parent else 0.1,
                                  "norm_even": np.nan, "norm_odd": np.nan, "char_score": np.nan, "seed": 0, "n_eval": 50, "seconds": 0.0, "versions": "{}", "recipe": ""})
    return pd.DataFrame(frows), pd.DataFrame(lrows)


# ============================================================================================ the command
def _recommend(args: argparse.Namespace) -> int:
    from .catalogue import Catalogue
    from .features import pair_features
    from .labels import job_recipe
    from .probes import N_PROBES
    from .recipe import Recipe

    catalogue = Catalogue.load(args.catalogue)
    predictor = load_predictor(args.predictor or predictor_path(catalogue.name.removeprefix("transfer-")))
    for name in (args.a, args.b):
        if catalogue.entry(name).role != "expert":
            raise ValueError(f"{name!r} is a base of catalogue {catalogue.name!r}; recommend merges two experts")
    tasks = args.task or sorted(set(catalogue.entry(args.a).tasks) | set(catalogue.entry(args.b).tasks))
    unknown = sorted(set(tasks) - set(catalogue.tasks))
    if unknown:
        raise ValueError(f"task(s) {unknown} not in catalogue {catalogue.name!r} (its tasks: {catalogue.tasks})")
    bases = [catalogue.path(catalogue.base_of(x).name) for x in (args.a, args.b)]
    n_probes = args.n_probes or N_PROBES["default"]
    feats = pair_features(catalogue.path(args.a), catalogue.path(args.b), *bases, tasks, n_probes=n_probes)
    feats["a"], feats["b"] = args.a, args.b
    if predictor.symmetric:  # the other order's features, so each candidate is scored from both orders
        back = pair_features(catalogue.path(args.b), catalogue.path(args.a), *bases[::-1], tasks, n_probes=n_probes)
        back["a"], back["b"] = args.b, args.a
        feats = with_mirror(feats, pd.concat([feats, back], ignore_index=True))
    ranked = predictor.rank(feats)
    print(f"# {args.a} + {args.b} on {', '.join(tasks)} — predicted merge quality (predictor: {predictor.family}; "
          f"score = predicted + {predictor.margin:g} for the best fixed choice {'/'.join(predictor.fixed or ())})")
    print(ranked[["rank", "method", "setting", "predicted", "score"]].head(args.top)
          .to_string(index=False, float_format="%.3f"))
    best = ranked.iloc[0]
    recipe = job_recipe(best.method, args.a, args.b, catalogue.base_of(args.a).name, json.loads(best.parameters),
                        args.seed)
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
    p = subparsers.add_parser("recommend", help="rank merge operators for two experts by predicted quality",
                              description="Compute the pair's features, rank every operator × setting by the "
                                          "predictor's quality, and print the recipe of the best one.")
    p.add_argument("a", help="first expert (a setting's weight is its share; SLERP's t runs from it)")
    p.add_argument("b", help="second expert")
    p.add_argument("--task", action="append", help="task to merge for (repeatable; default: both experts' tasks)")
    p.add_argument("--catalogue", default=str(build_path("zoo", "default")), help="catalogue folder "
                   "(default build/zoo/default)")
    p.add_argument("--predictor", help="predictor .skops file (default build/predictor/<catalogue name>.skops)")
    p.add_argument("--n-probes", type=int, help="probe prompts per task for the features (default 32)")
    p.add_argument("--top", type=int, default=20, help="rows of the ranking to print")
    p.add_argument("--seed", type=int, default=0, help="seed written into the recipe (DARE masks)")
    p.add_argument("--out", help="also write the recipe YAML here")
    p.set_defaults(func=_recommend)
