"""The features table: one row per ordered pair × task (:func:`compute_features`, :func:`pair_features`), its
file under ``build/features`` and the cache that reuses it (:func:`load_or_compute`), and the views chapter 01
draws (:func:`describe_features`, :func:`similarity_matrix`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..catalogue import Catalogue
from ..checkpoint import read_card
from ..paths import build_path
from ..probes import DEFAULT_N_PROBES, ProbeSet, kit_probes, profile_n_probes
from .columns import (FEATURE_COLUMNS, FEATURE_DOCS, FEATURE_VERSION, FUNCTIONAL_COLUMNS, ID_COLUMNS, NAN,
                      STRUCTURAL_COLUMNS, TIES_DENSITY)
from .functional import _blas_threads_for, functional_features
from .probing import ProbeCache, ProbeOutputs
from .refs import ModelLike, ModelRef, as_ref
from .structural import structural_features, swap_structural


def task_owner(tasks_a: Sequence[str] | None, tasks_b: Sequence[str] | None, task: str) -> float:
    """``task_of_a``: which parent was fine-tuned on ``task`` — 1 if only a, 0 if only b, 0.5 if both or neither,
    NaN when a model's tasks are unknown (no card). Known without merging or evaluating (a catalogue fact), and what
    tells a predictor that weight w on a is the share of the task's own expert (w) or of the other one (1 - w)."""
    if tasks_a is None or tasks_b is None:
        return NAN
    in_a, in_b = task in tasks_a, task in tasks_b
    return 0.5 if in_a == in_b else float(in_a)


def add_task_owner(frame: pd.DataFrame, catalogue: Catalogue) -> pd.DataFrame:
    """``frame`` (rows a, b, task) with its ``task_of_a`` column (:func:`task_owner`) filled from the catalogue's
    model entries: for tables written before the column existed."""
    def tasks(name: str) -> list[str] | None:
        try:
            return list(catalogue.entry(name).tasks)
        except KeyError:
            return None

    out = frame.copy()
    out["task_of_a"] = [task_owner(tasks(a), tasks(b), t) for a, b, t in zip(out.a, out.b, out.task)]
    return out


def _card_tasks(ref: ModelRef) -> list[str] | None:
    if ref.path is None:
        return None
    card = read_card(ref.path)
    return list(card["tasks"]) if isinstance(card.get("tasks"), list) else None


def pair_features(a: ModelLike, b: ModelLike, base_a: ModelLike, base_b: ModelLike, tasks: str | Sequence[str],
                  probes: ProbeSet | None = None, n_probes: int = DEFAULT_N_PROBES, cache: ProbeCache | None = None,
                  density: float = TIES_DENSITY, functional: bool = True, structural: bool = True) -> pd.DataFrame:
    """Feature rows of one ordered pair, one per task, with the columns of :func:`compute_features`.

    Any model may be a checkpoint folder or an in-memory model (see :func:`as_ref`), so the planner can measure a
    running merged model against the next expert without saving it. Pass one ``cache`` across calls to reuse
    probe outputs. Disabled feature kinds are NaN.
    """
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    ra, rb = as_ref(a, "a"), as_ref(b, "b")
    rba, rbb = as_ref(base_a, "base_a"), as_ref(base_b, "base_b")
    probes = probes or kit_probes(tasks, n_probes)
    cache = cache or ProbeCache(disk_dir=None)
    st = structural_features(ra, rb, rba, rbb, density) if structural else dict.fromkeys(STRUCTURAL_COLUMNS, NAN)
    rows = []
    outs_a = cache.outputs(ra, probes, tasks) if functional else {}
    outs_b = cache.outputs(rb, probes, tasks) if functional else {}
    outs_ba = cache.outputs(rba, probes, tasks) if functional else {}
    outs_bb = cache.outputs(rbb, probes, tasks) if functional else {}
    with _blas_threads_for([*outs_a.values(), *outs_b.values()]):
        for task in tasks:
            fn = functional_features(outs_a[task], outs_b[task], outs_ba[task], outs_bb[task]) if functional else \
                dict.fromkeys(FUNCTIONAL_COLUMNS, NAN)
            rows.append({"a": ra.name, "b": rb.name, "task": task, "same_base": int(rba.key == rbb.key),
                         "task_of_a": task_owner(_card_tasks(ra), _card_tasks(rb), task), **fn, **st})
    return pd.DataFrame(rows, columns=ID_COLUMNS + FEATURE_COLUMNS)


def _pair_tasks(catalogue: Catalogue, a: str, b: str, tasks: Literal["parents", "all"]) -> list[str]:
    if tasks == "all":
        return list(catalogue.tasks)
    if tasks != "parents":
        raise ValueError(f"tasks must be 'parents' or 'all', got {tasks!r}")
    wanted = set(catalogue.entry(a).tasks) | set(catalogue.entry(b).tasks)
    return [t for t in catalogue.tasks if t in wanted]


def compute_features(catalogue: Catalogue, n_probes: int = DEFAULT_N_PROBES,
                     pairs: Sequence[tuple[str, str]] | None = None, tasks: Literal["parents", "all"] = "parents",
                     progress: bool = True, probes: ProbeSet | None = None, cache: ProbeCache | None = None,
                     density: float = TIES_DENSITY) -> pd.DataFrame:
    """The features table: one row per ordered pair × task.

    ``pairs`` defaults to every ordered pair of experts, same-task pairs included
    (``catalogue.pairs("all", ordered=True, distinct_tasks=False)``); ``tasks`` is
    ``"parents"`` (the tasks of a and b) or ``"all"`` (every catalogue task). Columns: ``a, b, task, same_base,
    task_of_a`` (:func:`task_owner`), then :data:`FEATURE_COLUMNS`. Probe outputs are computed once per model (and
    cached on disk by default); structural features once per unordered pair.
    """
    pairs = list(pairs) if pairs is not None else catalogue.pairs("all", ordered=True, distinct_tasks=False)
    if not pairs:
        raise ValueError(f"catalogue {catalogue.name!r}: no pairs of experts to compute features for")
    pair_tasks = {p: _pair_tasks(catalogue, *p, tasks) for p in pairs}
    needed: dict[str, list[str]] = {}
    for (a, b), ts in pair_tasks.items():
        for m in (a, b, catalogue.base_of(a).name, catalogue.base_of(b).name):
            needed.setdefault(m, [])
            needed[m] += [t for t in ts if t not in needed[m]]
    probes = probes or kit_probes(sorted({t for ts in pair_tasks.values() for t in ts}), n_probes)
    cache = cache or ProbeCache()
    order = {m.name: i for i, m in enumerate(catalogue.models)}  # catalogue order keeps the work deterministic
    refs = {m: ModelRef.folder(catalogue.path(m), m) for m in sorted(needed, key=order.__getitem__)}
    unordered = sorted({tuple(sorted(p, key=order.__getitem__)) for p in pairs},
                       key=lambda p: (order[p[0]], order[p[1]]))
    bar = tqdm(total=len(needed) + len(unordered) + len(pair_tasks), desc="features", disable=not progress,
               unit="step")
    outputs: dict[str, dict[str, ProbeOutputs]] = {}
    for m, ts in sorted(needed.items(), key=lambda item: order[item[0]]):
        bar.set_postfix_str(f"probes {m}")
        outputs[m] = cache.outputs(refs[m], probes, ts)
        bar.update()
    structural: dict[tuple[str, str], dict[str, float]] = {}
    for a, b in unordered:
        bar.set_postfix_str(f"weights {a} × {b}")
        st = structural_features(refs[a], refs[b], refs[catalogue.base_of(a).name], refs[catalogue.base_of(b).name],
                                 density)
        structural[(a, b)], structural[(b, a)] = st, swap_structural(st)
        bar.update()
    bar.set_postfix_str("comparing outputs")
    rows = []
    with _blas_threads_for(o for per_task in outputs.values() for o in per_task.values()):
        for (a, b), ts in pair_tasks.items():
            base_a, base_b = catalogue.base_of(a).name, catalogue.base_of(b).name
            same = int(base_a == base_b)
            for t in ts:
                fn = functional_features(outputs[a][t], outputs[b][t], outputs[base_a][t], outputs[base_b][t])
                rows.append({"a": a, "b": b, "task": t, "same_base": same,
                             "task_of_a": task_owner(catalogue.entry(a).tasks, catalogue.entry(b).tasks, t),
                             **fn, **structural[(a, b)]})
            bar.update()
    bar.close()
    return pd.DataFrame(rows, columns=ID_COLUMNS + FEATURE_COLUMNS)


def describe_features() -> pd.DataFrame:
    """:data:`FEATURE_DOCS` as a table: feature, kind (functional / structural), definition."""
    return pd.DataFrame([{"feature": k, "kind": "functional" if k.startswith("fn_") else "structural",
                          "definition": v} for k, v in FEATURE_DOCS.items()])


def similarity_matrix(table: pd.DataFrame, column: str, diagonal: float | None = None) -> pd.DataFrame:
    """Model × model matrix of one feature, averaged over tasks and over the two orders (a, b) and (b, a).

    ``diagonal`` fills the self-similarity (1 for cosines and CKA, 0 for divergences); default: the column's
    value for identical models where known (``cos``/``cka``/``agree``/``jaccard`` → 1, else 0).
    """
    if column not in table.columns:
        raise KeyError(f"no feature column {column!r} in the table")
    mean = table.groupby(["a", "b"])[column].mean().unstack()
    names = sorted(set(mean.index) | set(mean.columns))
    mean = mean.reindex(index=names, columns=names)
    sym = (mean + mean.T) / 2
    sym = sym.fillna(mean).fillna(mean.T)
    if diagonal is None:
        diagonal = 1.0 if any(k in column for k in ("cos", "cka", "agree", "jaccard", "balance")) else 0.0
    values = sym.to_numpy(copy=True)
    np.fill_diagonal(values, diagonal)
    return pd.DataFrame(values, index=names, columns=names)


def features_path(profile: str) -> Path:
    """Where chapter 01 writes the features table of a profile: ``build/features/<profile>.parquet``."""
    return build_path("features", f"{profile}.parquet")


def write_table(df: pd.DataFrame, path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> Path:
    """Write a features table as Parquet atomically, with an optional JSON sidecar ``<path>.meta.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    if meta is not None:
        side = path.with_name(path.name + ".meta.json")
        tmp_meta = side.with_name(side.name + ".tmp")
        tmp_meta.write_text(json.dumps(dict(meta), indent=2) + "\n")
        os.replace(tmp_meta, side)
    return path


def _table_meta(catalogue: Catalogue, n_probes: int, tasks: str, density: float) -> dict[str, Any]:
    models = {m.name: ModelRef.folder(catalogue.path(m.name)).key for m in catalogue.models}
    return {"feature_version": FEATURE_VERSION, "catalogue": str(catalogue.root.resolve()),
            "recipe_hash": catalogue.recipe_hash, "n_probes": n_probes, "tasks": tasks, "density": density,
            "models": models}


def load_or_compute(catalogue: Catalogue, profile: str, n_probes: int | None = None,
                    tasks: Literal["parents", "all"] = "parents", density: float = TIES_DENSITY,
                    force: bool = False, progress: bool = True) -> pd.DataFrame:
    """The features table of ``profile`` from ``build/features/<profile>.parquet``, computed (and written) when
    missing or made from other checkpoints, probes or feature definitions."""
    n_probes = n_probes or profile_n_probes(profile)
    path = features_path(profile)
    meta = _table_meta(catalogue, n_probes, tasks, density)
    side = path.with_name(path.name + ".meta.json")
    if not force and path.is_file() and side.is_file():
        try:
            if json.loads(side.read_text()) == meta:
                cached = pd.read_parquet(path)
                if "task_of_a" not in cached.columns:
                    # written before the column existed: a catalogue fact, added without recomputing anything, and
                    # written back so that readers of the file (chapters 05, 06, 08) see it too
                    cached = add_task_owner(cached, catalogue)
                    write_table(cached, path, meta)
                return cached
        except json.JSONDecodeError:
            pass
    df = compute_features(catalogue, n_probes=n_probes, tasks=tasks, progress=progress, density=density)
    write_table(df, path, meta)
    return df
