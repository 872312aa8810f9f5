"""The streaming merge engine (chapter 02): carries a recipe out on checkpoints of any size.

Design, and why:

- **One tensor at a time.** Input shards are never memory-mapped or loaded whole: each tensor's bytes are read
  with ``pread`` into a fresh buffer (page cache is not resident set), merged in float32, cast to the output dtype
  and written with ``pwrite`` at its planned offset. The output's safetensors headers are computed before any
  data is merged (all shapes are known from the input headers), so tensors can finish in any order.
- **Bounded memory.** A tensor in flight costs about ``(inputs + 2) x its float32 size``; tensors are admitted
  while the total stays under that cost for the largest tensor, so peak RSS <= (inputs + 2) x largest tensor +
  the interpreter, whatever the model size. Small tensors merge in parallel threads (torch and pread/pwrite
  release the GIL); ``device="cuda"`` runs the arithmetic on a GPU.
- **Atomic and resumable.** Everything is written into ``OUT.partial``; a shard is renamed from ``*.tmp`` to its
  final name once all its tensors are written; ``resume=True`` keeps finished shards whose size and header match
  the plan (same recipe, same input files); ``OUT`` appears only when complete, and an existing one is replaced
  only with ``force``. Inputs are opened read-only.
- **Errors before work.** Architectures, tensor names, shapes, headers (truncation), index entries outside the
  folder, free disk space and ``OUT`` overlapping an input are checked before anything is written; NaN/Inf in an
  input is checked on every tensor read.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import CARD_FILE, INDEX_FILE, CheckpointError, atomic_folder, weight_files, write_json_atomic
from .operators import Operator, get_operator, infer_layer_count, layer_t, merge_tensor, merge_state_dicts
from .recipe import Recipe

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
PLAN_FILE = ".simmerge_plan.json"
_IO_CHUNK = 1 << 30  # pread/pwrite move at most ~2 GiB per call on Linux


# --- safetensors headers --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header: sane length, valid JSON, known dtypes, sizes matching shapes, and
    every tensor inside the file (a truncated shard fails here, before any merging)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes)")
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a mapping)")
    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt header entry for {name!r} ({exc!r})") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)}")
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, "
                                  f"file has {size}")
        out[name] = TensorInfo(path, dtype, shape, data_start + begin, end - begin)
    return out


def read_tensor(fd: int, info: TensorInfo) -> Tensor:
    """The tensor ``info`` describes, read with ``pread`` from ``fd`` (``info.path`` opened ``O_RDONLY``) into a
    fresh buffer, in its stored dtype and shape.

    Why not ``mmap`` (``safetensors.safe_open``): pages of a mapped file that were touched count in the process's
    resident set for as long as the file stays mapped, so reading a shard through a mapping costs its size in RSS
    on top of the tensor copies; ``pread`` goes through the page cache, which is not resident set. The caller owns
    the returned tensor (it may be modified in place). Safe to call from several threads on one ``fd``."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy()) if info.nbytes else memoryview(b"")
    done = 0
    try:
        while done < info.nbytes:
            got = os.preadv(fd, [view[done:done + _IO_CHUNK]], info.offset + done)
            if got <= 0:
                raise CheckpointError(f"{info.path}: truncated while reading at byte {info.offset + done}")
            done += got
    except OSError as exc:
        raise CheckpointError(f"{info.path}: cannot read at byte {info.offset + done} "
                              f"({exc.strerror or exc})") from None
    return buf.view(info.dtype).reshape(info.shape)


def _write_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(fd, data[done:done + _IO_CHUNK], offset + done)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CheckpointError(f"{path}: disk full while writing") from None
        raise CheckpointError(f"{path}: write failed ({exc.strerror or exc})") from None


def _tensor_bytes(t: Tensor) -> memoryview:
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


# --- planning -------------------------------------------------------------------------------------------------
@dataclass
class InputModel:
    """One input checkpoint: its folder, config and tensor locations."""

    folder: Path
    tensors: dict[str, TensorInfo]
    config: dict[str, Any]


@dataclass
class Task:
    """One output tensor: where its inputs are, where it goes."""

    name: str
    inputs: list[TensorInfo]  # the operator's inputs (besides the base)
    base: TensorInfo | None
    settings: list[dict[str, Any]]
    out_dtype: torch.dtype
    shape: tuple[int, ...]
    shard: int
    offset: int  # absolute offset in the shard file
    nbytes: int
    cost: int  # estimated bytes in memory while in flight


@dataclass
class Shard:
    name: str
    header: bytes
    size: int
    tasks: list[Task] = field(default_factory=list)


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB', 1000 -> bytes (decimal units as in transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"shard size {text!r} not understood (e.g. 2GB, 500MB)") from None


def load_input(folder: Path) -> InputModel:
    """Every tensor's location in the checkpoint folder ``folder`` (all shard headers read and checked, see
    :func:`read_header`) and its ``config.json``; no tensor data is read.

    Index entries pointing outside the folder, or naming a tensor its shard lacks, raise
    :class:`~.checkpoint.CheckpointError` naming the file."""
    files = weight_files(folder)  # refuses index entries outside the folder before opening anything
    headers = {path: read_header(path) for path in dict.fromkeys(files.values())}
    tensors = {}
    for name, path in files.items():
        if name not in headers[path]:
            raise CheckpointError(f"{path}: index names tensor {name!r} but the shard does not hold it")
        tensors[name] = headers[path][name]
    cfg_path = folder / "config.json"
    config: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({exc})") from None
    return InputModel(folder, tensors, config)


def _check_compatible(models: Sequence[InputModel], reference: InputModel) -> None:
    arch = (reference.config.get("architectures"), reference.config.get("model_type"))
    for m in models:
        if m is reference:
            continue
        other = (m.config.get("architectures"), m.config.get("model_type"))
        if m.config and reference.config and other != arch:
            raise CheckpointError(f"{m.folder}: architecture {other} differs from {reference.folder}'s {arch}")
        missing = [n for n in reference.tensors if n not in m.tensors]
        if missing:
            raise CheckpointError(f"{m.folder}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
        extra = [n for n in m.tensors if n not in reference.tensors]
        if extra:
            raise CheckpointError(f"{m.folder}: tensor {extra[0]!r} is not in {reference.folder} "
                                  f"(different architectures?)")
        for name, info in reference.tensors.items():
            if m.tensors[name].shape != info.shape:
                raise CheckpointError(f"{m.folder}: tensor {name!r} has shape {list(m.tensors[name].shape)}, "
                                      f"{reference.folder} has {list(info.shape)}")


def _header_bytes(entries: dict[str, dict[str, Any]]) -> bytes:
    body = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # safetensors aligns the data start to 8 bytes
    return struct.pack("<Q", len(body)) + body


@dataclass
class Plan:
    """Everything decided before merging: inputs, tasks, shards, and a fingerprint for resuming."""

    recipe: Recipe
    op: Operator
    inputs: dict[Path, InputModel]
    reference: InputModel
    layer_count: int | None
    shards: list[Shard]
    fingerprint: str

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)


def plan_merge(recipe: Recipe, shard_size: str | int = "2GB") -> Plan:
    """Read every input header and lay out the output (no tensor data is read)."""
    op = get_operator(recipe.merge_method)
    specs, base_spec = recipe.merge_inputs()
    folders = recipe.folders()
    for f in folders:
        if not f.is_dir():
            raise FileNotFoundError(f"{f}: input model folder not found (only local folders are supported)")
    inputs = {f.resolve(): load_input(f) for f in folders}
    spec_models = [inputs[recipe.resolve_path(s.model).resolve()] for s in specs]
    base = inputs[recipe.resolve_path(base_spec.model).resolve()] if base_spec is not None else None
    reference = base if base is not None else spec_models[0]
    _check_compatible(list(inputs.values()), reference)
    names = list(reference.tensors)
    # Read in file order: sequential I/O on the reference, and shards fill in the order tensors complete.
    names.sort(key=lambda n: (str(reference.tensors[n].path), reference.tensors[n].offset))
    layer_count = reference.config.get("num_hidden_layers") or infer_layer_count(names)
    out_dtype = recipe.output_dtype()
    limit = parse_size(shard_size)
    if limit <= 0:
        raise ValueError(f"shard size must be positive, got {shard_size!r}")
    groups: list[list[tuple[str, torch.dtype, int]]] = [[]]
    used = 0
    for name in names:
        info = reference.tensors[name]
        dtype = out_dtype if (out_dtype is not None and info.dtype.is_floating_point) else info.dtype
        numel = info.nbytes // info.dtype.itemsize
        nbytes = numel * dtype.itemsize
        if groups[-1] and used + nbytes > limit:
            groups.append([])
            used = 0
        groups[-1].append((name, dtype, nbytes))
        used += nbytes
    shards = []
    n_inputs = len(specs) + (1 if base is not None and op.needs_base else 0)
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        entries, pos = {}, 0
        for name, dtype, nbytes in group:
            entries[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(reference.tensors[name].shape),
                             "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        header = _header_bytes(entries)
        shard = Shard(fname, header, len(header) + pos)
        for name, dtype, nbytes in group:
            ref = reference.tensors[name]
            numel = ref.nbytes // ref.dtype.itemsize
            shard.tasks.append(Task(
                name=name, inputs=[m.tensors[name] for m in spec_models],
                base=base.tensors[name] if (base is not None and op.needs_base) else None,
                settings=[dict(s.parameters) for s in specs], out_dtype=dtype, shape=ref.shape, shard=i,
                offset=len(header) + entries[name]["data_offsets"][0], nbytes=nbytes,
                cost=(n_inputs + 2) * numel * 4))
        shards.append(shard)
    fp = hashlib.sha256()
    fp.update(json.dumps(recipe.with_paths_resolved().to_dict(), sort_keys=True, default=str).encode())
    for path in sorted({t.path for m in inputs.values() for t in m.tensors.values()}):
        st = path.stat()
        fp.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    for s in shards:
        fp.update(s.name.encode() + s.header)
    return Plan(recipe, op, inputs, reference, layer_count, shards, fp.hexdigest())


# --- execution ------------------------------------------------------------------------------------------------
class _Budget:
    """Admit tasks while the bytes in flight stay under a limit (always admit one when nothing is in flight)."""

    def __init__(self, limit: int):
        self.limit, self.used, self.cond = limit, 0, threading.Condition()
        self.failed = False

    def acquire(self, n: int) -> bool:
        with self.cond:
            while not self.failed and self.used and self.used + n > self.limit:
                self.cond.wait()
            if self.failed:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()


def _check_finite(x: Tensor, info: TensorInfo, name: str) -> None:
    if x.numel() and x.is_floating_point():
        lo, hi = torch.aminmax(x)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise CheckpointError(f"{info.path}: tensor {name!r} contains NaN or Inf")


class TaskRunner:
    """Carries out the tasks of one :class:`Plan` into ``partial`` (one instance per :func:`run_shards` call):
    holds the input and output file descriptors, writes each shard's header when the shard is opened, merges and
    writes one tensor per :meth:`run_task` (thread-safe) and renames a shard to its final name when its last tensor
    is written. Public so that tests can inject faults into :meth:`run_task` (a crash mid-merge)."""

    def __init__(self, plan: Plan, partial: Path, device: torch.device, progress: Any):
        self.plan, self.partial, self.device, self.progress = plan, partial, device, progress
        self.fds: dict[Path, int] = {}
        self.out_fds: dict[int, int] = {}
        self.remaining: dict[int, int] = {}
        self.lock = threading.Lock()

    def open_inputs(self) -> None:
        for model in self.plan.inputs.values():
            for info in model.tensors.values():
                if info.path not in self.fds:
                    self.fds[info.path] = os.open(info.path, os.O_RDONLY)

    def open_shard(self, index: int) -> None:
        shard = self.plan.shards[index]
        tmp = self.partial / (shard.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, shard.size)  # a full disk shows up now, not half-way through
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.ENOSPC:
                raise CheckpointError(f"{tmp}: disk full (needs {shard.size} bytes)") from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise CheckpointError(f"{tmp}: cannot allocate ({exc.strerror})") from None
            fd = os.open(tmp, os.O_RDWR)
        _write_all(fd, memoryview(shard.header), 0, tmp)
        with self.lock:
            self.out_fds[index] = fd
            self.remaining[index] = len(shard.tasks)

    def load(self, info: TensorInfo, name: str) -> Tensor:
        raw = read_tensor(self.fds[info.path], info)
        if self.device.type != "cpu":
            raw = raw.to(self.device, non_blocking=False)
        x = raw if raw.dtype == torch.float32 else raw.to(torch.float32)
        del raw
        _check_finite(x, info, name)
        return x

    def run_task(self, task: Task) -> None:
        with torch.no_grad():
            ref = task.base or task.inputs[0]
            if not ref.dtype.is_floating_point:
                out = read_tensor(self.fds[ref.path], ref)
            else:
                tensors = [self.load(info, task.name) for info in task.inputs]
                base = self.load(task.base, task.name) if task.base is not None else None
                merged = merge_tensor(self.plan.op, task.name, tensors, base, task.settings,
                                      self.plan.recipe.parameters, layer_t(task.name, self.plan.layer_count))
                del tensors, base
                out = merged.to(task.out_dtype)
                del merged
                if out.numel():
                    lo, hi = torch.aminmax(out)
                    if not (torch.isfinite(lo) and torch.isfinite(hi)):
                        raise CheckpointError(f"{self.plan.reference.folder}: merged tensor {task.name!r} is "
                                              f"Inf/NaN in {task.out_dtype} (overflow)")
                if out.device.type != "cpu":
                    out = out.cpu()
        shard = self.plan.shards[task.shard]
        _write_all(self.out_fds[task.shard], _tensor_bytes(out), task.offset, self.partial / (shard.name + ".tmp"))
        del out
        with self.lock:
            self.remaining[task.shard] -= 1
            done = self.remaining[task.shard] == 0
            if done:
                os.close(self.out_fds.pop(task.shard))
        if done:
            os.replace(self.partial / (shard.name + ".tmp"), self.partial / shard.name)
        self.progress.update(task.nbytes)

    def close(self) -> None:
        for fd in list(self.fds.values()) + list(self.out_fds.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        self.out_fds.clear()


def shard_finished(path: Path, shard: Shard) -> bool:
    """Whether ``path`` is a finished copy of the planned output ``shard``: its final size and the plan's header.

    A shard only gets its final name once all its tensors are written, and the header encodes every tensor's
    name, dtype, shape and offset, so size + header is what resuming (here and in chapter 07's workers) checks."""
    if not path.is_file() or path.stat().st_size != shard.size:
        return False
    with open(path, "rb") as fh:
        return fh.read(len(shard.header)) == shard.header


def check_output_location(out: Path, plan: Plan) -> None:
    """Refuse (``ValueError``) an output folder ``out`` (or its ``.partial``) that is, contains, or lies inside
    one of the plan's input folders: replacing it would delete the inputs being read."""
    targets = [out.resolve(), out.resolve().with_name(out.name + ".partial")]
    for folder in plan.inputs:
        for target in targets:
            if target == folder or target in folder.parents or folder in target.parents:
                raise ValueError(f"{out}: output overlaps the input model {folder}; choose another folder")


def copy_side_files(plan: Plan, partial: Path) -> None:
    """Write everything but the weights into ``partial``: the reference model's ``config.json`` (dtype set to
    the recipe's output dtype) and ``generation_config.json``, the tokenizer files of the recipe's tokenizer
    source, the recipe with absolute paths (``mergekit_config.yml``) and the model card.

    The last step of a merge, single-process or distributed (chapter 07), once all shards are in place."""
    recipe = plan.recipe
    ref_folder = plan.reference.folder
    out_dtype = recipe.output_dtype()
    cfg_src = ref_folder / "config.json"
    if cfg_src.is_file():
        config = json.loads(cfg_src.read_text())
        if out_dtype is not None:
            name = str(out_dtype).removeprefix("torch.")
            config["dtype"] = name
            if "torch_dtype" in config:
                config["torch_dtype"] = name
        write_json_atomic(partial / "config.json", config)
    gen = ref_folder / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, partial / gen.name)
    tok = recipe.tokenizer_folder()
    if not tok.is_dir():
        raise FileNotFoundError(f"{tok}: tokenizer_source folder not found")
    for fname in TOKENIZER_FILES:
        if (tok / fname).is_file():
            shutil.copyfile(tok / fname, partial / fname)
    resolved = recipe.with_paths_resolved()
    resolved.to_yaml(partial / "mergekit_config.yml")
    write_json_atomic(partial / CARD_FILE, {"role": "merge", "recipe": resolved.to_dict()})


def merge(recipe: Recipe, out: str | os.PathLike[str], device: str = "cpu", resume: bool = False,
          force: bool = False, shard_size: str | int = "2GB", threads: int | None = None,
          progress: bool = True) -> Path:
    """Carry ``recipe`` out into the checkpoint folder ``out`` (streaming; see the module docstring)."""
    from tqdm.auto import tqdm

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (pass --force to overwrite)")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available")
    plan = plan_merge(recipe, shard_size)
    check_output_location(out, plan)
    partial = out.with_name(out.name + ".partial")
    plan_file = partial / PLAN_FILE
    done: set[int] = set()
    if partial.exists():
        previous = None
        if resume and plan_file.is_file():
            previous = json.loads(plan_file.read_text()).get("fingerprint")
        if resume and previous == plan.fingerprint:
            done = {i for i, s in enumerate(plan.shards) if shard_finished(partial / s.name, s)}
            for p in partial.iterdir():
                if p.name.endswith(".tmp") or (p.suffix == ".safetensors" and
                                               p.name not in {plan.shards[i].name for i in done}):
                    p.unlink()
        else:
            if resume and previous is not None:
                print(f"simmerge merge: {partial} was made by another recipe or other inputs; starting afresh")
            shutil.rmtree(partial)
    elif resume:
        print(f"simmerge merge: nothing to resume in {partial}; starting afresh")
    needed = sum(s.size for i, s in enumerate(plan.shards) if i not in done)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise CheckpointError(f"{out.parent}: not enough disk space ({free} bytes free, {needed} needed)")
    n_threads = threads or min(4, max(2, os.cpu_count() or 1))
    budget_limit = max(t.cost for s in plan.shards for t in s.tasks) if plan.shards[0].tasks else 1
    with atomic_folder(out, force=force) as partial_dir:
        write_json_atomic(plan_file, {"fingerprint": plan.fingerprint})
        bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc=f"merge {out.name}",
                   disable=not progress, initial=sum(plan.shards[i].size for i in done))
        try:
            run_shards(plan, partial_dir, dev, [i for i in range(len(plan.shards)) if i not in done], n_threads,
                       bar, budget_limit)
        finally:
            bar.close()
        write_json_atomic(partial_dir / INDEX_FILE, {
            "metadata": {"total_size": sum(t.nbytes for s in plan.shards for t in s.tasks)},
            "weight_map": {t.name: s.name for s in plan.shards for t in s.tasks}})
        copy_side_files(plan, partial_dir)
        plan_file.unlink()
    return out


def run_shards(plan: Plan, partial_dir: Path, device: torch.device, shards: Sequence[int], threads: int,
               bar: Any = None, budget_limit: int | None = None) -> None:
    """Write the given output shards of ``plan`` into ``partial_dir`` with ``threads`` merge threads.

    Tensors in flight are bounded by ``budget_limit`` bytes (default: the largest task), which is what bounds peak
    memory; the first error stops queuing, lets running tensors finish, and is raised. Used by :func:`merge` and by
    the scale-out workers of chapter 07, each writing its own shards."""
    shards = list(shards)
    if not shards:
        return
    limit = budget_limit or max((t.cost for i in shards for t in plan.shards[i].tasks), default=1)
    runner = TaskRunner(plan, partial_dir, device, bar if bar is not None else _NullBar())
    budget = _Budget(limit)
    errors: list[BaseException] = []

    def run(task: Task) -> None:
        try:
            if not budget.failed:
                runner.run_task(task)
        except BaseException as exc:
            errors.append(exc)
            budget.fail()
            raise
        finally:
            budget.release(task.cost)

    try:
        runner.open_inputs()
        with ThreadPoolExecutor(threads, thread_name_prefix="simmerge") as pool:
            for i in shards:
                try:
                    runner.open_shard(i)
                except BaseException:
                    budget.fail()  # queued tensors are skipped; running ones finish
                    raise
                for task in plan.shards[i].tasks:
                    if not budget.acquire(task.cost):
                        break
                    pool.submit(run, task)
                if budget.failed:
                    break
        if errors:
            raise errors[0]
    finally:
        runner.close()


class _NullBar:
    def update(self, n: int) -> None:
        pass


def merge_in_memory(recipe: Recipe) -> dict[str, Tensor]:
    """The recipe's result as a state dict, loading the inputs whole (small models; same operator code)."""
    from .checkpoint import load_state_dict

    specs, base_spec = recipe.merge_inputs()
    op = get_operator(recipe.merge_method)
    models = [load_state_dict(recipe.resolve_path(s.model)) for s in specs]
    base = load_state_dict(recipe.resolve_path(base_spec.model)) if base_spec is not None else None
    reference_folder = recipe.resolve_path(base_spec.model if base_spec is not None else specs[0].model)
    layer_count = None
    cfg = reference_folder / "config.json"
    if cfg.is_file():
        layer_count = json.loads(cfg.read_text()).get("num_hidden_layers")
    return merge_state_dicts(recipe.merge_method, models, base if op.needs_base else None,
                             [dict(s.parameters) for s in specs], recipe.parameters, layer_count,
                             out_dtype=recipe.output_dtype())


# --- command line ---------------------------------------------------------------------------------------------
def _cmd_merge(args: argparse.Namespace) -> int:
    from .planner import is_multi_document, merge_multi

    if is_multi_document(args.recipe):  # a multi-step plan (chapter 05): one document per step, "@name" references
        out = merge_multi(args.recipe, args.out, force=args.force, resume=args.resume, device=args.device,
                          shard_size=args.shard_size, threads=args.threads, progress=not args.quiet)
        print(out)
        return 0
    recipe = Recipe.from_yaml(args.recipe)
    out = merge(recipe, args.out, device=args.device, resume=args.resume, force=args.force,
                shard_size=args.shard_size, threads=args.threads, progress=not args.quiet)
    print(out)
    return 0


def register(subparsers: Any) -> None:
    """Add ``simmerge merge RECIPE.yml OUT``."""
    p = subparsers.add_parser("merge", help="merge checkpoints with a mergekit-format YAML recipe (streaming)",
                              description="Merge checkpoints with a mergekit-format YAML recipe, one tensor at a "
                                          "time, into the Hugging Face folder OUT (written atomically).")
    p.add_argument("recipe", type=Path, help="recipe YAML (mergekit format)")
    p.add_argument("out", type=Path, help="output checkpoint folder")
    p.add_argument("--device", default="cpu", help="where the arithmetic runs: cpu (default) or cuda")
    p.add_argument("--resume", action="store_true", help="keep finished shards of an interrupted run")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    p.add_argument("--shard-size", default="2GB", help="maximum output shard size (default 2GB)")
    p.add_argument("--threads", type=int, default=None, help="tensors merged in parallel (default: min(4, cores))")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_merge)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simmerge_lib.engine RECIPE OUT``: ``simmerge merge`` without importing the other commands."""
    import sys

    parser = argparse.ArgumentParser(prog="python -m simmerge_lib.engine")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["merge", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"simmerge merge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
