"""The full-width rehearsal of chapter 07: a TIES merge of synthesized checkpoints, measured in a child process
(peak memory against the bound, throughput), killed half-way and resumed, compared with the in-memory operator
and with a merge spread over workers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..engine import merge_distributed, plan_merge
from ..recipe import Recipe
from .estimate import DENSE_111B, GB, MB, CostEstimate, peak_bound, plan_from_config
from .measure import (baseline_run, compare_with_in_memory, files_identical, finished_shards, io_floor,
                      largest_numel, merge_command, python_module_command, run_measured)
from .synthesize import synthesize_checkpoints, ties_recipe

@dataclass
class Rehearsal:
    """What :func:`rehearse` measured (bytes, seconds, booleans); ``asdict`` gives the JSON."""

    layers: list[int]
    tensors: int
    total_input_gb: float
    output_gb: float
    largest_tensor_mb_f32: float
    baseline_rss_mb: float
    peak_rss_mb: float
    predicted_peak_mb: float
    under_bound: bool
    merge_s: float  # the merge child's wall time less its start-up (imports), see startup_s
    startup_s: float
    gb_per_s: float
    predicted_s: float | None
    merge_cpu_s: float  # CPU seconds of the merge child less those of the start-up child
    predicted_cpu_s: float | None
    io_floor_gb_per_s: float
    shards: int
    killed_after_shards: int
    resumed_ok: bool
    equal_to_in_memory: bool
    max_abs_diff: float
    workers: int
    workers_s: float | None
    workers_equal: bool | None
    features_peak_rss_mb: float | None = None
    features_s: float | None = None
    notes: list[str] = field(default_factory=list)

def rehearse(root: str | os.PathLike[str], config: Any = DENSE_111B, layers: Sequence[int] = (0,),
             include: str | None = None, shard_size: str | int = "500MB", threads: int | None = None,
             workers: int = 2, backend: str = "process", calibrated_gb_per_s: float | None = None,
             calibrated_gb_per_cpu_s: float | None = None,
             features: bool = False, cleanup: bool = True, progress: bool = True, device: str = "cpu") -> Rehearsal:
    """Full-width rehearsal of a TIES merge of base + 2 experts (see the package docstring), in ``root``.

    1. synthesize the checkpoints; 2. merge in a child process: peak RSS vs the bound, and wall time less the
    start-up of a child that only imports (``merge_s``);
    3. merge again, SIGKILL the child once half the shards are finished, resume in a new child, check that the
    kept shards were not rewritten and that the output equals run 2 byte for byte and the in-memory operator
    tensor by tensor; 4. merge with ``workers`` workers and compare with run 2; 5. optionally stream the
    structural features of the pair (peak RSS of that child). Inputs and outputs are deleted when ``cleanup``.
    """
    root = Path(root)
    folders = synthesize_checkpoints(root / "inputs", config, layers=layers, include=include, progress=progress)
    recipe = ties_recipe(folders)
    recipe_path = root / "recipe.yml"
    recipe.to_yaml(recipe_path)
    largest, total_in, n_loaded = largest_numel(recipe)
    base = baseline_run()
    notes: list[str] = []
    options = {"threads": threads, "shard_size": shard_size, "device": device}
    try:
        out_a = root / "merged"  # 2. uninterrupted, measured
        res = run_measured(merge_command(recipe_path, out_a, **options))
        if res.returncode != 0:
            raise RuntimeError(f"merge failed: {res.output}")
        n_shards = len(plan_merge(recipe, shard_size).shards)
        kept, resumed_ok = _kill_and_resume(recipe_path, root / "resumed", out_a, n_shards, options, notes)
        cmp = compare_with_in_memory(recipe, out_a, progress=progress)
        workers_s, workers_equal = _spread(recipe, root / "distributed", out_a, workers, backend, shard_size,
                                           progress, device)
        out_bytes = sum(p.stat().st_size for p in out_a.glob("*.safetensors"))
        floor = io_floor(folders.values(), out_bytes, root / "floor.bin")
        feat_rss, feat_s = _features_child(folders, notes) if features else (None, None)
        merge_s = max(res.wall_s - base.wall_s, 1e-3)
        return Rehearsal(
            layers=list(layers), tensors=cmp["tensors"], total_input_gb=total_in / GB, output_gb=out_bytes / GB,
            largest_tensor_mb_f32=largest * 4 / MB, baseline_rss_mb=base.peak_rss_bytes / MB,
            peak_rss_mb=res.peak_rss_bytes / MB, predicted_peak_mb=peak_bound(n_loaded, largest) / MB,
            under_bound=res.peak_rss_bytes <= peak_bound(n_loaded, largest), merge_s=merge_s,
            startup_s=base.wall_s, gb_per_s=total_in / GB / merge_s,
            predicted_s=(total_in / GB / calibrated_gb_per_s) if calibrated_gb_per_s else None,
            merge_cpu_s=max(res.cpu_s - base.cpu_s, 0.0),
            predicted_cpu_s=(total_in / GB / calibrated_gb_per_cpu_s) if calibrated_gb_per_cpu_s else None,
            io_floor_gb_per_s=floor["io_floor_gb_per_s"], shards=n_shards, killed_after_shards=len(kept),
            resumed_ok=resumed_ok, equal_to_in_memory=cmp["equal"], max_abs_diff=cmp["max_abs_diff"],
            workers=workers, workers_s=workers_s, workers_equal=workers_equal,
            features_peak_rss_mb=feat_rss, features_s=feat_s, notes=notes)
    finally:
        for sub in ("merged", "resumed", "resumed.partial", "distributed", "distributed.partial"):
            shutil.rmtree(root / sub, ignore_errors=True)
        if cleanup:
            shutil.rmtree(root / "inputs", ignore_errors=True)


def _kill_and_resume(recipe_path: Path, out: Path, reference: Path, n_shards: int, options: dict[str, Any],
                     notes: list[str]) -> tuple[dict[str, int], bool]:
    """Step 3: the merge child killed once half the shards are finished, then resumed. Returns the shards kept
    (name -> mtime) and whether the resumed output kept them untouched and equals ``reference`` byte for byte."""
    half = max(1, n_shards // 2)
    killed = run_measured(merge_command(recipe_path, out, **options),
                          kill_when=lambda: len(finished_shards(out)) >= half)
    partial = out.with_name(out.name + ".partial")
    kept = {p: (partial / p).stat().st_mtime_ns for p in finished_shards(out)}
    if not killed.killed:
        notes.append("the merge finished before it could be killed (shards too few or too fast)")
    res = run_measured(merge_command(recipe_path, out, resume=True, **options))
    if res.returncode != 0:
        raise RuntimeError(f"resumed merge failed: {res.output}")
    untouched = all((out / p).stat().st_mtime_ns == m for p, m in kept.items())
    resumed_ok = killed.killed and bool(kept) and untouched and files_identical(reference, out)
    shutil.rmtree(out, ignore_errors=True)
    return kept, resumed_ok


def _spread(recipe: Recipe, out: Path, reference: Path, workers: int, backend: str, shard_size: str | int,
            progress: bool, device: str) -> tuple[float | None, bool | None]:
    """Step 4: the merge over ``workers`` workers (seconds, and whether it equals ``reference`` byte for byte);
    ``(None, None)`` for one worker."""
    if workers <= 1:
        return None, None
    rep = merge_distributed(recipe, out, workers=workers, backend=backend, shard_size=shard_size, threads=1,
                            force=True, progress=progress, device=device)
    equal = files_identical(reference, out)
    shutil.rmtree(out, ignore_errors=True)
    return rep["seconds"], equal


def _features_child(folders: Mapping[str, Path], notes: list[str]) -> tuple[float, float]:
    """Step 5: the structural features of (e0, e1) over base, streamed in a measured child (peak MB, seconds)."""
    fr = run_measured(python_module_command("simmerge_lib.scale", "features", str(folders["e0"]),
                                            str(folders["e1"]), str(folders["base"])))
    if fr.returncode != 0:
        notes.append(f"structural features failed: {fr.output[-300:]}")
    return fr.peak_rss_bytes / MB, fr.wall_s


def rehearsal_plan(rehearsal: Rehearsal, config: Any = DENSE_111B, gb_per_s: float | None = None,
                   workers: int = 1) -> CostEstimate:
    """The full-model plan with throughput taken from a rehearsal (``gb_per_s`` overrides it)."""
    rate = gb_per_s or rehearsal.gb_per_s
    return plan_from_config(config, n_models=3, method="ties", workers=workers, gb_per_s=rate,
                            throughput_source="measured on the full-width rehearsal")


def rehearsal_dict(r: Rehearsal) -> dict[str, Any]:
    return asdict(r)
