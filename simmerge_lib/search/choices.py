"""What a search is compared with, and which pairs it runs on: the best fixed candidate of the labels, the SimMerge
predictor's choice (from a predictor file, or held out: trained without the pair's experts and their siblings), the
label grid's oracle for the pair, and pairs spread over the labels' oracle − best-fixed gap.

A choice is ``(method, parameters)``, a point of the labels' grid; :func:`uniform_recipe` turns one into a
layer-wise recipe (the same candidate on every group)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..catalogue import Catalogue
from ..labels import best_fixed, load_labels, merge_quality, oracle_vs_fixed
from ..operators import setting_parameters
from ..predictor import (expert_tasks, fit_predictor, load_predictor, owner_rows, recommend_rows, siblings,
                         training_table)
from .problem import MergeProblem
from .spaces import LayerwiseRecipe, LayerwiseSpace, setting_from_grid

Choice = tuple[str, dict[str, Any]]
#: (features, labels, reference) of a catalogue (:func:`simmerge_lib.predictor.load_tables`).
Tables = tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]


def _grid_parameters(labels: pd.DataFrame, method: str, setting: str) -> dict[str, Any]:
    """The parameters of a (method, setting label) of the labels table, as the table stores them."""
    return json.loads(labels[(labels.method == method) & (labels.setting == setting)].parameters.iloc[0])


def _same_base_quality(labels: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(merge quality of every pair × candidate, the same-base rows with a quality)."""
    quality = merge_quality(labels)
    return quality, quality[quality.same_base].dropna(subset=["quality"])


def _gap_ranking(catalogue: Catalogue, same: pd.DataFrame) -> pd.DataFrame:
    """Pairs of the catalogue by decreasing oracle − best-fixed gap (ties by name)."""
    gaps = oracle_vs_fixed(same).sort_values(["gap", "a", "b"], ascending=[False, True, True])
    names = {m.name for m in catalogue.models}
    return gaps[gaps.a.isin(names) & gaps.b.isin(names)].reset_index(drop=True)


def best_fixed_choice(labels_file: str | Path | None) -> Choice | None:
    """The labels table's best fixed (method, setting) over same-base pairs, as (method, parameters); None without
    a labels table."""
    if labels_file is None or not Path(labels_file).exists():
        return None
    labels = load_labels(labels_file)
    quality, same = _same_base_quality(labels)
    method, setting = best_fixed(same if len(same) else quality)
    return method, _grid_parameters(labels, method, setting)


def simmerge_choice(problem: MergeProblem, predictor_file: str | Path | None,
                    features_file: str | Path | None = None, n_probes: int = 8) -> Choice | None:
    """The SimMerge predictor's (method, parameters) for the pair; None without a predictor file.

    Features come from the features table when it has the pair's rows, else they are computed (``n_probes``)."""
    if predictor_file is None or not Path(predictor_file).exists():
        return None
    predictor = load_predictor(predictor_file)
    rows = None
    want = pd.DataFrame({"a": problem.a, "b": problem.b, "task": list(problem.tasks)})
    if features_file is not None and Path(features_file).exists():
        try:
            rows = owner_rows(pd.read_parquet(features_file), want)
        except ValueError:  # the table lacks this pair's owner-oriented rows: compute them
            rows = None
    if rows is None:
        rows = recommend_rows(problem.catalogue, problem.a, problem.b, n_probes)
    best = predictor.recommend(rows).iloc[0]
    return str(best.method), setting_parameters(str(best.setting))


def uniform_recipe(space: LayerwiseSpace, method: str, parameters: Mapping[str, Any]
                   ) -> tuple[LayerwiseRecipe, dict[str, Any]]:
    """A labels-grid choice as a layer-wise recipe (the same operator on every group) and its space parameters."""
    params = space.uniform_params(setting_from_grid(method, parameters))
    return space.from_params(params), params


def choose_pair(catalogue: Catalogue, labels_file: str | Path | None = None) -> tuple[str, str]:
    """A same-base pair worth searching: the one with the largest oracle − best-fixed gap in the labels (so search
    has room to help), else the first same-base pair of experts with different tasks."""
    if labels_file is not None and Path(labels_file).exists():
        _, same = _same_base_quality(load_labels(labels_file))
        if len(same):
            gaps = _gap_ranking(catalogue, same)
            if len(gaps):
                return str(gaps.a[0]), str(gaps.b[0])
    for a, b in catalogue.pairs("same_base"):
        if set(catalogue.entry(a).tasks) != set(catalogue.entry(b).tasks):
            return a, b
    raise ValueError(f"catalogue {catalogue.name!r}: no same-base pair of experts to search")


def choose_pairs(catalogue: Catalogue, labels: pd.DataFrame, n: int) -> list[tuple[str, str]]:
    """``n`` same-base pairs of experts of different tasks spread over the labels' ranking of the oracle − best
    fixed gap (the pair with the most room for a better recipe, the one with the least, and evenly in between), so
    that search is tried where choosing matters and where it does not."""
    gaps = _gap_ranking(catalogue, _same_base_quality(labels)[1])
    if gaps.empty:
        return [choose_pair(catalogue)]
    picks = sorted({int(round(i)) for i in np.linspace(0, len(gaps) - 1, min(n, len(gaps)))})
    return [(str(gaps.a[i]), str(gaps.b[i])) for i in picks]


def heldout_choice(tables: Tables, a: str, b: str, family: str = "forest", feature_set: str = "all",
                   seed: int = 0) -> dict[str, Any]:
    """The SimMerge choice for (a, b) from a predictor that never trained on a pair holding either expert or one of
    their siblings (chapter 04's leave-one-expert-out), and the best fixed candidate of the same training pairs.

    ``tables``: (features, labels, reference) of the catalogue (:func:`simmerge_lib.predictor.load_tables`).
    Returns choice (method, parameters), predicted (its predicted quality), abstain (the predictor would rather
    keep a parent), fixed (method, parameters), train_pairs."""
    features, labels, reference = tables
    table = training_table(features, labels, reference)
    sib = siblings(table)
    held = {a, b} | sib.get(a, set()) | sib.get(b, set())
    train = table[~(table.a.isin(held) | table.b.isin(held))]
    if train.pair.nunique() < 2:
        raise ValueError(f"held-out SimMerge choice for {a}|{b}: fewer than two training pairs without them")
    predictor = fit_predictor(train, family=family, feature_set=feature_set, seed=seed, classifier=False)
    task_of = expert_tasks(table)
    rows = owner_rows(features, pd.DataFrame({"a": a, "b": b, "task": [task_of[a], task_of[b]]}))
    rec = predictor.recommend(rows).iloc[0]
    fixed_method, fixed_setting = predictor.fixed.split("|", 1)
    return {"choice": (str(rec.method), setting_parameters(str(rec.setting))), "predicted": float(rec.predicted),
            "abstain": bool(rec.abstain), "fixed": (fixed_method, setting_parameters(fixed_setting)),
            "train_pairs": int(train.pair.nunique())}


def label_oracle(labels: pd.DataFrame, a: str, b: str) -> tuple[str, dict[str, Any], float] | None:
    """The pair's best candidate of the label grid in hindsight: (method, parameters, its labelled quality); None
    when the labels do not hold the pair."""
    q = merge_quality(labels[((labels.a == a) & (labels.b == b)) | ((labels.a == b) & (labels.b == a))])
    q = q.dropna(subset=["quality"])
    if q.empty:
        return None
    top = q.loc[q.quality.idxmax()]
    return str(top.method), _grid_parameters(labels, top.method, top.setting), float(top.quality)
