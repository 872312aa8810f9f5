"""Label jobs: the grid of order-free candidates, one merge recipe per pair × candidate (:class:`Job`), and the
job key that makes a collection resumable (see :mod:`simmerge_lib.labels`)."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..catalogue import Catalogue
from ..operators import default_grid, get_operator, setting_label
from ..paths import build_path
from .. import profiles


#: Column order of the labels table (see :mod:`simmerge_lib.labels`).
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
#: One setting per operator: the smoke profile's grid and quick tests.
SMOKE_GRID: dict[str, list[dict[str, float]]] = {
    "linear": [{"weight": 0.5}], "slerp": [{"t": 0.5}], "task_arithmetic": [{"lambda": 1.0}],
    "ties": [{"density": 0.5}], "dare_linear": [{"density": 0.5}], "dare_ties": [{"density": 0.5}],
}
#: Operator families, the level at which win shares are reported (an operator not listed is its own family).
FAMILIES: dict[str, str] = {"linear": "linear/SLERP", "slerp": "linear/SLERP", "task_arithmetic": "task arithmetic",
                            "ties": "TIES/DARE", "dare_ties": "TIES/DARE", "dare_linear": "TIES/DARE"}
#: The label grids a profile names (``grid`` of section ``labels`` in :mod:`simmerge_lib.profiles`).
GRIDS: dict[str, dict[str, list[dict[str, float]]]] = {"smoke": SMOKE_GRID, "registry": DEFAULT_GRID}
#: Parameters set on every job of an operator (beyond its defaults), so the grid reads as the papers' settings.
FIXED_PARAMETERS: dict[str, dict[str, Any]] = {"ties": {"lambda": 1.0, "normalize": True}}


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
    """The :func:`make_jobs` keyword arguments of a profile (``smoke``, ``default``, ``full``): section ``labels`` of
    :mod:`simmerge_lib.profiles` with its grid name resolved (:data:`GRIDS`). The notebook, benchmarks and CLI
    share them; only the parents' tasks are scored (merge quality reads nothing else)."""
    out = profiles.settings("labels", profile)
    out["grid"] = GRIDS[out["grid"]]
    return out


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
