"""Chapter 03 — label collection: merge every candidate pair with every operator on a small grid, and score it.

This is the expensive loop SimMerge exists to replace, measured once so that a predictor can learn from it.

**Jobs.** One job = one 2-way merge recipe: an unordered expert pair (a, b) (``a`` before ``b`` in catalogue order,
whichever order the pair was given in), an operator and one grid *setting* (:data:`DEFAULT_GRID`), a seed and the
evaluation settings.

**Order-free candidates.** A *candidate* is an operator at one setting. Every setting of the label grid is
symmetric in the two experts (linear weight 0.5, SLERP t = 0.5, and operators that give both task vectors the same
weight), and pairs are canonical, so no result and no policy built on the table (best fixed, a predictor) can win by
favouring whichever model the catalogue lists first. :func:`check_order_free` enforces it for any grid. A job's key is the
SHA-256 (16 hex digits) of the canonical recipe: method, ordered model names with their parameters, base, global
parameters, seed, ``n_eval``, evaluator, the evaluated tasks, the catalogue's recipe hash and :data:`LABELS_FORMAT`,
so any change of a field makes a new job and a rerun does only the jobs whose key is not in the table yet.

How a setting becomes a mergekit recipe (the ``recipe`` column; model paths as in ``catalogue.json``, relative to
the catalogue folder):

- ``linear``: models a (weight w) and b (weight 1 - w): theta = w theta_a + (1 - w) theta_b (the grid uses w = 0.5).
- ``slerp``: ``base_model: a``, t interpolates from a (t = 0) to b (t = 1) (the grid uses t = 0.5).
- ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``: ``base_model`` = base(a), both experts with weight
  1 (``weight`` in a setting is a's share, b gets 1 - weight) and the setting's density / lambda; DARE draws its
  masks from the job seed.
- *Cross-base pairs* (experts of independently initialised bases) have no common base; the kit uses **a's base**,
  exactly what ``mergekit`` does with that recipe (tau_b = theta_b - theta_base(a)). Every operator thus labels every
  pair, and each stored recipe reproduces its row with ``simmerge merge``.

**Evaluation.** The merged weights are loaded into a skeleton model (one per architecture, reused) and scored on the
catalogue's tasks by the catalogue's evaluator (all tasks decode in one batched pass), ``n_eval`` examples each.
Every expert that appears in a job is also scored once with the same evaluator and n (a *reference* table, stored
beside the labels as ``<out>.experts.parquet``) so that scores can be normalized:

    norm_score(t) = score(t) / ref(t)

where ref(t) is, for a parent task (t in tasks(a) ∪ tasks(b)), the best parent's own score on t (for cross-base
pairs each parent's own score on its task), and for another task the first expert of t on base(a) (NaN if there is
none, or if ref(t) = 0).

**Merge quality** of a job = mean norm_score over its parent tasks (NaN ones skipped; :func:`merge_quality`).
*Keep the better parent* (:func:`keep_parent`) is the no-merge reference: the better of the two experts alone, scored
the same way; a merge is worth doing only when it beats it. *Wins* (:func:`win_shares`) compare operator *families*
(linear/SLERP, task arithmetic, TIES/DARE; :data:`FAMILIES`) at their best candidate per pair: a family wins a pair
only if its best quality beats every other family's best by more than ``tol``; otherwise the pair is a *tie*.
*Oracle* = the best candidate per pair in hindsight; *best fixed* = the one candidate with the best mean quality
over the pairs; *regret* = oracle - chosen; *gap* = oracle - best fixed (:func:`oracle_vs_fixed`).

**Is the gap real?** Every candidate of a pair is scored on the same examples, so the oracle's lead over best fixed
mixes real differences with evaluation noise. Two tests: :func:`split_half_gain` chooses each pair's candidate (and
the best fixed one) on the even-indexed evaluation examples and scores the choice on the odd ones, and vice versa
(an honest, held-out estimate of what choosing per pair is worth); :func:`noise_gap` simulates the gap that
binomial noise alone would produce if every candidate were equally good (a pessimistic null: it ignores that the
candidates share their examples).

The labels table (Parquet, one row per job × evaluated task; the column names are stable, other chapters read them):

=============  =====================================================================================================
job_key        str, hash of the canonical recipe (see above)
a, b           str, expert names (a before b in catalogue order)
base_a, base_b str, their bases
same_base      bool
method         str, operator name (:data:`simmerge_lib.operators.OPERATORS`)
setting        str, short stable label of the grid point, e.g. ``"t=0.3"`` or ``"density=0.2,weight=0.5"``
parameters     str, JSON of the grid point
task           str, evaluated task
parent_task    bool, task in tasks(a) ∪ tasks(b)
score          float, the evaluator's score (exact match for the kit's tasks)
norm_score     float, score / ref(task) (see above)
norm_even      float, the score on the even-indexed examples / ref(task) (kit tasks; NaN for other evaluators)
norm_odd       float, the same on the odd-indexed examples
char_score     float, per-character accuracy of the answers (kit tasks; NaN for other evaluators)
seed           int, job seed (DARE masks)
n_eval         int, examples per task
seconds        float, wall seconds of the job (merge + evaluation), repeated on each of its rows
versions       str, JSON {torch, transformers, simmerge_lib}
recipe         str, the mergekit YAML recipe
=============  =====================================================================================================

Execution: ``executor="local"`` runs jobs in a process pool (``workers`` processes, one torch thread each; each
worker loads the catalogue's checkpoints once); ``executor="ray"`` submits the same job function as Ray tasks
(``num_cpus`` / ``num_gpus`` per job) to ``ray.init(address=...)`` or a local Ray runtime. The catalogue folder must be
readable at the same path from every Ray node. Finished rows are appended to the Parquet file atomically (rewrite
through a temporary file + rename) every ``flush_every`` jobs or ``flush_seconds``, and on any interruption.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from .catalogue import Catalogue
from .operators import default_grid, get_operator, setting_label, setting_parameters
from .paths import build_path

#: Column order of the labels table (see the module docstring).
LABEL_COLUMNS = ["job_key", "a", "b", "base_a", "base_b", "same_base", "method", "setting", "parameters", "task",
                 "parent_task", "score", "norm_score", "norm_even", "norm_odd", "char_score", "seed", "n_eval",
                 "seconds", "versions", "recipe"]
#: Part of every job key: bump it when the operators' or the scoring's results change, so a table collected with
#: the old code is collected again instead of mixing two semantics (2: one-pass scoring, DARE / TIES of the registry).
LABELS_FORMAT = 2
#: Columns added after the first tables were written: read as NaN from an older table.
_LATER_COLUMNS = ("norm_even", "norm_odd", "char_score")
#: Columns of the reference (expert) table stored beside the labels.
REFERENCE_COLUMNS = ["ref_key", "model", "base", "task", "own_task", "score", "n_eval", "seconds"]

#: The operators of the label grid; their settings come from the operator registry (each entry's default grid),
#: so registering an operator with a grid and naming it here puts it in every chapter's candidates.
LABEL_OPERATORS = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties")
#: The grid: per operator, the order-free settings tried on every pair (global or per-model parameters). Task
#: arithmetic at lambda 0.5 would equal linear weight 0.5 exactly on same-base pairs, so its grid starts at 0.8.
DEFAULT_GRID: dict[str, list[dict[str, float]]] = default_grid(LABEL_OPERATORS)
#: One setting per operator: the notebook's smoke profile and quick tests.
SMOKE_GRID: dict[str, list[dict[str, float]]] = {
    "linear": [{"weight": 0.5}], "slerp": [{"t": 0.5}], "task_arithmetic": [{"lambda": 1.0}],
    "ties": [{"density": 0.5}], "dare_linear": [{"density": 0.5}], "dare_ties": [{"density": 0.5}],
}
#: Operator families, the level at which win shares are reported (an operator not listed is its own family).
FAMILIES: dict[str, str] = {"linear": "linear/SLERP", "slerp": "linear/SLERP", "task_arithmetic": "task arithmetic",
                            "ties": "TIES/DARE", "dare_ties": "TIES/DARE", "dare_linear": "TIES/DARE"}
#: Per-profile collection settings (keyword arguments of :func:`make_jobs`): the notebook, benchmark and CLI share them.
#: Only the parents' tasks are scored: merge quality reads nothing else, and it halves the grid's cost.
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"grid": SMOKE_GRID, "n_eval": 32, "cross_base_sample": 2, "tasks": "parents"},
    "default": {"grid": DEFAULT_GRID, "n_eval": 400, "cross_base_sample": 16, "tasks": "parents"},
    "full": {"grid": DEFAULT_GRID, "n_eval": 512, "cross_base_sample": 64, "tasks": "parents"},
}


def family(method: str) -> str:
    """The family an operator's wins are counted under (:data:`FAMILIES`)."""
    return FAMILIES.get(method, method)


def check_order_free(grid: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Raise ValueError naming the first setting that treats the two experts differently (a ``weight`` other than
    0.5 or a SLERP ``t`` other than 0.5): such a candidate would favour whichever model is listed first."""
    for method, settings in grid.items():
        for setting in settings:
            for key in ("weight", "t"):
                if key in setting and abs(float(setting[key]) - 0.5) > 1e-12:
                    raise ValueError(f"grid setting {method} {dict(setting)} is not order-free: {key}={setting[key]} "
                                     f"favours one expert of the pair; use {key}=0.5 (or a symmetric operator)")


def profile_settings(profile: str) -> dict[str, Any]:
    """The :func:`make_jobs` keyword arguments of a profile (``smoke``, ``default``, ``full``)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    return dict(PROFILES[profile])


#: Parameters set on every job of an operator (beyond its defaults), so the grid reads as the papers' settings.
FIXED_PARAMETERS: dict[str, dict[str, Any]] = {"ties": {"lambda": 1.0, "normalize": True}}
#: Above this many bytes per model, merges go through the streaming engine to a temporary folder.
IN_MEMORY_LIMIT = 2 << 30


def labels_path(profile: str) -> Path:
    """Where a profile's labels live: ``build/labels/<profile>.parquet``."""
    return build_path("labels", f"{profile}.parquet")


def reference_path(out: str | os.PathLike[str]) -> Path:
    """The expert reference table beside a labels file: ``<out>.experts.parquet``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".parquet") + ".experts.parquet")


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def catalogue_hash(catalogue: Catalogue) -> str:
    """The catalogue's recipe hash, or (user catalogues) a hash of its model list."""
    if catalogue.recipe_hash:
        return catalogue.recipe_hash
    return _digest([[m.name, m.path, m.role, m.base, m.tasks] for m in catalogue.models])


# --- jobs ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One merge-and-evaluate job; ``recipe`` is mergekit's schema with model *names* (paths filled in later)."""

    key: str
    a: str
    b: str
    base_a: str
    base_b: str
    method: str
    setting: str
    parameters: dict[str, Any]
    recipe: dict[str, Any]
    tasks: tuple[str, ...]
    parent_tasks: tuple[str, ...]
    seed: int
    n_eval: int
    evaluator: str | None


def job_recipe(method: str, a: str, b: str, base_a: str, setting: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The mergekit recipe (model names) for merging experts a and b with ``method`` at one grid ``setting``."""
    op = get_operator(method)
    unknown = set(setting) - set(op.model_params) - set(op.global_params)
    if unknown:
        raise ValueError(f"grid setting {dict(setting)} of {method}: unknown parameter(s) {sorted(unknown)} "
                         f"(it takes {sorted(set(op.model_params) | set(op.global_params))})")
    per_model: dict[str, Any] = {k: v for k, v in setting.items() if k in op.model_params and k != "weight"}
    params_a, params_b = dict(per_model), dict(per_model)
    if "weight" in op.model_params:
        w = float(setting.get("weight", 0.5 if method == "linear" else 1.0))
        params_a["weight"], params_b["weight"] = w, (1.0 - w if "weight" in setting or method == "linear" else w)
    glob = {**FIXED_PARAMETERS.get(method, {}), **{k: v for k, v in setting.items() if k in op.global_params}}
    if "seed" in op.global_params:
        glob["seed"] = int(seed)
    recipe: dict[str, Any] = {"merge_method": method}
    if method == "slerp":
        recipe["base_model"] = a
        recipe["models"] = [{"model": a}, {"model": b}]
    else:
        if op.needs_base:
            recipe["base_model"] = base_a
        recipe["models"] = [{"model": a, "parameters": params_a}, {"model": b, "parameters": params_b}]
    if glob:
        recipe["parameters"] = glob
    recipe["dtype"] = "float32"
    return recipe


def make_job(catalogue: Catalogue, a: str, b: str, method: str, setting: Mapping[str, Any], seed: int = 0,
             n_eval: int = 50, tasks: Sequence[str] | None = None) -> Job:
    """A :class:`Job` for experts ``a``, ``b``; ``tasks`` evaluated (default: all the catalogue's tasks)."""
    ea, eb = catalogue.entry(a), catalogue.entry(b)
    if ea.role != "expert" or eb.role != "expert":
        raise ValueError(f"labels: {a!r} and {b!r} must both be experts of catalogue {catalogue.name!r}")
    recipe = job_recipe(method, a, b, ea.base or a, setting, seed)
    parents = tuple(t for t in catalogue.tasks if t in set(ea.tasks) | set(eb.tasks))
    tasks = tuple(tasks) if tasks is not None else tuple(catalogue.tasks)
    missing = set(parents) - set(tasks)
    if missing:
        raise ValueError(f"labels: evaluated tasks {list(tasks)} miss the parents' task(s) {sorted(missing)}")
    key = _digest({"recipe": recipe, "seed": int(seed), "n_eval": int(n_eval), "evaluator": catalogue.evaluator,
                   "tasks": list(tasks), "catalogue": catalogue_hash(catalogue), "format": LABELS_FORMAT})
    return Job(key, a, b, ea.base or "", eb.base or "", method, setting_label(setting), dict(setting), recipe,
               tasks, parents, int(seed), int(n_eval), catalogue.evaluator)


def make_jobs(catalogue: Catalogue, grid: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
              cross_base_sample: int = 8, seed: int = 0, n_eval: int = 50, tasks: str | Sequence[str] = "all",
              pairs: Iterable[tuple[str, str]] | None = None) -> list[Job]:
    """Every same-base pair plus ``cross_base_sample`` cross-base pairs (seeded sample) × every grid setting.

    ``grid`` maps operator → list of order-free settings (default :data:`DEFAULT_GRID`; see
    :func:`check_order_free`); ``tasks`` = ``"all"`` (every catalogue task, the parents' flagged by
    ``parent_task``), ``"parents"`` or a list; ``pairs`` overrides the pair choice. Each pair is put in catalogue
    order, so (a, b) and (b, a) make the same jobs."""
    grid = DEFAULT_GRID if grid is None else grid
    for method in grid:
        get_operator(method)
    check_order_free(grid)
    if pairs is None:
        pairs = catalogue.pairs("same_base")
        cross = catalogue.pairs("cross_base")
        k = min(int(cross_base_sample), len(cross))
        pairs = pairs + sorted(random.Random(seed).sample(cross, k), key=cross.index)
    position = {m.name: i for i, m in enumerate(catalogue.models)}
    pairs = [tuple(sorted(pair, key=lambda name: position.get(name, -1))) for pair in pairs]
    jobs = []
    for a, b in dict.fromkeys(pairs):
        if tasks == "parents":
            parents = set(catalogue.entry(a).tasks) | set(catalogue.entry(b).tasks)
            chosen: list[str] | None = [t for t in catalogue.tasks if t in parents]
        else:
            chosen = None if tasks == "all" else list(tasks)
        for method, settings in grid.items():
            for setting in settings:
                jobs.append(make_job(catalogue, a, b, method, setting, seed, n_eval, chosen))
    return jobs


# --- running one job (inside a worker) -------------------------------------------------------------------------------


class _Context:
    """A worker's cache: the catalogue, every checkpoint's tensors, one skeleton model per architecture."""

    def __init__(self, root: str, device: str) -> None:
        self.catalogue = Catalogue.load(root)
        self.device = device
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.skeletons: dict[str, tuple[Any, Any]] = {}
        from .evaluate import resolve_evaluator

        self.evaluator = resolve_evaluator(self.catalogue.evaluator)

    def state(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.tensors:
            from .checkpoint import load_state_dict

            self.tensors[name] = load_state_dict(self.catalogue.path(name))
        return self.tensors[name]

    def layers(self, name: str) -> int | None:
        return json.loads((self.catalogue.path(name) / "config.json").read_text()).get("num_hidden_layers")

    def skeleton(self, name: str) -> tuple[Any, Any]:
        config = (self.catalogue.path(name) / "config.json").read_text()
        if config not in self.skeletons:
            from .checkpoint import quiet_transformers
            from .evaluate import load_model

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
    import transformers

    from . import __version__

    return json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                       "simmerge_lib": __version__}, sort_keys=True)


def _model_bytes(ctx: _Context, name: str) -> int:
    from .checkpoint import weight_files

    return sum(p.stat().st_size for p in set(weight_files(ctx.catalogue.path(name)).values()))


def _scored(ctx: _Context, model: Any, tok: Any, job: Job) -> dict[str, dict[str, float]]:
    """{task: {"score", "even", "odd", "char"}}: the kit's evaluator gives per-example detail (the halves of the
    split-half test and per-character accuracy); a user's evaluator gives the score only (the rest NaN)."""
    if ctx.catalogue.evaluator is None:
        from .evaluate import synthetic_detail

        return {t: {"score": float(exact.mean()), "even": float(exact[0::2].mean()), "odd": float(exact[1::2].mean()),
                    "char": float(chars.mean())}
                for t, (exact, chars) in synthetic_detail(model, tok, job.tasks, job.n_eval).items()}
    from .evaluate import evaluate_model

    frame = evaluate_model(model, tok, job.tasks, job.n_eval, ctx.evaluator)
    return {t: {"score": float(s), "even": np.nan, "odd": np.nan, "char": np.nan} for t, s in zip(frame.task, frame.score)}


def _merged_scores(ctx: _Context, job: Job) -> dict[str, dict[str, float]]:
    from .recipe import Recipe

    large = _model_bytes(ctx, job.a) > IN_MEMORY_LIMIT
    if job.method == "expert":  # reference job: the expert itself
        if large:
            from .evaluate import load_model

            model, tok = load_model(ctx.catalogue.path(job.a), ctx.device)
            return _scored(ctx, model, tok, job)
        model, tok = ctx.skeleton(job.a)
        model.load_state_dict(ctx.state(job.a), strict=True)
        return _scored(ctx, model, tok, job)
    if large:
        # Large checkpoints: stream the merge to disk one tensor at a time, then load the result once.
        from .engine import merge
        from .evaluate import load_model

        recipe = Recipe.from_dict(_with_paths(job.recipe, ctx.catalogue), root=ctx.catalogue.root, source=job.key)
        with tempfile.TemporaryDirectory(prefix="simmerge-label-") as tmp:
            out = merge(recipe, Path(tmp) / "merged", device=ctx.device, progress=False)
            model, tok = load_model(out, ctx.device)
            scores = _scored(ctx, model, tok, job)
            del model
        return scores
    from .operators import merge_state_dicts

    # In memory: the recipe's model names index the cached state dicts (no disk I/O per job).
    recipe = Recipe.from_dict(job.recipe, source=job.key)
    specs, base_spec = recipe.merge_inputs()
    op = get_operator(job.method)
    base = ctx.state(base_spec.model) if (base_spec is not None and op.needs_base) else None
    merged = merge_state_dicts(job.method, [ctx.state(s.model) for s in specs], base,
                               [dict(s.parameters) for s in specs], recipe.parameters, ctx.layers(job.a))
    model, tok = ctx.skeleton(job.a)
    model.load_state_dict(merged, strict=True)
    return _scored(ctx, model, tok, job)


def _with_paths_name(catalogue: Catalogue, name: str) -> str:
    return catalogue.entry(name).path


def _with_paths(recipe: Mapping[str, Any], catalogue: Catalogue) -> dict[str, Any]:
    """The recipe with model names replaced by their catalogue paths (relative to the catalogue folder)."""
    out = dict(recipe)
    if "base_model" in out:
        out["base_model"] = _with_paths_name(catalogue, out["base_model"])
    out["models"] = [{**m, "model": _with_paths_name(catalogue, m["model"])} for m in recipe["models"]]
    return out


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


# --- executors -------------------------------------------------------------------------------------------------------

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
            import ray

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
        import multiprocessing as mp

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
            import ray
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


# --- the table -------------------------------------------------------------------------------------------------------


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


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, mininterval=0.5)


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
    versions = _versions()

    with _Runner(root, executor, workers, device, address, num_cpus, num_gpus, start_method) as runner:
        # 1. every expert involved, scored once with the same evaluator and n: the normalizers.
        ref_file = reference_path(out)
        refs = _read_table(ref_file, REFERENCE_COLUMNS)
        all_refs = _reference_jobs(catalogue, jobs)
        ref_jobs = [j for j in all_refs if j.key not in set(refs.ref_key)]
        sink = _Sink(ref_file, refs, REFERENCE_COLUMNS, 10 ** 9, 10 ** 9)
        by_key = {j.key: j for j in ref_jobs}
        bar = _progress(len(ref_jobs), "experts", progress and bool(ref_jobs))
        try:
            for result in runner.run(ref_jobs):
                job = by_key[result["key"]]
                sink.add([{"ref_key": job.key, "model": job.a, "base": job.base_a, "task": t,
                           "own_task": t in job.parent_tasks, "score": s, "n_eval": job.n_eval,
                           "seconds": result["seconds"]} for t, s in result["scores"].items()])
                bar.update()
        finally:
            sink.flush()
            bar.close()
        current = sink.frame[sink.frame.ref_key.isin({j.key for j in all_refs})]
        ref = {(r.model, r.task, int(r.n_eval)): float(r.score) for r in current.itertuples(index=False)}

        # 2. the merges not yet in the table
        existing = _read_table(out, LABEL_COLUMNS)
        done = set(existing.job_key)
        todo = [j for j in dict((j.key, j) for j in jobs).values() if j.key not in done]
        by_key = {j.key: j for j in todo}
        sink = _Sink(out, existing, LABEL_COLUMNS, flush_every, flush_seconds)
        bar = _progress(len(todo), "labels", progress and bool(todo))  # no empty bar when all are cached
        try:
            for result in runner.run(todo):
                job = by_key[result["key"]]
                rows = _rows(catalogue, job, result, ref, versions)
                sink.add(rows)
                bar.update()
                if callback is not None:
                    callback(job, rows)
        finally:
            sink.flush()
            bar.close()
    table = sink.frame
    keys = list(dict.fromkeys(j.key for j in jobs))
    order = {k: i for i, k in enumerate(keys)}
    table = table[table.job_key.isin(order)].copy()
    table["_order"] = table.job_key.map(order)
    return (table.sort_values(["_order", "task"], kind="stable").drop(columns="_order").reset_index(drop=True)
            .astype({"same_base": bool, "parent_task": bool, "seed": int, "n_eval": int}))


def _reference_score(catalogue: Catalogue, job: Job, task: str, ref: Mapping[tuple[str, str, int], float]) -> float:
    parents = [p for p in (job.a, job.b) if task in catalogue.entry(p).tasks]
    if parents:
        values = [ref.get((p, task, job.n_eval), np.nan) for p in parents]
        return float(np.nanmax(values)) if not all(np.isnan(values)) else np.nan
    own = _task_expert(catalogue, job.base_a, task)
    return ref.get((own, task, job.n_eval), np.nan) if own else np.nan


def _rows(catalogue: Catalogue, job: Job, result: Mapping[str, Any], ref: Mapping[tuple[str, str, int], float],
          versions: str) -> list[dict[str, Any]]:
    recipe_text = yaml.safe_dump(_with_paths(job.recipe, catalogue), sort_keys=False)
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


# --- analysis --------------------------------------------------------------------------------------------------------

PAIR_COLUMNS = ["a", "b", "base_a", "base_b", "same_base"]


def merge_quality(labels: pd.DataFrame) -> pd.DataFrame:
    """One row per pair × method × setting (× seed): quality = mean norm_score over the parent tasks.

    Columns: job_key, a, b, base_a, base_b, same_base, method, setting, seed, tasks (parent tasks, comma-joined),
    quality, quality_even, quality_odd (the same on each half of the evaluation examples; NaN without them),
    mean_score (raw), seconds."""
    parents = labels[labels.parent_task.astype(bool)]
    for column in _LATER_COLUMNS:
        if column not in parents.columns:
            parents = parents.assign(**{column: np.nan})
    keys = ["job_key", *PAIR_COLUMNS, "method", "setting", "seed"]
    grouped = parents.groupby(keys, sort=False, dropna=False)
    frame = grouped.agg(tasks=("task", lambda s: ",".join(sorted(s))), quality=("norm_score", "mean"),
                        quality_even=("norm_even", "mean"), quality_odd=("norm_odd", "mean"),
                        mean_score=("score", "mean"), seconds=("seconds", "first")).reset_index()
    return frame


def _pair_key(quality: pd.DataFrame) -> pd.Series:
    return quality.a + "|" + quality.b


def best_per_method(quality: pd.DataFrame) -> pd.DataFrame:
    """Each pair's best quality per operator (max over its settings): rows pair × method, with the setting."""
    q = quality.dropna(subset=["quality"]).copy()
    idx = q.groupby(["a", "b", "method"], sort=False).quality.idxmax()
    return q.loc[idx].reset_index(drop=True)


def pair_winners(quality: pd.DataFrame, tol: float = 0.01, level: str = "method") -> pd.DataFrame:
    """Per pair: the winning operator (``level="family"``: operator family, :func:`family`), or ``"tie"`` when no
    operator's best beats every other's by more than tol.

    Columns: a, b, same_base, tasks, winner, best, runner_up, margin (best - runner-up)."""
    if level == "family":
        quality = quality.assign(method=quality.method.map(family))
    elif level != "method":
        raise ValueError(f"level must be 'method' or 'family', got {level!r}")
    best = best_per_method(quality)
    rows = []
    for (a, b), group in best.groupby(["a", "b"], sort=False):
        ordered = group.sort_values("quality", ascending=False, kind="stable")
        top = ordered.iloc[0]
        runner = float(ordered.iloc[1].quality) if len(ordered) > 1 else -np.inf
        margin = float(top.quality) - runner
        rows.append({"a": a, "b": b, "same_base": bool(top.same_base), "tasks": top.tasks,
                     "winner": top.method if margin > tol else "tie", "best": float(top.quality),
                     "runner_up": runner, "margin": margin})
    return pd.DataFrame(rows, columns=["a", "b", "same_base", "tasks", "winner", "best", "runner_up", "margin"])


def win_shares(quality: pd.DataFrame, tol: float = 0.01, same_base_only: bool = True,
               level: str = "method") -> pd.DataFrame:
    """Share of pairs each operator (``level="family"``: each family) wins, by a margin > ``tol`` over every other
    one's best candidate.

    One row per operator (all operators present, zero wins included) plus a ``tie`` row. Columns: method, wins,
    share (wins / all pairs; the shares and the tie share sum to 1), share_decided (wins / pairs not tied)."""
    q = quality[quality.same_base] if same_base_only else quality
    winners = pair_winners(q, tol, level)
    methods = list(dict.fromkeys(q.method if level == "method" else q.method.map(family)))
    counts = winners.winner.value_counts()
    n, decided = len(winners), int((winners.winner != "tie").sum())
    rows = [{"method": m, "wins": int(counts.get(m, 0))} for m in [*methods, "tie"]]
    frame = pd.DataFrame(rows, columns=["method", "wins"])
    frame["share"] = frame.wins / n if n else np.nan
    frame["share_decided"] = np.where(frame.method == "tie", np.nan, frame.wins / decided if decided else np.nan)
    return frame


def max_win_share(shares: pd.DataFrame) -> float:
    """The largest operator share of all pairs (ties excluded): above ~0.6 the choice is nearly trivial."""
    ops = shares[shares.method != "tie"]
    return float(ops.share.max()) if len(ops) else float("nan")


def best_fixed(quality: pd.DataFrame, level: str = "setting") -> tuple[str, str | None]:
    """The (method, setting) with the best mean quality over the pairs (``level="method"``: each method at its best
    setting per pair, setting None)."""
    if level == "method":
        means = best_per_method(quality).groupby("method").quality.mean().dropna()
        if means.empty:
            raise ValueError("best_fixed: no pair has a quality (all normalized scores are NaN)")
        return str(means.idxmax()), None
    means = quality.groupby(["method", "setting"]).quality.mean().dropna()
    if means.empty:
        raise ValueError("best_fixed: no pair has a quality (all normalized scores are NaN)")
    method, setting = means.idxmax()
    return str(method), str(setting)


def oracle_vs_fixed(quality: pd.DataFrame, fixed: tuple[str, str | None] | None = None) -> pd.DataFrame:
    """Per pair: oracle (best method × setting in hindsight) vs the best fixed choice (given, or :func:`best_fixed`
    on these pairs). Columns: a, b, same_base, tasks, oracle, oracle_method, oracle_setting, fixed, gap
    (= oracle - fixed, the regret of always using the fixed choice)."""
    q = quality.dropna(subset=["quality"])
    method, setting = fixed or best_fixed(q)
    rows = []
    for (a, b), group in q.groupby(["a", "b"], sort=False):
        top = group.loc[group.quality.idxmax()]
        chosen = group[(group.method == method) & ((group.setting == setting) if setting else True)]
        fixed_q = float(chosen.quality.max()) if len(chosen) else np.nan
        rows.append({"a": a, "b": b, "same_base": bool(top.same_base), "tasks": top.tasks,
                     "oracle": float(top.quality), "oracle_method": top.method, "oracle_setting": top.setting,
                     "fixed": fixed_q, "gap": float(top.quality) - fixed_q})
    return pd.DataFrame(rows)


def keep_parent(labels: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Per pair of ``labels``: the quality of keeping one expert alone (no merge), scored like a merge.

    For parent p of the pair, q_p = mean over the parent tasks t of score(p, t) / ref(t), with the same normalizer
    ref(t) as the labels (the best parent's own score on t) and the reference table's scores at the labels' n_eval.
    Columns: a, b, same_base, keep_a, keep_b, keep_parent (= max of the two: *keep the better parent*), kept."""
    scores = {(r.model, r.task, int(r.n_eval)): float(r.score) for r in reference.itertuples(index=False)}
    rows = []
    parents = labels[labels.parent_task.astype(bool)]
    for (a, b), pair in parents.groupby(["a", "b"], sort=False):
        n = int(pair.n_eval.iloc[0])
        # a task's normalizer is the row's score / norm_score (the same for every job of the pair)
        ref = (pair.score / pair.norm_score).groupby(pair.task).median()
        keep = {}
        for p in (a, b):
            values = [scores.get((p, t, n), np.nan) / ref[t] if ref[t] > 0 else np.nan for t in ref.index]
            keep[p] = float(np.nanmean(values)) if not np.all(np.isnan(values)) else np.nan
        best = max(keep, key=lambda p: -np.inf if np.isnan(keep[p]) else keep[p])
        rows.append({"a": a, "b": b, "same_base": bool(pair.same_base.iloc[0]), "keep_a": keep[a],
                     "keep_b": keep[b], "keep_parent": keep[best], "kept": best})
    return pd.DataFrame(rows, columns=["a", "b", "same_base", "keep_a", "keep_b", "keep_parent", "kept"])


def _candidate_table(quality: pd.DataFrame, column: str = "quality") -> pd.DataFrame:
    """Pairs × candidates (``method:setting``) of one quality column."""
    q = quality.assign(candidate=quality.method + ":" + quality.setting)
    return q.pivot_table(index=["a", "b"], columns="candidate", values=column, aggfunc="mean", sort=False)


def split_half_gain(quality: pd.DataFrame) -> float:
    """What choosing each pair's candidate is worth on held-out examples, against the best fixed candidate.

    Choose on one half of the evaluation examples (each pair's best candidate, and the best fixed candidate over the
    pairs), score both choices on the other half: gain = mean over pairs of q_other(chosen) - q_other(fixed). The
    mean of both directions (even → odd, odd → even). NaN when the table has no halves."""
    gains = []
    for pick, score in (("quality_even", "quality_odd"), ("quality_odd", "quality_even")):
        chooser, scorer = _candidate_table(quality, pick), _candidate_table(quality, score)
        chooser, scorer = chooser.dropna(how="any"), scorer.dropna(how="any")
        common = chooser.index.intersection(scorer.index)
        if not len(common) or chooser.shape[1] < 2:
            return float("nan")
        chooser, scorer = chooser.loc[common], scorer.loc[common, chooser.columns]
        fixed = chooser.mean().idxmax()
        chosen = chooser.to_numpy().argmax(axis=1)
        held_out = scorer.to_numpy()[np.arange(len(common)), chosen]
        gains.append(float((held_out - scorer[fixed].to_numpy()).mean()))
    return float(np.mean(gains))


def noise_gap(labels: pd.DataFrame, n_sim: int = 200, seed: int = 0) -> float:
    """The oracle - fixed gap that evaluation noise alone would produce: a null-model simulation.

    For each pair, every candidate is given the same true accuracy per parent task, p_t = mean over candidates of
    the measured score; scores are redrawn as Binomial(n_eval, p_t) / n_eval, normalized like the labels, and
    averaged over the tasks. The mean over pairs and draws of max_c q(c) - q(c_0) is the gap an oracle would show
    over a fixed choice even if no candidate were better than another. Pessimistic: in the real table the
    candidates of a pair share their examples, so their errors are correlated and the real noise gap is smaller
    (:func:`split_half_gain` is the honest test)."""
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


def summarize(labels: pd.DataFrame, tol: float = 0.01, reference: pd.DataFrame | None = None) -> dict[str, Any]:
    """The headline numbers of a labels table (same-base pairs unless named otherwise): jobs, rows, seconds,
    family win shares with ``max_win_share`` / ``min_family_win_share``, best fixed, the oracle - best fixed gap
    with its split-half and noise-only counterparts, best-merge quality on same- and cross-base pairs and, given
    the ``reference`` table, keeping the better parent and how often the best merge beats it."""
    quality = merge_quality(labels)
    shares = win_shares(quality, tol, level="family")
    ops = shares[shares.method != "tie"]
    same = quality[quality.same_base].dropna(subset=["quality"])
    cross = quality[~quality.same_base].dropna(subset=["quality"])
    fixed = best_fixed(same) if len(same) else (None, None)
    gaps = oracle_vs_fixed(same, fixed) if len(same) else pd.DataFrame({"gap": [], "oracle": []})
    per_job = labels.drop_duplicates("job_key").seconds
    out: dict[str, Any] = {
        "jobs": int(labels.job_key.nunique()), "rows": int(len(labels)),
        "seconds_total": round(float(per_job.sum()), 2),
        "seconds_per_job": round(float(per_job.mean()), 4) if len(per_job) else None,
        "pairs_same_base": int(same.groupby(["a", "b"]).ngroups),
        "pairs_cross_base": int(cross.groupby(["a", "b"]).ngroups),
        "win_share": {r.method: round(float(r.share), 4) for r in shares.itertuples()},
        "max_win_share": round(max_win_share(shares), 4),
        "min_family_win_share": round(float(ops.share.min()), 4) if len(ops) else None,
        "best_fixed": "/".join(str(x) for x in fixed),
        "mean_best_quality_same_base": round(float(gaps.oracle.mean()), 4) if len(gaps) else None,
        "mean_best_quality_cross_base": (round(float(cross.groupby(["a", "b"]).quality.max().mean()), 4)
                                         if len(cross) else None),
        "oracle_minus_best_fixed": round(float(gaps.gap.mean()), 4) if len(gaps) else None,
        "split_half_gain": round(split_half_gain(same), 4) if len(same) else None,
        "noise_gap": round(noise_gap(labels[labels.same_base.astype(bool)]), 4) if len(same) else None,
    }
    if reference is not None:
        for kind, frame in (("", same), ("_cross_base", cross)):
            if not len(frame):
                continue
            best = frame.groupby(["a", "b"]).quality.max()
            keep = keep_parent(labels.merge(best.reset_index()[["a", "b"]]), reference).set_index(["a", "b"])
            keep = keep.loc[best.index]
            if not kind:
                out["mean_keep_parent_quality"] = round(float(keep.keep_parent.mean()), 4)
            out[f"frac_merge_beats_parent{kind}"] = round(float((best > keep.keep_parent).mean()), 4)
    return out


# --- CLI -------------------------------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _cmd_labels(args: argparse.Namespace) -> int:
    catalogue = Catalogue.load(args.catalogue)
    settings = profile_settings(args.profile)
    for key, value in (("n_eval", args.n), ("cross_base_sample", args.cross_base_sample), ("tasks", args.tasks)):
        if value is not None:
            settings[key] = value
    jobs = make_jobs(catalogue, seed=args.seed, **settings)
    out = Path(args.out) if args.out else labels_path(catalogue.name)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` then flushes finished rows like Ctrl-C does
    try:
        labels = collect_labels(catalogue, jobs, out, executor=args.executor, workers=args.workers,
                                address=args.address, device=args.device, num_gpus=args.num_gpus)
    except KeyboardInterrupt:
        print(f"simmerge labels: interrupted; finished rows are in {out} (rerun the same command to resume)",
              file=sys.stderr)
        return 130
    reference = _read_table(reference_path(out), REFERENCE_COLUMNS)
    print(json.dumps(summarize(labels, args.tol, reference)))
    print(f"labels: {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("labels", help="merge expert pairs on an operator grid and score them (labels table)")
    p.add_argument("catalogue", help="catalogue folder (or its catalogue.json)")
    p.add_argument("--out", help="labels Parquet file (default build/labels/<catalogue name>.parquet); resumed if "
                                 "it exists")
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--workers", type=int, default=None, help="parallel jobs (default min(4, cores))")
    p.add_argument("--address", help="Ray cluster address (executor ray; default: a local Ray runtime)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per job (executor ray)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", default="default", choices=sorted(PROFILES),
                   help="grid and sizes (smoke: one setting per operator; default: the full grid)")
    p.add_argument("--n", type=int, help="eval examples per task (default: the profile's)")
    p.add_argument("--tasks", choices=["all", "parents"], help="tasks scored per merge (default: all)")
    p.add_argument("--cross-base-sample", type=int, help="cross-base pairs sampled (default: the profile's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=0.01, help="win margin for the summary's win shares")
    p.set_defaults(func=_cmd_labels)
