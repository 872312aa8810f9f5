"""Distributed merging (chapter 07): the output shards of one plan dealt to workers, each writing its own shards
into the shared ``OUT.partial``; the coordinator runs the one merge driver (:mod:`.driver`) around them.

The output is byte-identical to a single-process merge because the shard layout is planned once, from the headers,
and every worker re-plans from the same headers and checks the plan's fingerprint before writing.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError
from ..recipe import Recipe
from .driver import prepare_output, write_output
from .execute import run_shards
from .layout import plan_merge

#: Where workers run: local processes, Ray tasks, or this process (debugging).
BACKENDS = ("process", "ray", "serial")


def assign_shards(sizes: Sequence[int], workers: int) -> list[list[int]]:
    """Deal shard indices to ``workers`` bins, largest first into the lightest bin (LPT: makespan <= 4/3 OPT)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    bins: list[list[int]] = [[] for _ in range(workers)]
    load = [0] * workers
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        w = min(range(workers), key=lambda w: load[w])
        bins[w].append(i)
        load[w] += sizes[i]
    return [sorted(b) for b in bins]


def run_worker(recipe: Mapping[str, Any], out: str, shards: Sequence[int], fingerprint: str,
               shard_size: str | int = "2GB", threads: int | None = None, device: str = "cpu",
               compute_dtype: str | None = None) -> dict[str, Any]:
    """One worker: re-plan from the headers (cheap), check it matches the coordinator's plan, and write the
    given output shards into ``OUT.partial`` (each ``*.tmp`` renamed when complete). Returns bytes and seconds."""
    start = time.perf_counter()
    rec = Recipe.from_dict(dict(recipe), source="<worker>")
    plan = plan_merge(rec, shard_size, compute_dtype)
    if plan.fingerprint != fingerprint:
        raise CheckpointError(f"{out}: worker's plan differs from the coordinator's (inputs changed?)")
    partial = Path(out).with_name(Path(out).name + ".partial")
    if not shards:
        return {"pid": os.getpid(), "shards": [], "bytes": 0, "seconds": 0.0}
    run_shards(plan, partial, torch.device(device), shards, threads or 1)
    return {"pid": os.getpid(), "shards": list(shards), "bytes": sum(plan.shards[i].size for i in shards),
            "seconds": time.perf_counter() - start}


def _run_worker_star(args: tuple[Any, ...]) -> dict[str, Any]:
    return run_worker(*args)


def _worker_reports(backend: str, args: Sequence[tuple[Any, ...]], threads: int | None) -> Iterator[dict[str, Any]]:
    """Each worker's report, as the workers finish (``args``: one :func:`run_worker` call each)."""
    if backend == "serial":
        for a in args:
            yield run_worker(*a)
    elif backend == "process":
        with ProcessPoolExecutor(len(args), mp_context=mp.get_context("spawn")) as pool:
            yield from pool.map(_run_worker_star, args)
    else:
        import ray  # optional dependency (the "ray" extra): only this backend needs it

        if not ray.is_initialized():
            ray.init(num_cpus=max(len(args), 1), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        remote = ray.remote(num_cpus=threads or 1)(run_worker)
        yield from ray.get([remote.remote(*a) for a in args])


def merge_distributed(recipe: Recipe, out: str | os.PathLike[str], workers: int = 2, backend: str = "process",
                      shard_size: str | int = "2GB", threads: int | None = 1, device: str = "cpu",
                      resume: bool = False, force: bool = False, progress: bool = True,
                      compute_dtype: str | None = None) -> dict[str, Any]:
    """Merge with the output shards spread over ``workers``: ``backend`` ``"process"`` (local processes),
    ``"ray"`` (Ray tasks: on a cluster ``OUT`` must be on a filesystem every node mounts) or ``"serial"``
    (the workers' code in this process, for debugging). The coordinator plans once, deals the shards
    (:func:`assign_shards`), waits, then writes the one index and the side files and renames ``OUT.partial``
    (the driver of :func:`~.driver.merge`, resume included). Returns a report: shards per worker, seconds per
    worker and in all, ``out``. ``compute_dtype``: as in :func:`~.driver.merge`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: one of {', '.join(BACKENDS)}")
    start = time.perf_counter()
    target = prepare_output(recipe, out, shard_size, compute_dtype, resume, force, tool="merge-distributed")
    plan, rec = target.plan, recipe.with_paths_resolved().to_dict()
    reports: list[dict[str, Any]] = []

    def write_shards(partial_dir: Path, pending: list[int]) -> None:
        bins = [[pending[j] for j in b] for b in assign_shards([plan.shards[i].size for i in pending], workers)]
        args = [(rec, str(target.out), b, plan.fingerprint, shard_size, threads, device, compute_dtype)
                for b in bins]
        bar = tqdm(total=len(bins), desc=f"workers ({backend})", disable=not progress)
        try:
            for report in _worker_reports(backend, args, threads):
                reports.append(report)
                bar.update()
        finally:
            bar.close()

    write_output(target, write_shards, force)
    return {"out": str(target.out), "workers": workers, "backend": backend, "shards": len(plan.shards),
            "resumed_shards": len(target.done), "reports": reports, "seconds": time.perf_counter() - start}
