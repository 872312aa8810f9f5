"""The training table of the predictor: owner-oriented feature rows of each same-base pair × parent task, with
the measured targets ``y__<method|setting>`` of every candidate and ``keep_other`` (see the package docstring)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..catalogue import pair_key
from ..features import FEATURE_COLUMNS
from ..operators import candidate_key


#: Feature sets compared inside each split: every signal, or only the functional (probe) ones.
FEATURE_SETS = ("all", "functional")


#: A pair's rows are joined on these columns; a candidate is named ``method|setting``
#: (:func:`~simmerge_lib.operators.candidate_key`).
ROW_KEYS = ["pair", "task"]


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
    lab = lab.assign(candidate=candidate_key(lab.method, lab.setting))
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
