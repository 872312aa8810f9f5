"""Nested evaluation: every choice (family, feature set, margin) made by grouped cross-validation inside each
outer split, and the result cached by content in ``build/predictor/nested/``."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from tqdm.auto import tqdm

from ..checkpoint import atomic_folder, write_json_atomic
from ..paths import build_path
from .evaluation import cluster_bootstrap_ci, evaluate_split, gap_closure, selection_metrics
from .model import PREDICTOR_FORMAT, quiet
from .splits import Split, grouped_folds, leave_one_expert_out, leave_one_task_out


#: Hedge margins compared inside each split (the best fixed candidate's head start).
MARGINS = (0.0, 0.005, 0.01, 0.02)


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


@quiet
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
    computation."""
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
