"""A profile's bandit tables: the features and current labels of chapters 01 and 03, plus the labels of a
registry operator outside chapter 03's grid (collected once, resumable)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from .. import profiles
from ..catalogue import Catalogue
from ..features import features_path
from ..labels import collect_labels, labels_path, load_labels, make_jobs, profile_settings
from ..operators import default_grid
from ..paths import build_path
from ..zoo import catalogue_dir


NEW_OPERATOR = "della"


def bandit_tables(profile: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The features and labels tables of a profile: build/features/<profile>.parquet, build/labels/<profile>.parquet.

    When the profile's catalogue exists, only the labels of its current jobs are kept (a table may still hold rows
    of an older catalogue or label format, which chapter 03 leaves in place)."""
    fpath = features_path(profile)
    if not fpath.is_file():
        raise FileNotFoundError(f"{fpath}: no features table (run chapter 01 or `simmerge features`)")
    labels = load_labels(labels_path(profile))
    if profile in profiles.PROFILES:
        labels = current_labels(labels, profile)
    return pd.read_parquet(fpath), labels


def current_labels(labels: pd.DataFrame, profile: str) -> pd.DataFrame:
    """The rows of ``labels`` whose job keys the profile's catalogue and settings make now (all rows when the
    catalogue is not built)."""
    folder = catalogue_dir(profile)
    if not (folder / "catalogue.json").is_file():
        return labels
    keys = {j.key for j in make_jobs(Catalogue.load(folder), **profile_settings(profile))}
    return labels[labels.job_key.isin(keys)].reset_index(drop=True)


def registry_labels_path(profile: str) -> Any:
    """Where chapter 06 keeps the labels of operators outside chapter 03's grid: build/bandit/<profile>-registry."""
    return build_path("bandit", f"{profile}-registry.parquet")


def registry_labels(catalogue: Any, labels: pd.DataFrame, methods: Sequence[str], out: Any = None,
                    settings: int = 1, workers: int | None = None, progress: bool = False) -> pd.DataFrame:
    """Labels of operators the label grid does not hold (e.g. ones added to the operator registry later), on every
    pair of ``labels``, with the same evaluation (n_eval, seed, the parents' tasks): the first ``settings`` of each
    operator's default grid (:func:`simmerge_lib.operators.default_grid`). Collected by chapter 03's
    :func:`~simmerge_lib.labels.collect_labels` into ``out`` (resumable; default :func:`registry_labels_path` of
    the catalogue's name), so a rerun merges nothing."""
    grid = {m: default_grid([m])[m][:settings] for m in methods}
    pairs = list(labels.drop_duplicates(["a", "b"])[["a", "b"]].itertuples(index=False, name=None))
    jobs = make_jobs(catalogue, grid, pairs=pairs, n_eval=int(labels.n_eval.iloc[0]), seed=int(labels.seed.iloc[0]),
                     tasks="parents")
    out = out if out is not None else registry_labels_path(catalogue.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    return collect_labels(catalogue, jobs, out, workers=workers, progress=progress)


def stream_tables(profile: str, new_operator: str | None = NEW_OPERATOR, progress: bool = False
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`bandit_tables` plus, when chapter 03's grid does not hold ``new_operator`` (a registry operator, e.g.
    :data:`NEW_OPERATOR`), its labels on every pair of the table (:func:`registry_labels`: collected once into
    build/bandit/<profile>-registry.parquet, read back on a rerun). ``None`` or ``"auto"`` adds nothing."""
    features, labels = bandit_tables(profile)
    if new_operator in (None, "auto") or new_operator in set(labels.method):
        return features, labels
    folder = catalogue_dir(profile)
    if not (folder / "catalogue.json").is_file():
        raise FileNotFoundError(f"{folder}: no catalogue to merge {new_operator!r} on (run chapter 00)")
    extra = registry_labels(Catalogue.load(folder), labels, [new_operator], out=registry_labels_path(profile),
                            progress=progress)
    return features, pd.concat([labels, extra], ignore_index=True)
