"""Merging at 111B scale (chapter 07): plan a merge from a config alone, rehearse it at full width, resume it,
spread it over workers.

- **Plan** (:func:`plan_from_config`): the model is built on the ``meta`` device (shapes, no weights), which gives
  the tensor inventory with the real tensor names. From it, for ``n`` input checkpoints of dtype ``d_in`` merged
  into dtype ``d_out``::

      bytes_read    = n * sum_t numel_t * |d_in|          bytes_written = sum_t numel_t * |d_out|
      peak_memory   = (n + 2) * max_t numel_t * 4 + overhead          (float32 work copies, see engine)
      wall_time     = bytes_read / throughput / workers   (throughput measured here: :func:`measure_throughput`)

  and the output shard layout (greedy, in tensor order, as :func:`simmerge_lib.engine.plan_merge` lays it out).
- **Rehearse** (:func:`synthesize_checkpoints`, :func:`rehearse`): sharded checkpoints with the real tensor names
  and full-width shapes for a subset of layers; the streaming merge runs in a child process whose peak RSS
  (``wait4``) is compared with the bound; a second run is killed half-way and resumed, and the result is compared
  tensor by tensor with the operator applied to whole tensors in memory.
- **Spread** (:func:`merge_distributed`): the output shards are dealt to workers (local processes or Ray tasks),
  each writes its own shards into the shared ``OUT.partial``, then one index is written and the folder renamed.
  Output is byte-identical to a single-process merge because the shard layout is planned once, from the headers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import engine
from .checkpoint import INDEX_FILE, CheckpointError, atomic_folder, write_json_atomic
from .operators import get_operator, layer_index
from .paths import DATA_DIR, build_path
from .recipe import DTYPES, Recipe

if TYPE_CHECKING:
    import pandas as pd

#: The shipped config with the shape of a 111B dense decoder (Cohere-style, grouped-query attention).
DENSE_111B = DATA_DIR / "configs" / "dense-111b" / "config.json"
#: Fixed resident set of a merge process, added to the tensor-dependent part of the memory bound. Measured on the
#: course machine (2 CPUs, torch 2.13 CPU): 222 MiB after imports + 86 MiB once the merge kernels have run
#: (code pages, thread pools), whatever the model size; 384 MiB leaves room for other builds of torch.
OVERHEAD_BYTES = 384 * 2**20
GB = 1e9
MB = 2**20


# ==================================================================================================== inventory
@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model, as the config defines it."""

    name: str
    shape: tuple[int, ...]
    numel: int
    layer: int | None  # decoder layer index, None for embeddings, final norm, head

    @property
    def group(self) -> str:
        low = self.name.lower()
        if "embed" in low or "lm_head" in low:
            return "embed"
        if "attn" in low or "attention" in low:
            return "attn"
        if "mlp" in low or "feed_forward" in low:
            return "mlp"
        return "norm"


def load_config(config: str | os.PathLike[str] | Mapping[str, Any] | Any) -> Any:
    """A transformers ``PretrainedConfig`` from a config.json path, its folder, a dict, or a config object."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, Mapping):
        data = dict(config)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ValueError("config: no 'model_type'")
        return AutoConfig.for_model(model_type, **data)
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{path}: not a Hugging Face config (no 'model_type')")
    try:
        return load_config(data)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{path}: cannot build a config ({exc})") from None


def tensor_inventory(config: str | os.PathLike[str] | Mapping[str, Any] | Any) -> list[TensorSpec]:
    """Every tensor a checkpoint of this config holds, in the model's order, built on the meta device (no memory).

    Tied parameters (``lm_head`` tied to the embedding) appear once, as in a saved checkpoint; non-persistent
    buffers (rotary frequencies) are not saved and not listed.
    """
    from transformers import AutoModelForCausalLM

    cfg = load_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    seen: set[int] = set()
    out = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out.append(TensorSpec(name, tuple(tensor.shape), tensor.numel(), layer_index(name)))
    return out


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} not supported (one of {sorted(DTYPES)})")
    return DTYPES[name]


def shard_layout(sizes: Sequence[tuple[str, int]], shard_size: str | int) -> list[list[str]]:
    """Greedy shards in tensor order: a new shard starts when the next tensor would exceed ``shard_size``
    (a tensor larger than the limit gets a shard of its own) — the engine's rule."""
    limit = engine.parse_size(shard_size)
    if limit <= 0:
        raise ValueError(f"shard size must be positive, got {shard_size!r}")
    groups: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if groups[-1] and used + nbytes > limit:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    return groups


# ========================================================================================================= plan
@dataclass
class MergePlan:
    """What a merge of ``n_models`` checkpoints of one config costs, computed before any byte moves."""

    config: str
    n_models: int
    method: str
    in_dtype: str
    out_dtype: str
    shard_size: int
    workers: int
    tensors: list[TensorSpec]
    shards: list[list[str]]
    gb_per_s: float | None
    overhead_bytes: int = OVERHEAD_BYTES
    throughput_source: str = ""

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def bytes_read(self) -> int:
        return self.n_models * self.params * _dtype(self.in_dtype).itemsize

    @property
    def bytes_written(self) -> int:
        return self.params * _dtype(self.out_dtype).itemsize

    @property
    def largest(self) -> TensorSpec:
        return max(self.tensors, key=lambda t: t.numel)

    @property
    def peak_bytes(self) -> int:
        """(n + 2) x the largest tensor in float32 + interpreter overhead, per worker."""
        return peak_bound(self.n_models, self.largest.numel, self.overhead_bytes)

    @property
    def seconds(self) -> float | None:
        if not self.gb_per_s:
            return None
        return self.bytes_read / (self.gb_per_s * GB) / self.workers

    def table(self) -> pd.DataFrame:
        """One row per tensor: name, shape, layer, group, parameters, bytes read / written, output shard."""
        import pandas as pd

        shard_of = {n: i for i, names in enumerate(self.shards) for n in names}
        isz, osz = _dtype(self.in_dtype).itemsize, _dtype(self.out_dtype).itemsize
        return pd.DataFrame([{
            "name": t.name, "shape": "x".join(map(str, t.shape)), "layer": t.layer, "group": t.group,
            "params": t.numel, "bytes_read": self.n_models * t.numel * isz, "bytes_written": t.numel * osz,
            "shard": shard_of[t.name]} for t in self.tensors])

    def per_layer(self) -> pd.DataFrame:
        """Bytes read and written per decoder layer (embeddings / final norm / head as layer ``other``)."""
        import pandas as pd

        df = self.table()
        df["layer"] = df["layer"].map(lambda v: "other" if pd.isna(v) else int(v))
        return (df.groupby("layer", sort=False)[["params", "bytes_read", "bytes_written"]].sum()
                .reset_index())

    def summary(self) -> dict[str, Any]:
        big = self.largest
        return {
            "config": self.config, "method": self.method, "models": self.n_models, "workers": self.workers,
            "params": self.params, "params_b": round(self.params / 1e9, 3), "tensors": len(self.tensors),
            "in_dtype": self.in_dtype, "out_dtype": self.out_dtype,
            "bytes_read_gb": round(self.bytes_read / GB, 3), "bytes_written_gb": round(self.bytes_written / GB, 3),
            "shards": len(self.shards), "shard_size_gb": round(self.shard_size / GB, 3),
            "largest_tensor": big.name, "largest_shape": list(big.shape),
            "predicted_peak_gb_per_worker": round(self.peak_bytes / GB, 3),
            "gb_per_s": self.gb_per_s, "throughput_source": self.throughput_source,
            "predicted_hours": None if self.seconds is None else round(self.seconds / 3600, 3),
        }

    def describe(self) -> str:
        s = self.summary()
        lines = [f"merge plan: {s['method']} of {s['models']} checkpoints of {s['config']}",
                 f"  parameters      {s['params']:,} ({s['params_b']} B) in {s['tensors']} tensors",
                 f"  read            {s['bytes_read_gb']:,.1f} GB ({s['in_dtype']})",
                 f"  write           {s['bytes_written_gb']:,.1f} GB ({s['out_dtype']}) in {s['shards']} shards "
                 f"of <= {s['shard_size_gb']} GB",
                 f"  largest tensor  {s['largest_tensor']} {s['largest_shape']}",
                 f"  peak memory     {s['predicted_peak_gb_per_worker']} GB per worker "
                 f"((models + 2) x largest x 4 B + {self.overhead_bytes / MB:.0f} MiB)"]
        if self.seconds is not None:
            lines.append(f"  wall time       {self.seconds / 3600:.2f} h on {self.workers} worker(s) at "
                         f"{self.gb_per_s:.3f} GB/s read each ({self.throughput_source})")
        return "\n".join(lines)


def peak_bound(n_models: int, largest_numel: int, overhead_bytes: int = OVERHEAD_BYTES) -> int:
    """The engine's memory bound: ``(n + 2) * largest * 4 + overhead`` bytes (inputs and two work tensors in
    float32 for the largest tensor in flight; the admission budget never lets more be in flight)."""
    return (n_models + 2) * largest_numel * 4 + overhead_bytes


def plan_from_config(config: str | os.PathLike[str] | Mapping[str, Any] | Any = DENSE_111B, n_models: int = 3,
                     method: str = "ties", dtype: str | None = None, out_dtype: str | None = None,
                     shard_size: str | int = "5GB", workers: int = 1, gb_per_s: float | None = None,
                     throughput_source: str = "given", overhead_bytes: int = OVERHEAD_BYTES) -> MergePlan:
    """Plan merging ``n_models`` checkpoints (base included) of ``config``: see the module docstring.

    ``dtype`` defaults to the config's dtype (else bfloat16); ``gb_per_s`` is the input read rate of one merge
    process (e.g. from :func:`measure_throughput`); without it, no time is predicted.
    """
    op = get_operator(method)
    if n_models < op.min_models + (1 if op.needs_base else 0):
        raise ValueError(f"{method}: needs at least {op.min_models + op.needs_base} checkpoints, got {n_models}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    cfg = load_config(config)
    if dtype is None:
        found = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        dtype = str(found).removeprefix("torch.") if found is not None else "bfloat16"
    in_dt = _dtype(dtype)
    out_dt = _dtype(out_dtype) if out_dtype else in_dt
    tensors = tensor_inventory(cfg)
    shards = shard_layout([(t.name, t.numel * out_dt.itemsize) for t in tensors], shard_size)
    name = str(config) if isinstance(config, (str, os.PathLike)) else getattr(cfg, "model_type", "config")
    return MergePlan(config=name, n_models=n_models, method=method, in_dtype=str(in_dt).removeprefix("torch."),
                     out_dtype=str(out_dt).removeprefix("torch."), shard_size=engine.parse_size(shard_size),
                     workers=workers, tensors=tensors, shards=shards, gb_per_s=gb_per_s,
                     throughput_source=throughput_source if gb_per_s else "", overhead_bytes=overhead_bytes)


# ================================================================================================ synthesizing
def synthesize_checkpoints(root: str | os.PathLike[str], config: Any = DENSE_111B,
                           layers: Sequence[int] | None = (0,),
                           include: str | None = None, n_experts: int = 2, dtype: str = "bfloat16",
                           shard_size: str | int = "1GB", noise: float = 0.1, seed: int = 0,
                           progress: bool = True) -> dict[str, Path]:
    """Sharded checkpoints ``root/base``, ``root/e0`` … with the config's real tensor names and full shapes for
    the decoder ``layers`` given (every tensor when ``layers`` is None; only tensors whose name matches the
    regex ``include``, when given).

    Weights: base ~ N(0, 0.02^2); expert i = base + tau_i with tau_i ~ N(0, (noise * 0.02)^2), seeded per
    (seed, tensor, model). Each folder holds the real config.json, a safetensors index and ``rehearsal.json``
    (which tensors were kept). Existing folders made with the same arguments are reused.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    root = Path(root)
    cfg = load_config(config)
    keep = re.compile(include) if include else None
    chosen = None if layers is None else set(layers)
    tensors = [t for t in tensor_inventory(cfg)
               if (chosen is None or t.layer in chosen) and (keep is None or keep.search(t.name))]
    if not tensors:
        raise ValueError(f"no tensor of the config in layers {layers}"
                         + (f" matching {include!r}" if include else ""))
    dt = _dtype(dtype)
    names = ["base"] + [f"e{i}" for i in range(n_experts)]
    folders = {n: root / n for n in names}
    spec = {"layers": None if layers is None else list(layers), "include": include, "n_experts": n_experts,
            "dtype": dtype,
            "shard_size": engine.parse_size(shard_size), "noise": noise, "seed": seed,
            "tensors": {t.name: list(t.shape) for t in tensors}}
    stamp = root / "rehearsal.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec and all(f.is_dir() for f in folders.values()):
        return folders
    if root.exists():
        shutil.rmtree(root)
    groups = shard_layout([(t.name, t.numel * dt.itemsize) for t in tensors], shard_size)
    by_name = {t.name: t for t in tensors}
    config_dict = cfg.to_dict()
    config_dict["dtype"] = dtype
    bar = tqdm(total=sum(t.numel for t in tensors) * dt.itemsize * len(names), unit="B", unit_scale=True,
               desc="synthesize", disable=not progress)
    for n, folder in folders.items():
        folder.mkdir(parents=True)
        write_json_atomic(folder / "config.json", config_dict)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
        for tname in group:
            t = by_name[tname]
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib_crc(tname))
            base = torch.randn(t.shape, generator=gen).mul_(0.02)
            if t.group == "norm":
                base.add_(1.0)
            shard["base"][tname] = base.to(dt)
            for j in range(n_experts):
                tau = torch.randn(t.shape, generator=gen).mul_(0.02 * noise)
                shard[f"e{j}"][tname] = tau.add_(base).to(dt)
                del tau
            del base
            weight_map[tname] = fname
        for n, folder in folders.items():
            save_file(shard[n], str(folder / fname), {"format": "pt"})
            bar.update(sum(x.numel() for x in shard[n].values()) * dt.itemsize)
        del shard
    bar.close()
    total = sum(t.numel for t in tensors) * dt.itemsize
    for folder in folders.values():
        write_json_atomic(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        write_json_atomic(folder / "rehearsal.json", spec)
    write_json_atomic(stamp, spec)
    return folders


def zlib_crc(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


def ties_recipe(folders: Mapping[str, Path], density: float = 0.2, dtype: str = "bfloat16") -> Recipe:
    """A TIES recipe over a synthesized set: base + every expert, equal weights, the given density."""
    experts = [str(p) for n, p in folders.items() if n != "base"]
    return Recipe.from_dict({"merge_method": "ties", "base_model": str(folders["base"]),
                             "models": [{"model": e, "parameters": {"weight": 1.0, "density": density}}
                                        for e in experts],
                             "parameters": {"lambda": 1.0}, "dtype": dtype})


# =================================================================================================== measuring
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
    import tempfile

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
    plan = engine.plan_merge(recipe, "1TB")
    tasks = [t for s in plan.shards for t in s.tasks]
    biggest = max(math.prod(t.shape) for t in tasks)
    total_in = sum(info.nbytes for m in plan.inputs.values() for info in m.tensors.values())
    n_loaded = len(tasks[0].inputs) + (tasks[0].base is not None)
    return biggest, total_in, n_loaded


class _SafetensorsFolder:
    """Tensors of a checkpoint folder read with ``safetensors.safe_open``: the reference reader for
    :func:`compare_with_in_memory`, independent of the engine's ``pread`` reader (which the structural features
    share), so that a bug in that reader cannot hide in both sides of the comparison."""

    def __init__(self, folder: Path):
        from .checkpoint import weight_files

        self.files = weight_files(folder)
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}

    def names(self) -> list[str]:
        return list(self.files)

    def get_stored(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype."""
        from safetensors import safe_open

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
    from tqdm.auto import tqdm

    plan = engine.plan_merge(recipe, "1TB", compute_dtype)
    readers: dict[Path, _SafetensorsFolder] = {}
    try:
        for folder in plan.inputs:
            readers[folder] = _SafetensorsFolder(folder)
        by_path = {info.path: folder for folder, m in plan.inputs.items() for info in m.tensors.values()}
        merged = _SafetensorsFolder(Path(out))
        readers[Path(out)] = merged

        def load(info: engine.TensorInfo, name: str) -> torch.Tensor:
            return readers[by_path[info.path]].get_stored(name).clone()

        unequal: list[str] = []
        max_abs = 0.0
        tasks = plan.tasks
        for task in tqdm(tasks, desc="compare", disable=not progress):
            with torch.no_grad():
                expected = engine.merge_task(plan, task, load)
                got = merged.get_stored(task.name)
                if not torch.equal(got, expected):
                    unequal.append(task.name)
                    max_abs = max(max_abs, float((got.float() - expected.float()).abs().max()))
                del got, expected
    finally:
        for r in readers.values():
            r.close()
    return {"tensors": len(tasks), "unequal": unequal, "max_abs_diff": max_abs, "equal": not unequal}


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
    import resource

    cpu0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    engine.merge(recipe, root / "out", force=True, threads=threads, progress=False)
    seconds, cpu1 = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    result = {"gb_per_s": in_bytes / GB / seconds, "input_gb": in_bytes / GB, "seconds": seconds,
              "cpu_s": cpu, "gb_per_cpu_s": in_bytes / GB / cpu if cpu > 0 else float("nan"),
              "shape": [rows, hidden], "tensors": tensors, **floor}
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


# ================================================================================================== scale-out
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
    plan = engine.plan_merge(rec, shard_size, compute_dtype)
    if plan.fingerprint != fingerprint:
        raise CheckpointError(f"{out}: worker's plan differs from the coordinator's (inputs changed?)")
    partial = Path(out).with_name(Path(out).name + ".partial")
    dev = torch.device(device)
    if not shards:
        return {"pid": os.getpid(), "shards": [], "bytes": 0, "seconds": 0.0}

    engine.run_shards(plan, partial, dev, shards, threads or 1)
    return {"pid": os.getpid(), "shards": list(shards), "bytes": sum(plan.shards[i].size for i in shards),
            "seconds": time.perf_counter() - start}


def merge_distributed(recipe: Recipe, out: str | os.PathLike[str], workers: int = 2, backend: str = "process",
                      shard_size: str | int = "2GB", threads: int | None = 1, device: str = "cpu",
                      resume: bool = False, force: bool = False, progress: bool = True,
                      compute_dtype: str | None = None) -> dict[str, Any]:
    """Merge with the output shards spread over ``workers``: ``backend`` ``"process"`` (local processes),
    ``"ray"`` (Ray tasks: on a cluster ``OUT`` must be on a filesystem every node mounts) or ``"serial"``
    (the workers' code in this process, for debugging). The coordinator plans once, deals the shards
    (:func:`assign_shards`), waits, then writes the one index and the side files and renames ``OUT.partial``.
    Resume keeps the shards finished by an interrupted run, exactly as :func:`simmerge_lib.engine.merge`.
    Returns a report: shards per worker, seconds per worker and in all, ``out``. ``compute_dtype``: as in
    :func:`simmerge_lib.engine.merge`.
    """
    from tqdm.auto import tqdm

    if backend not in ("process", "ray", "serial"):
        raise ValueError(f"backend {backend!r}: one of process, ray, serial")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (pass --force to overwrite)")
    start = time.perf_counter()
    plan = engine.plan_merge(recipe, shard_size, compute_dtype)
    engine.check_output_location(out, plan)
    partial = out.with_name(out.name + ".partial")
    plan_file = partial / engine.PLAN_FILE
    done: set[int] = set()
    if partial.exists():
        previous = json.loads(plan_file.read_text()).get("fingerprint") if plan_file.is_file() else None
        if resume and previous == plan.fingerprint:
            done = {i for i, s in enumerate(plan.shards) if engine.shard_finished(partial / s.name, s)}
            keep = {plan.shards[i].name for i in done}
            for p in partial.iterdir():
                if p.name.endswith(".tmp") or (p.suffix == ".safetensors" and p.name not in keep):
                    p.unlink()
        else:
            shutil.rmtree(partial)
    pending = [i for i in range(len(plan.shards)) if i not in done]
    needed = sum(plan.shards[i].size for i in pending)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise CheckpointError(f"{out.parent}: not enough disk space ({free} bytes free, {needed} needed)")
    bins = [[pending[j] for j in b] for b in assign_shards([plan.shards[i].size for i in pending], workers)]
    rec = recipe.with_paths_resolved().to_dict()
    reports: list[dict[str, Any]] = []
    with atomic_folder(out, force=force) as partial_dir:
        write_json_atomic(plan_file, {"fingerprint": plan.fingerprint})
        args = [(rec, str(out), b, plan.fingerprint, shard_size, threads, device, compute_dtype) for b in bins]
        bar = tqdm(total=len(bins), desc=f"workers ({backend})", disable=not progress)
        if backend == "serial":
            for a in args:
                reports.append(run_worker(*a))
                bar.update()
        elif backend == "process":
            import multiprocessing as mp

            with ProcessPoolExecutor(len(bins), mp_context=mp.get_context("spawn")) as pool:
                for r in pool.map(_run_worker_star, args):
                    reports.append(r)
                    bar.update()
        else:
            import ray

            if not ray.is_initialized():
                ray.init(num_cpus=max(len(bins), 1), include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            remote = ray.remote(num_cpus=threads or 1)(run_worker)
            refs = [remote.remote(*a) for a in args]
            for r in ray.get(refs):
                reports.append(r)
                bar.update()
        bar.close()
        missing = [s.name for s in plan.shards if not engine.shard_finished(partial_dir / s.name, s)]
        if missing:
            raise CheckpointError(f"{partial_dir}: shard {missing[0]} was not finished by its worker "
                                  f"({len(missing)} missing)")
        write_json_atomic(partial_dir / INDEX_FILE, {
            "metadata": {"total_size": sum(t.nbytes for s in plan.shards for t in s.tasks)},
            "weight_map": {t.name: s.name for s in plan.shards for t in s.tasks}})
        engine.copy_side_files(plan, partial_dir)
        plan_file.unlink()
    return {"out": str(out), "workers": workers, "backend": backend, "shards": len(plan.shards),
            "resumed_shards": len(done), "reports": reports, "seconds": time.perf_counter() - start}


def _run_worker_star(args: tuple[Any, ...]) -> dict[str, Any]:
    return run_worker(*args)


# =================================================================================================== rehearsal
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
    """Full-width rehearsal of a TIES merge of base + 2 experts (see the module docstring), in ``root``.

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
    bound = peak_bound(n_loaded, largest)
    base = baseline_run()
    notes: list[str] = []
    try:
        # 2. uninterrupted, measured
        out_a = root / "merged"
        res = run_measured(merge_command(recipe_path, out_a, threads=threads, shard_size=shard_size, device=device))
        if res.returncode != 0:
            raise RuntimeError(f"merge failed: {res.output}")
        plan = engine.plan_merge(recipe, shard_size)
        n_shards = len(plan.shards)
        # 3. kill half-way, resume
        out_b = root / "resumed"
        half = max(1, n_shards // 2)
        killed = run_measured(merge_command(recipe_path, out_b, threads=threads, shard_size=shard_size, device=device),
                              kill_when=lambda: len(finished_shards(out_b)) >= half)
        kept = {p: (out_b.with_name("resumed.partial") / p).stat().st_mtime_ns for p in finished_shards(out_b)}
        if not killed.killed:
            notes.append("the merge finished before it could be killed (shards too few or too fast)")
        res_b = run_measured(merge_command(recipe_path, out_b, resume=True, threads=threads, shard_size=shard_size,
                                           device=device))
        if res_b.returncode != 0:
            raise RuntimeError(f"resumed merge failed: {res_b.output}")
        untouched = all((out_b / p).stat().st_mtime_ns == m for p, m in kept.items())
        resumed_ok = killed.killed and bool(kept) and untouched and files_identical(out_a, out_b)
        shutil.rmtree(out_b, ignore_errors=True)
        cmp = compare_with_in_memory(recipe, out_a, progress=progress)
        # 4. workers
        workers_equal = workers_s = None
        if workers > 1:
            out_c = root / "distributed"
            rep = merge_distributed(recipe, out_c, workers=workers, backend=backend, shard_size=shard_size,
                                    threads=1, force=True, progress=progress, device=device)
            workers_s = rep["seconds"]
            workers_equal = files_identical(out_a, out_c)
            shutil.rmtree(out_c, ignore_errors=True)
        out_bytes = sum(p.stat().st_size for p in out_a.glob("*.safetensors"))
        floor = io_floor(folders.values(), out_bytes, root / "floor.bin")
        # 5. structural features of (e0, e1) over base, streamed
        feat_rss = feat_s = None
        if features:
            fr = run_measured(python_module_command("simmerge_lib.scale", "features", str(folders["e0"]),
                                                    str(folders["e1"]), str(folders["base"])))
            if fr.returncode != 0:
                notes.append(f"structural features failed: {fr.output[-300:]}")
            feat_rss, feat_s = fr.peak_rss_bytes / MB, fr.wall_s
        merge_s = max(res.wall_s - base.wall_s, 1e-3)
        gbps = total_in / GB / merge_s
        return Rehearsal(
            layers=list(layers), tensors=cmp["tensors"], total_input_gb=total_in / GB, output_gb=out_bytes / GB,
            largest_tensor_mb_f32=largest * 4 / MB, baseline_rss_mb=base.peak_rss_bytes / MB,
            peak_rss_mb=res.peak_rss_bytes / MB, predicted_peak_mb=bound / MB,
            under_bound=res.peak_rss_bytes <= bound, merge_s=merge_s, startup_s=base.wall_s, gb_per_s=gbps,
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


def rehearsal_plan(rehearsal: Rehearsal, config: Any = DENSE_111B, gb_per_s: float | None = None,
                   workers: int = 1) -> MergePlan:
    """The full-model plan with throughput taken from a rehearsal (``gb_per_s`` overrides it)."""
    rate = gb_per_s or rehearsal.gb_per_s
    return plan_from_config(config, n_models=3, method="ties", workers=workers, gb_per_s=rate,
                            throughput_source="measured on the full-width rehearsal")


def rehearsal_dict(r: Rehearsal) -> dict[str, Any]:
    return asdict(r)


# ================================================================================================= command line
def _cmd_plan(args: argparse.Namespace) -> int:
    rate, source = args.gb_per_s, "given"
    if rate is None and args.calibrate:
        cal = measure_throughput(threads=args.threads)
        rate, source = cal["gb_per_s"], f"measured here ({cal['input_gb']:.2f} GB calibration merge)"
    plan = plan_from_config(args.config, n_models=args.models, method=args.method, dtype=args.dtype,
                            out_dtype=args.out_dtype, shard_size=args.shard_size, workers=args.workers,
                            gb_per_s=rate, throughput_source=source)
    if args.json:
        print(json.dumps(plan.summary()))
    else:
        print(plan.describe())
        if args.per_layer:
            print(plan.per_layer().to_string(index=False))
    return 0


def _cmd_distributed(args: argparse.Namespace) -> int:
    recipe = Recipe.from_yaml(args.recipe)
    rep = merge_distributed(recipe, args.out, workers=args.workers, backend=args.backend,
                            shard_size=args.shard_size, threads=args.threads, device=args.device,
                            resume=args.resume, force=args.force, progress=not args.quiet,
                            compute_dtype=args.compute_dtype)
    print(rep["out"])
    return 0


def register(subparsers: Any) -> None:
    """Add ``simmerge plan-merge CONFIG`` and ``simmerge merge-distributed RECIPE OUT``."""
    p = subparsers.add_parser("plan-merge", help="what a merge of checkpoints of one config costs (no weights)",
                              description="Plan a merge from a config.json alone: tensor inventory on the meta "
                                          "device, bytes read and written, output shards, peak memory and time.")
    p.add_argument("config", type=Path, help="config.json (or its folder)")
    p.add_argument("--models", type=int, default=3, help="input checkpoints, base included (default 3)")
    p.add_argument("--method", default="ties", help="merge method (default ties)")
    p.add_argument("--dtype", default=None, help="input dtype (default: the config's, else bfloat16)")
    p.add_argument("--out-dtype", default=None, help="output dtype (default: the input dtype)")
    p.add_argument("--shard-size", default="5GB", help="output shard size (default 5GB)")
    p.add_argument("--workers", type=int, default=1, help="merge workers (time divides, memory is per worker)")
    p.add_argument("--gb-per-s", type=float, default=None, help="input read rate of one worker, GB/s")
    p.add_argument("--calibrate", action="store_true", help="measure the rate on this machine (~1 GB merge)")
    p.add_argument("--threads", type=int, default=None, help="threads of the calibration merge")
    p.add_argument("--per-layer", action="store_true", help="also print bytes per layer")
    p.add_argument("--json", action="store_true", help="one JSON line instead of text")
    p.set_defaults(func=_cmd_plan)
    d = subparsers.add_parser("merge-distributed", help="merge with output shards spread over workers",
                              description="Like 'simmerge merge', with the output shards dealt to worker "
                                          "processes (or Ray tasks); one index is written at the end.")
    d.add_argument("recipe", type=Path, help="recipe YAML (mergekit format)")
    d.add_argument("out", type=Path, help="output checkpoint folder")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--backend", choices=["process", "ray", "serial"], default="process")
    d.add_argument("--threads", type=int, default=1, help="threads per worker (default 1)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--shard-size", default="2GB")
    d.add_argument("--resume", action="store_true")
    d.add_argument("--force", action="store_true")
    d.add_argument("--quiet", action="store_true")
    d.add_argument("--compute-dtype", choices=["float32"], default=None,
                   help="compute in float32 whatever the recipe's dtype (see simmerge merge --help)")
    d.set_defaults(func=_cmd_distributed)


def _main(argv: Sequence[str]) -> int:
    """``python -m simmerge_lib.scale features A B BASE``: structural features of a pair, streamed (measured child)."""
    if len(argv) == 4 and argv[0] == "features":
        from .features import structural_features

        print(json.dumps(structural_features(argv[1], argv[2], argv[3], argv[3])))
        return 0
    print("usage: python -m simmerge_lib.scale features A B BASE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
