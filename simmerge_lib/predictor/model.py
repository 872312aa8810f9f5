"""The predictor's models: the advantage and level regressors, the best-candidate classifier, and the
:class:`Predictor` that ranks candidates and advises keeping a parent (see the package docstring)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import ExtraTreesRegressor, RandomForestClassifier, RandomForestRegressor
from sklearn.impute import SimpleImputer
from sklearn.linear_model import RidgeCV
from sklearn.multioutput import MultiOutputRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from threadpoolctl import threadpool_limits

from ..features import DESCRIPTOR_COLUMNS
from .training import candidates_of, feature_columns, pair_quality


#: Model families compared inside each split.
FAMILIES = ("ridge", "forest", "extra")
#: Version of the saved predictor and of the nested-evaluation cache: bump it when the code changes what they hold.
PREDICTOR_FORMAT = 4


def quiet(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run with BLAS / OpenMP pools limited to one thread: on tables this small, thread start-up and contention
    (on a shared laptop CPU) cost far more than the arithmetic."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with threadpool_limits(limits=1), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nan-means over all-NaN imputed columns
            return fn(*args, **kwargs)

    wrapper.__doc__, wrapper.__name__ = fn.__doc__, fn.__name__
    return wrapper


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

    @quiet
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

    @quiet
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


@quiet
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
