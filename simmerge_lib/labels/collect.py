"""Collecting labels: the expert reference table, then every job missing from the labels table, appended
atomically as they finish so that a run resumes where it stopped (:func:`collect_labels`)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from tqdm.auto import tqdm

from ..catalogue import Catalogue
from .jobs import (_LATER_COLUMNS, LABEL_COLUMNS, LABELS_FORMAT, REFERENCE_COLUMNS, Job, _digest, catalogue_hash,
                   labels_path, make_jobs, reference_path)
from .run import _Runner, _versions


def _write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _read_table(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame(columns=list(columns))
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ValueError(f"{path}: not a readable Parquet labels table ({exc})") from None
    for column in _LATER_COLUMNS:
        if column in columns and column not in frame.columns:
            frame[column] = np.nan
    missing = set(columns) - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: not a labels table (missing column(s) {sorted(missing)})")
    return frame


def _task_expert(catalogue: Catalogue, base: str, task: str) -> str | None:
    """The first expert of ``task`` on ``base`` (catalogue order): the normalizer of a non-parent task."""
    return next((e.name for e in catalogue.experts(base) if task in e.tasks), None)


def _reference_jobs(catalogue: Catalogue, jobs: Sequence[Job]) -> list[Job]:
    """One identity job per expert a normalization needs (the parents, and for non-parent tasks the task's expert
    on base(a)), scored on every task any job evaluates, with the jobs' n."""
    used = {t for j in jobs for t in j.tasks}
    tasks = tuple(t for t in catalogue.tasks if t in used)
    needed: dict[tuple[str, int], None] = {}
    for job in jobs:
        names = [job.a, job.b] + [_task_expert(catalogue, job.base_a, t) for t in job.tasks
                                  if t not in job.parent_tasks]
        for name in names:
            if name is not None:
                needed[(name, job.n_eval)] = None
    out = []
    for name, n_eval in needed:
        recipe = {"merge_method": "expert", "models": [{"model": name}]}
        key = _digest({"recipe": recipe, "n_eval": n_eval, "evaluator": catalogue.evaluator, "tasks": list(tasks),
                       "catalogue": catalogue_hash(catalogue), "format": LABELS_FORMAT})
        entry = catalogue.entry(name)
        out.append(Job(key, name, name, entry.base or "", entry.base or "", "expert", "", {}, recipe, tasks,
                       tuple(entry.tasks), 0, n_eval, catalogue.evaluator))
    return out


class _Sink:
    """Accumulates finished rows and appends them to the Parquet file atomically, in batches."""

    def __init__(self, path: Path, existing: pd.DataFrame, columns: Sequence[str], every: int, seconds: float):
        self.path, self.frame, self.columns = path, existing, list(columns)
        self.rows: list[dict[str, Any]] = []
        self.jobs, self.every, self.seconds, self.last = 0, every, seconds, time.monotonic()

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        self.jobs += 1
        if self.jobs >= self.every or time.monotonic() - self.last >= self.seconds:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            new = pd.DataFrame(self.rows, columns=self.columns)
            self.frame = new if self.frame.empty else pd.concat([self.frame, new], ignore_index=True)
            _write_parquet_atomic(self.frame, self.path)
        self.rows, self.jobs, self.last = [], 0, time.monotonic()


def _run_into(runner: _Runner, jobs: Sequence[Job], sink: _Sink, desc: str, progress: bool,
              rows_of: Callable[[Job, Mapping[str, Any]], list[dict[str, Any]]],
              callback: Callable[[Job, list[dict[str, Any]]], None] | None = None) -> None:
    """Run ``jobs``, adding ``rows_of(job, result)`` to ``sink`` as each finishes; the finished rows are flushed
    however the run stops (an exception or Ctrl-C included)."""
    by_key = {j.key: j for j in jobs}
    bar = tqdm(total=len(jobs), desc=desc, disable=not (progress and bool(jobs)),
               mininterval=0.5)  # no empty bar when every job is already in the table
    try:
        for result in runner.run(jobs):
            job = by_key[result["key"]]
            rows = rows_of(job, result)
            sink.add(rows)
            bar.update()
            if callback is not None:
                callback(job, rows)
    finally:
        sink.flush()
        bar.close()


def _collect_references(runner: _Runner, catalogue: Catalogue, jobs: Sequence[Job], ref_file: Path,
                        progress: bool) -> dict[tuple[str, str, int], float]:
    """Every expert the jobs involve, scored once with the same evaluator and n (the normalizers; the ones not in
    ``ref_file`` yet are run and appended): ``{(model, task, n_eval): score}``."""
    refs = _read_table(ref_file, REFERENCE_COLUMNS)
    all_refs = _reference_jobs(catalogue, jobs)
    ref_jobs = [j for j in all_refs if j.key not in set(refs.ref_key)]
    sink = _Sink(ref_file, refs, REFERENCE_COLUMNS, 10 ** 9, 10 ** 9)

    def rows_of(job: Job, result: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [{"ref_key": job.key, "model": job.a, "base": job.base_a, "task": t, "own_task": t in job.parent_tasks,
                 "score": s, "n_eval": job.n_eval, "seconds": result["seconds"]} for t, s in result["scores"].items()]

    _run_into(runner, ref_jobs, sink, "experts", progress, rows_of)
    current = sink.frame[sink.frame.ref_key.isin({j.key for j in all_refs})]
    return {(r.model, r.task, int(r.n_eval)): float(r.score) for r in current.itertuples(index=False)}


def _in_job_order(table: pd.DataFrame, jobs: Sequence[Job]) -> pd.DataFrame:
    """The rows of ``jobs`` only, in job order (tasks in order within a job), with the table's column types."""
    keys = list(dict.fromkeys(j.key for j in jobs))
    order = {k: i for i, k in enumerate(keys)}
    table = table[table.job_key.isin(order)].copy()
    table["_order"] = table.job_key.map(order)
    return (table.sort_values(["_order", "task"], kind="stable").drop(columns="_order").reset_index(drop=True)
            .astype({"same_base": bool, "parent_task": bool, "seed": int, "n_eval": int}))


def collect_labels(catalogue: Catalogue | str | os.PathLike[str], jobs: Sequence[Job] | None = None,
                   out: str | os.PathLike[str] | None = None, executor: str = "local", workers: int | None = None,
                   progress: bool = True, device: str = "cpu", address: str | None = None, num_cpus: float = 1,
                   num_gpus: float = 0, flush_every: int = 32, flush_seconds: float = 10.0,
                   callback: Callable[[Job, list[dict[str, Any]]], None] | None = None,
                   start_method: str | None = None) -> pd.DataFrame:
    """Run the jobs missing from ``out`` (default ``build/labels/<catalogue name>.parquet``) and return the table.

    Resumable: rows of job keys already in ``out`` are kept and their jobs skipped; new rows are appended atomically
    every ``flush_every`` jobs / ``flush_seconds`` and whenever the run stops (an exception or Ctrl-C included), so
    an interrupted run loses at most the jobs in flight. ``jobs`` defaults to :func:`make_jobs` (default grid).
    ``callback(job, rows)`` is called after each finished job (raising in it stops the run, rows kept).
    ``start_method`` of the local pool: ``fork`` where available (fast), else ``spawn``.
    Returns the rows of ``jobs`` only (in job order), even if ``out`` holds others."""
    catalogue = catalogue if isinstance(catalogue, Catalogue) else Catalogue.load(catalogue)
    jobs = list(make_jobs(catalogue) if jobs is None else jobs)
    out = Path(out) if out is not None else labels_path(catalogue.name)
    workers = int(workers or min(4, os.cpu_count() or 1))
    root = str(catalogue.root.resolve())
    with _Runner(root, executor, workers, device, address, num_cpus, num_gpus, start_method) as runner:
        # 1. every expert involved, scored once with the same evaluator and n: the normalizers.
        ref = _collect_references(runner, catalogue, jobs, reference_path(out), progress)
        # 2. the merges not yet in the table
        existing = _read_table(out, LABEL_COLUMNS)
        done = set(existing.job_key)
        todo = [j for j in dict((j.key, j) for j in jobs).values() if j.key not in done]
        sink = _Sink(out, existing, LABEL_COLUMNS, flush_every, flush_seconds)
        versions = _versions()
        _run_into(runner, todo, sink, "labels", progress,
                  lambda job, result: _rows(catalogue, job, result, ref, versions), callback)
    return _in_job_order(sink.frame, jobs)


def _reference_score(catalogue: Catalogue, job: Job, task: str, ref: Mapping[tuple[str, str, int], float]) -> float:
    parents = [p for p in (job.a, job.b) if task in catalogue.entry(p).tasks]
    if parents:
        values = [ref.get((p, task, job.n_eval), np.nan) for p in parents]
        return float(np.nanmax(values)) if not all(np.isnan(values)) else np.nan
    own = _task_expert(catalogue, job.base_a, task)
    return ref.get((own, task, job.n_eval), np.nan) if own else np.nan


def _rows(catalogue: Catalogue, job: Job, result: Mapping[str, Any], ref: Mapping[tuple[str, str, int], float],
          versions: str) -> list[dict[str, Any]]:
    recipe_text = yaml.safe_dump(catalogue.with_paths(job.recipe), sort_keys=False)
    parameters = json.dumps(job.parameters, sort_keys=True)
    rows = []
    for task in job.tasks:
        score = float(result["scores"][task])
        detail = result.get("detail", {}).get(task, {})
        denom = _reference_score(catalogue, job, task, ref)
        valid = bool(denom and np.isfinite(denom) and denom > 0)

        def norm(value: float) -> float:
            return value / denom if valid else np.nan

        rows.append({"job_key": job.key, "a": job.a, "b": job.b, "base_a": job.base_a, "base_b": job.base_b,
                     "same_base": job.base_a == job.base_b, "method": job.method, "setting": job.setting,
                     "parameters": parameters, "task": task, "parent_task": task in job.parent_tasks,
                     "score": score, "norm_score": norm(score), "norm_even": norm(detail.get("even", np.nan)),
                     "norm_odd": norm(detail.get("odd", np.nan)), "char_score": detail.get("char", np.nan),
                     "seed": job.seed, "n_eval": job.n_eval,
                     "seconds": float(result["seconds"]), "versions": versions, "recipe": recipe_text})
    return rows


def load_labels(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a labels table written by :func:`collect_labels` (checking its columns)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no labels table (run `simmerge labels CATALOGUE --out {path}`)")
    return _read_table(path, LABEL_COLUMNS)
