"""Running label jobs: one job merged and scored in a worker (:func:`run_job`, checkpoints cached per process), and
the executors that run many (a local process pool, or Ray tasks)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from .. import __version__
from ..catalogue import Catalogue
from ..checkpoint import load_state_dict, quiet_transformers, weight_files
from ..engine import merge
from ..evaluate import evaluate_model, load_model, resolve_evaluator, synthetic_detail
from ..recipe import Recipe
from .jobs import Job


#: Above this many bytes per model, merges go through the streaming engine to a temporary folder.
IN_MEMORY_LIMIT = 2 << 30


class _Context:
    """A worker's cache: the catalogue, every checkpoint's tensors, one skeleton model per architecture."""

    def __init__(self, root: str, device: str) -> None:
        self.catalogue = Catalogue.load(root)
        self.device = device
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.skeletons: dict[str, tuple[Any, Any]] = {}
        self.evaluator = resolve_evaluator(self.catalogue.evaluator)

    def state(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.tensors:
            self.tensors[name] = load_state_dict(self.catalogue.path(name))
        return self.tensors[name]

    def layers(self, name: str) -> int | None:
        return json.loads((self.catalogue.path(name) / "config.json").read_text()).get("num_hidden_layers")

    def skeleton(self, name: str) -> tuple[Any, Any]:
        config = (self.catalogue.path(name) / "config.json").read_text()
        if config not in self.skeletons:
            with quiet_transformers():  # one "Loading weights" bar per worker is noise under our own bar
                self.skeletons[config] = load_model(self.catalogue.path(name), self.device)
        return self.skeletons[config]


_CONTEXTS: dict[tuple[str, str, int], _Context] = {}


def _context(root: str, device: str) -> _Context:
    # Keyed by catalogue.json's mtime too: a catalogue rebuilt in place must not be served from a stale cache.
    key = (root, device, (Path(root) / "catalogue.json").stat().st_mtime_ns)
    if key not in _CONTEXTS:
        _CONTEXTS.clear()
        _CONTEXTS[key] = _Context(root, device)
    return _CONTEXTS[key]


def _versions() -> str:
    return json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                       "simmerge_lib": __version__}, sort_keys=True)


def _model_bytes(ctx: _Context, name: str) -> int:
    return sum(p.stat().st_size for p in set(weight_files(ctx.catalogue.path(name)).values()))


def _scored(ctx: _Context, model: Any, tok: Any, job: Job) -> dict[str, dict[str, float]]:
    """{task: {"score", "even", "odd", "char"}}: the kit's evaluator gives per-example detail (the halves of the
    split-half test and per-character accuracy); a user's evaluator gives the score only (the rest NaN)."""
    if ctx.catalogue.evaluator is None:
        return {t: {"score": float(exact.mean()), "even": float(exact[0::2].mean()), "odd": float(exact[1::2].mean()),
                    "char": float(chars.mean())}
                for t, (exact, chars) in synthetic_detail(model, tok, job.tasks, job.n_eval).items()}
    frame = evaluate_model(model, tok, job.tasks, job.n_eval, ctx.evaluator)
    return {t: {"score": float(s), "even": np.nan, "odd": np.nan, "char": np.nan}
            for t, s in zip(frame.task, frame.score)}


def _skeleton_scores(ctx: _Context, job: Job, state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Scores of ``state`` loaded into the worker's skeleton of a's architecture."""
    model, tok = ctx.skeleton(job.a)
    model.load_state_dict(state, strict=True)
    return _scored(ctx, model, tok, job)


def _folder_scores(ctx: _Context, folder: str | os.PathLike[str], job: Job) -> dict[str, dict[str, float]]:
    """Scores of a checkpoint folder, loaded on its own (a large checkpoint: no cached copies)."""
    model, tok = load_model(folder, ctx.device)
    scores = _scored(ctx, model, tok, job)
    del model
    return scores


def _merged_scores(ctx: _Context, job: Job) -> dict[str, dict[str, float]]:
    """Scores of the job's merge (or, for a reference job, of the expert itself)."""
    large = _model_bytes(ctx, job.a) > IN_MEMORY_LIMIT
    if job.method == "expert":  # reference job: the expert itself
        return _folder_scores(ctx, ctx.catalogue.path(job.a), job) if large else \
            _skeleton_scores(ctx, job, ctx.state(job.a))
    if large:
        # Large checkpoints: stream the merge to disk one tensor at a time, then load the result once.
        recipe = Recipe.from_dict(ctx.catalogue.with_paths(job.recipe), root=ctx.catalogue.root, source=job.key)
        with tempfile.TemporaryDirectory(prefix="simmerge-label-") as tmp:
            return _folder_scores(ctx, merge(recipe, Path(tmp) / "merged", device=ctx.device, progress=False), job)
    # In memory: the recipe's model names index the cached state dicts (no disk I/O per job).
    merged = Recipe.from_dict(job.recipe, source=job.key).merge_states(ctx.state, ctx.layers(job.a))
    return _skeleton_scores(ctx, job, merged)


def run_job(root: str, job: Job, device: str = "cpu") -> dict[str, Any]:
    """Merge and score one job in this process (catalogue checkpoints cached per process); returns its raw result.

    One torch thread per job: parallelism comes from running jobs side by side, and results do not depend on the
    executor (thread count can change float reduction order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = _context(str(root), device)
        start = time.perf_counter()
        scores = _merged_scores(ctx, job)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {"key": job.key, "scores": {t: scores[t]["score"] for t in job.tasks},
            "detail": {t: scores[t] for t in job.tasks}, "seconds": seconds}


def _worker_init() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- executors -----------------------------------------------------------------------------------------------------

ResultIter = Iterator[dict[str, Any]]


class _Runner:
    """Runs jobs on one executor for the whole collection (a pool or a Ray session is started once, reused)."""

    def __init__(self, root: str, executor: str, workers: int, device: str, address: str | None = None,
                 num_cpus: float = 1, num_gpus: float = 0, start_method: str | None = None) -> None:
        if executor not in ("local", "ray"):
            raise ValueError(f"unknown executor {executor!r}; expected 'local' or 'ray'")
        self.root, self.executor, self.workers, self.device = root, executor, workers, device
        self.address, self.num_cpus, self.num_gpus = address, num_cpus, num_gpus
        self.start_method = start_method
        self.pool: ProcessPoolExecutor | None = None
        self.ray_started = False
        self.remote: Any = None

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.ray_started:
            import ray  # optional dependency (the ray executor only), imported when that executor ran

            ray.shutdown()

    def run(self, jobs: Sequence[Job]) -> ResultIter:
        if not jobs:
            return iter(())
        if self.executor == "ray":
            return self._ray(jobs)
        if self.workers <= 1:
            return (run_job(self.root, job, self.device) for job in jobs)
        return self._local(jobs)

    def _local(self, jobs: Sequence[Job]) -> ResultIter:
        if self.pool is None:
            # fork (Linux default) starts workers in milliseconds; each sets one torch thread before any work.
            # spawn is the portable choice (macOS, Windows) and the safe one where the parent runs many threads.
            method = self.start_method or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context(method),
                                            initializer=_worker_init)
        pool = self.pool
        queue = iter(jobs)
        pending: set[Future] = set()
        try:
            # A bounded window in flight: an interrupt leaves little submitted work behind.
            for job in queue:
                pending.add(pool.submit(run_job, self.root, job, self.device))
                if len(pending) >= 2 * self.workers:
                    break
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    nxt = next(queue, None)
                    if nxt is not None:
                        pending.add(pool.submit(run_job, self.root, nxt, self.device))
                    yield fut.result()
        finally:
            for fut in pending:
                fut.cancel()

    def _ray(self, jobs: Sequence[Job]) -> ResultIter:
        try:
            import ray  # optional dependency: only the ray executor needs it
        except ImportError:
            raise ValueError("executor 'ray' needs the ray package (pip install ray)") from None
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False)
            self.ray_started = True
        if self.remote is None:
            self.remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus)(_ray_job)
        pending = [self.remote.remote(self.root, job, self.device) for job in jobs]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    yield ray.get(ref)
        finally:
            for ref in pending:
                ray.cancel(ref)


def _ray_job(root: str, job: Job, device: str) -> dict[str, Any]:
    _worker_init()
    return run_job(root, job, device)
