"""Measuring merges: child processes with their own peak resident set (``wait4``, ``VmHWM``), killed on a
condition; byte and tensor comparisons of outputs; the I/O floor and the merge throughput of this machine."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..checkpoint import weight_files
from ..engine import TensorInfo, merge, merge_job, plan_merge
from ..paths import build_path
from ..recipe import Recipe
from .estimate import GB, MB
from .synthesize import synthesize_checkpoints, ties_recipe

@dataclass
class RunResult:
    """A child process's exit status, wall seconds and peak resident set (from ``wait4``)."""

    returncode: int
    wall_s: float
    peak_rss_bytes: int
    killed: bool
    output: str = ""
    cpu_s: float = 0.0  # user + system seconds of the child (all its threads): robust on a shared machine


#: Runs ``python -m MODULE ARGS`` and writes the process's own peak RSS at exit. ``VmHWM`` (Linux) is the high
#: water mark of this process's address space only; ``ru_maxrss`` is not: it carries the parent's RSS across
#: fork + exec, so a child of a big notebook kernel would report the kernel's size.
_RSS_WRAPPER = """
import atexit, resource, runpy, sys
report = sys.argv[1]
def _write():
    try:
        kb = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))
    except (OSError, StopIteration):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    open(report, 'w').write(str(kb * 1024))
atexit.register(_write)
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


def python_module_command(module: str, *args: str) -> list[str]:
    """``python -m module args``, wrapped so that :func:`run_measured` can read the child's own peak RSS."""
    return [sys.executable, "-c", _RSS_WRAPPER, "{report}", module, *args]


def run_measured(cmd: Sequence[str], kill_when: Callable[[], bool] | None = None, poll_s: float = 0.05,
                 env: Mapping[str, str] | None = None) -> RunResult:
    """Run ``cmd`` (from :func:`python_module_command`); SIGKILL it as soon as ``kill_when()`` is true.
    Reports wall seconds, exit status and the child's own peak RSS (0 when it was killed)."""
    with tempfile.TemporaryDirectory(prefix="simmerge-rss-") as tmp:
        report = Path(tmp) / "peak_rss"
        log = open(Path(tmp) / "log", "w+")
        start = time.perf_counter()
        proc = subprocess.Popen([c.replace("{report}", str(report)) for c in cmd], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        killed = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if kill_when is not None and not killed and kill_when():
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(poll_s)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
        log.close()
        peak = int(report.read_text()) if report.is_file() else 0
    return RunResult(proc.returncode, wall, peak, killed, text[-2000:], usage.ru_utime + usage.ru_stime)


def baseline_run() -> RunResult:
    """``python -m simmerge_lib.engine --help``: the interpreter with everything a merge imports (its peak RSS),
    and the seconds a merge child spends starting up (its wall time)."""
    res = run_measured(python_module_command("simmerge_lib.engine", "--help"))
    if res.returncode != 0 or not res.peak_rss_bytes:
        raise RuntimeError(f"baseline child failed: {res.output}")
    return res


def baseline_rss() -> int:
    """Peak RSS of :func:`baseline_run` (bytes)."""
    return baseline_run().peak_rss_bytes


def merge_command(recipe_path: Path, out: Path, resume: bool = False, threads: int | None = None,
                  shard_size: str | int = "2GB", device: str = "cpu") -> list[str]:
    """``python -m simmerge_lib.engine RECIPE OUT`` (= ``simmerge merge``), wrapped for :func:`run_measured`."""
    args = [str(recipe_path), str(out), "--quiet", "--force", "--shard-size", str(shard_size), "--device", device]
    if resume:
        args.append("--resume")
    if threads:
        args += ["--threads", str(threads)]
    return python_module_command("simmerge_lib.engine", *args)


def finished_shards(out: str | os.PathLike[str]) -> list[str]:
    """Shards renamed to their final name in ``OUT.partial`` (a merge in progress)."""
    partial = Path(out).with_name(Path(out).name + ".partial")
    if not partial.is_dir():
        return []
    return sorted(p.name for p in partial.glob("*.safetensors"))


def largest_numel(recipe: Recipe) -> tuple[int, int, int]:
    """(largest tensor's elements, total input bytes, number of tensors loaded per output tensor)."""
    plan = plan_merge(recipe, "1TB")
    jobs = plan.jobs
    biggest = max(math.prod(j.shape) for j in jobs)
    total_in = sum(info.nbytes for m in plan.inputs.values() for info in m.tensors.values())
    n_loaded = len(jobs[0].inputs) + (jobs[0].base is not None)
    return biggest, total_in, n_loaded


class _SafetensorsFolder:
    """Tensors of a checkpoint folder read with ``safetensors.safe_open``: the reference reader for
    :func:`compare_with_in_memory`, independent of the engine's ``pread`` reader (which the structural features
    share), so that a bug in that reader cannot hide in both sides of the comparison."""

    def __init__(self, folder: Path):
        self.files = weight_files(folder)
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}

    def names(self) -> list[str]:
        return list(self.files)

    def get_stored(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype."""
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._handles[path].get_tensor(name)

    def get(self, name: str) -> torch.Tensor:
        """The tensor as float32, as the engine merges it."""
        return self.get_stored(name).to(torch.float32)

    def close(self) -> None:
        self._stack.close()


def compare_with_in_memory(recipe: Recipe, out: str | os.PathLike[str], progress: bool = False,
                           compute_dtype: str | None = None) -> dict[str, Any]:
    """Compare a merged folder with the operator applied to whole tensors loaded with ``safetensors`` (not the
    engine's reader), one tensor at a time so that full-width layers fit in memory."""
    plan = plan_merge(recipe, "1TB", compute_dtype)
    readers: dict[Path, _SafetensorsFolder] = {}
    try:
        for folder in plan.inputs:
            readers[folder] = _SafetensorsFolder(folder)
        by_path = {info.path: folder for folder, m in plan.inputs.items() for info in m.tensors.values()}
        merged = _SafetensorsFolder(Path(out))
        readers[Path(out)] = merged

        def load(info: TensorInfo, name: str) -> torch.Tensor:
            return readers[by_path[info.path]].get_stored(name).clone()

        unequal: list[str] = []
        max_abs = 0.0
        jobs = plan.jobs
        for job in tqdm(jobs, desc="compare", disable=not progress):
            with torch.no_grad():
                expected = merge_job(plan, job, load)
                got = merged.get_stored(job.name)
                if not torch.equal(got, expected):
                    unequal.append(job.name)
                    max_abs = max(max_abs, float((got.float() - expected.float()).abs().max()))
                del got, expected
    finally:
        for r in readers.values():
            r.close()
    return {"tensors": len(jobs), "unequal": unequal, "max_abs_diff": max_abs, "equal": not unequal}


def files_identical(a: str | os.PathLike[str], b: str | os.PathLike[str], pattern: str = "*.safetensors") -> bool:
    """Same safetensors file names and bytes in two folders (chunked compare, constant memory)."""
    fa, fb = sorted(p.name for p in Path(a).glob(pattern)), sorted(p.name for p in Path(b).glob(pattern))
    if fa != fb or not fa:
        return False
    for name in fa:
        pa, pb = Path(a) / name, Path(b) / name
        if pa.stat().st_size != pb.stat().st_size:
            return False
        with open(pa, "rb") as ha, open(pb, "rb") as hb:
            while True:
                x, y = ha.read(1 << 24), hb.read(1 << 24)
                if x != y:
                    return False
                if not x:
                    break
    return True


def io_floor(folders: Iterable[Path], out_bytes: int, scratch: Path) -> dict[str, float]:
    """Read every input shard once (``pread`` into a 64 MB buffer) and write ``out_bytes``: the speed no
    streaming merge can beat on this disk (and page cache)."""
    files = [p for f in folders for p in sorted(Path(f).glob("*.safetensors"))]
    buf = bytearray(64 * MB)
    view = memoryview(buf)
    start = time.perf_counter()
    read = 0
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            while True:
                got = os.readv(fd, [view])
                if got <= 0:
                    break
                read += got
        finally:
            os.close(fd)
    scratch.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = out_bytes
        while left > 0:
            left -= os.write(fd, view[: min(left, len(view))])
        os.fsync(fd)
    finally:
        os.close(fd)
        scratch.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    return {"io_floor_s": seconds, "io_floor_gb_per_s": read / GB / seconds if seconds else float("nan")}


def measure_throughput(method: str = "ties", hidden: int = 12288, rows: int = 2048, tensors: int = 4,
                       n_experts: int = 2, threads: int | None = None, workdir: str | os.PathLike[str] | None = None,
                       keep: bool = False) -> dict[str, Any]:
    """Merge throughput of this machine (input GB read per second, one process), on full-width tensors.

    Merges ``tensors`` bf16 tensors of shape (rows, hidden) per checkpoint (base + ``n_experts``) with the
    streaming engine, in this process, after a warm-up read; the input sits in the page cache, so this is the
    compute-bound rate (a cold disk adds its own floor, see :func:`io_floor`).
    """
    if method != "ties":
        raise ValueError("measure_throughput: only 'ties' is calibrated (the costliest common operator)")
    root = Path(workdir) if workdir is not None else build_path("scale", "calibrate")
    cfg = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": rows, "num_hidden_layers": tensors,
           "num_attention_heads": max(1, hidden // 128), "num_key_value_heads": max(1, hidden // 1536),
           "vocab_size": 32, "tie_word_embeddings": False}
    folders = synthesize_checkpoints(root / "inputs", cfg, layers=range(tensors), include=r"mlp\.up_proj",
                                     n_experts=n_experts, progress=False)
    recipe = ties_recipe(folders)
    in_bytes = sum(p.stat().st_size for f in folders.values() for p in f.glob("*.safetensors"))
    floor = io_floor(folders.values(), in_bytes // (n_experts + 1), root / "floor.bin")
    cpu0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    merge(recipe, root / "out", force=True, threads=threads, progress=False)
    seconds, cpu1 = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    result = {"gb_per_s": in_bytes / GB / seconds, "input_gb": in_bytes / GB, "seconds": seconds,
              "cpu_s": cpu, "gb_per_cpu_s": in_bytes / GB / cpu if cpu > 0 else float("nan"),
              "shape": [rows, hidden], "tensors": tensors, **floor}
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return result
