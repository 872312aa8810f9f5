"""The streaming merge engine (chapter 02): carries a recipe out on checkpoints of any size.

Design, and why:

- **One tensor at a time.** Input shards are never memory-mapped or loaded whole: each tensor's bytes are read
  with ``pread`` into a fresh buffer (page cache is not resident set), rounded to the recipe's compute dtype and
  merged in float32 working copies (:mod:`simmerge_lib.operators`), cast to the output dtype and written with
  ``pwrite`` at its planned offset. The output's safetensors headers are computed before any data is merged (all
  shapes are known from the input headers), so tensors can finish in any order.
- **Recipes as mergekit reads them.** A ``models`` recipe merges every tensor by name; a ``slices`` recipe builds
  the output layer by layer from the sources' layer ranges, renumbering tensor names and writing the new
  ``num_hidden_layers`` (passthrough slices stack layers); ``tokenizer_source`` re-indexes vocabulary rows
  (:mod:`simmerge_lib.vocab`).
- **Bounded memory.** A tensor in flight costs about ``(inputs + 1) x its float32 size``; tensors are admitted
  while the total stays under ``(inputs + 2) x the largest tensor's float32 size``, so peak RSS stays under that
  plus the interpreter, whatever the model size. Tensors merge in parallel threads (torch and pread/pwrite
  release the GIL), small ones beside the largest; ``device="cuda"`` runs the arithmetic on a GPU.
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
import functools
import hashlib
import json
import math
import os
import shutil
import struct
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import CARD_FILE, INDEX_FILE, CheckpointError, atomic_folder, weight_files, write_json_atomic
from .kernels import is_exact, round_
from .operators import (Operator, infer_layer_count, layer_index, layer_t, merge_tensor, resolve_params, with_layer,
                        work_dtype)
from .operators import compute_dtype as promoted_dtype
from .documents import is_multi_document, read_documents, resolve_references
from .recipe import DTYPES, ModelSpec, Recipe, RecipeError, SliceInputs
from .vocab import VocabPlan, is_vocab_tensor, plan_vocab

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


def read_tensor(fd: int, info: TensorInfo, out: Tensor | None = None) -> Tensor:
    """The tensor ``info`` describes, read with ``pread`` from ``fd`` (``info.path`` opened ``O_RDONLY``) into a
    fresh buffer, in its stored dtype and shape.

    Why not ``mmap`` (``safetensors.safe_open``): pages of a mapped file that were touched count in the process's
    resident set for as long as the file stays mapped, so reading a shard through a mapping costs its size in RSS
    on top of the tensor copies; ``pread`` goes through the page cache, which is not resident set. The caller owns
    the returned tensor (it may be modified in place). Safe to call from several threads on one ``fd``.
    ``out``: a tensor of ``info``'s dtype and shape to read into (a reused buffer) instead of a new one."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8) if out is None else out.view(-1).view(torch.uint8)
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

    def layer_count(self) -> int:
        """Decoder layers: the config's ``num_hidden_layers``, else the layer indices in the tensor names."""
        n = self.config.get("num_hidden_layers")
        return int(n) if n else (infer_layer_count(list(self.tensors)) or 0)


@dataclass
class Task:
    """One output tensor: where its inputs are, how they are merged, where it goes."""

    name: str
    inputs: list[TensorInfo]  # the operator's inputs (besides the base)
    base: TensorInfo | None
    settings: list[dict[str, Any]]  # each input's own parameter settings
    out_dtype: torch.dtype
    shape: tuple[int, ...]
    shard: int
    offset: int  # absolute offset in the shard file
    nbytes: int
    cost: int  # estimated bytes in memory while in flight
    compute: torch.dtype | None = None  # the dtype the merge is computed in (None: not floating point, copied)
    input_names: list[str] = field(default_factory=list)  # each input's own tensor name (slices renumber layers)
    slice_settings: dict[str, Any] = field(default_factory=dict)
    t: float = 0.0  # position for gradients
    base_name: str | None = None  # the base's own tensor name
    models: list[str] = field(default_factory=list)  # the inputs' models (then the base's), for vocabulary alignment
    vocab: bool = False  # rows follow the tokenizer: aligned to the output vocabulary before merging
    bound: int = 0  # the documented memory bound for this tensor: (inputs + 2) x its working size


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


def _check_architecture(models: Sequence[InputModel], reference: InputModel) -> None:
    arch = (reference.config.get("architectures"), reference.config.get("model_type"))
    for m in models:
        other = (m.config.get("architectures"), m.config.get("model_type"))
        if m is not reference and m.config and reference.config and other != arch:
            raise CheckpointError(f"{m.folder}: architecture {other} differs from {reference.folder}'s {arch}")


def _check_compatible(models: Sequence[InputModel], reference: InputModel, vocab: VocabPlan | None = None) -> None:
    """Same architecture, tensor names and shapes as ``reference`` (rows of vocabulary tensors may differ when
    the recipe aligns vocabularies)."""
    _check_architecture(models, reference)
    for m in models:
        if m is reference:
            continue
        missing = [n for n in reference.tensors if n not in m.tensors]
        if missing:
            raise CheckpointError(f"{m.folder}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
        extra = [n for n in m.tensors if n not in reference.tensors]
        if extra:
            raise CheckpointError(f"{m.folder}: tensor {extra[0]!r} is not in {reference.folder} "
                                  f"(different architectures?)")
        for name, info in reference.tensors.items():
            other = m.tensors[name].shape
            if other != info.shape and not (vocab is not None and is_vocab_tensor(name) and other[1:] ==
                                            info.shape[1:]):
                hint = " (other vocabularies: set tokenizer_source to base or union)" if (
                    is_vocab_tensor(name) and other[1:] == info.shape[1:]) else ""
                raise CheckpointError(f"{m.folder}: tensor {name!r} has shape {list(other)}, "
                                      f"{reference.folder} has {list(info.shape)}{hint}")


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
    #: The number of decoder layers of the output (slices renumber and may add or drop layers).
    out_layers: int | None = None
    #: Per output layer, (the model it was taken from, its layer there): rebuilds per-layer config lists.
    layer_sources: list[tuple[str, int]] = field(default_factory=list)
    vocab: VocabPlan | None = None
    compute_override: torch.dtype | None = None

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def tasks(self) -> list[Task]:
        return [t for s in self.shards for t in s.tasks]

    @property
    def memory_bound(self) -> int:
        """Bytes the tensors in flight may take: (inputs + 2) x the largest tensor's working size. Each tensor's
        own estimate (:attr:`Task.cost`) is below its share of it, which lets small tensors merge beside the
        largest one."""
        return max((t.bound for t in self.tasks), default=1)


@dataclass
class _Spec:
    """One output tensor before it is placed in a shard."""

    name: str
    inputs: list[tuple[str, str]]  # (model, tensor name) of each input besides the base
    base: tuple[str, str] | None
    settings: list[dict[str, Any]]
    slice_settings: dict[str, Any]
    t: float


def plan_merge(recipe: Recipe, shard_size: str | int = "2GB", compute_dtype: str | torch.dtype | None = None
               ) -> Plan:
    """Read every input header and lay out the output (no tensor data is read).

    ``compute_dtype`` overrides the recipe's ``dtype`` as the dtype the merge is computed in (``"float32"``: the
    most accurate merge; see :func:`merge`); the output dtype stays the recipe's."""
    op = recipe.operator()
    override = DTYPES[compute_dtype] if isinstance(compute_dtype, str) else compute_dtype
    names = recipe.model_names()
    merged_names = [n for n in names if n in _merged_models(recipe)]
    for n in names:
        if not recipe.resolve_path(n).is_dir():
            raise FileNotFoundError(f"{recipe.resolve_path(n)}: input model folder not found (only local folders "
                                    f"are supported)")
    by_name = {n: recipe.resolve_path(n).resolve() for n in merged_names}
    inputs = {f: load_input(f) for f in dict.fromkeys(by_name.values())}
    models = {n: inputs[f] for n, f in by_name.items()}
    reference = models[recipe.reference_model()]
    vocab = plan_vocab(recipe, {n: m.folder for n, m in models.items()}, {n: m.config for n, m in models.items()})
    if recipe.slices is None:
        specs, layer_count, out_layers, layer_sources = _specs_from_models(recipe, models, reference, vocab)
    else:
        _check_architecture(list({id(m): m for m in models.values()}.values()), reference)
        specs, layer_count, out_layers, layer_sources = _specs_from_slices(recipe, models)
    tasks = [_task(spec, models, recipe, op, override, vocab) for spec in specs]
    # Read in file order: sequential I/O on the first input, and shards fill in the order tensors complete.
    first = [(t.inputs or [t.base])[0] for t in tasks]
    order = sorted(range(len(tasks)), key=lambda i: (str(first[i].path), first[i].offset))
    shards = _lay_out([tasks[i] for i in order], shard_size)
    fp = hashlib.sha256()
    fp.update(json.dumps(recipe.with_paths_resolved().to_dict(), sort_keys=True, default=str).encode())
    fp.update(str(override).encode())
    for path in sorted({t.path for m in inputs.values() for t in m.tensors.values()}):
        st = path.stat()
        fp.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    for s in shards:
        fp.update(s.name.encode() + s.header)
    return Plan(recipe, op, inputs, reference, layer_count, shards, fp.hexdigest(), out_layers, layer_sources,
                vocab, override)


def _merged_models(recipe: Recipe) -> set[str]:
    names = {m.model for m in recipe.models} | ({recipe.base_model} if recipe.base_model else set())
    for sl in recipe.slices or []:
        names |= {s.model for s in sl.sources} | ({sl.base_model} if sl.base_model else set())
    return names


def _specs_from_models(recipe: Recipe, models: Mapping[str, InputModel], reference: InputModel,
                       vocab: VocabPlan | None) -> tuple[list[_Spec], int | None, int | None, list[tuple[str, int]]]:
    """A ``models`` recipe: every tensor of the reference, merged from the same name in each model, gradients
    over ``t = layer / (layers - 1)``."""
    specs_in, base_spec = recipe.merge_inputs()
    _check_compatible(list({id(m): m for m in models.values()}.values()), reference, vocab)
    names = list(reference.tensors)
    layer_count = reference.config.get("num_hidden_layers") or infer_layer_count(names)
    settings = [dict(s.parameters) for s in specs_in]
    out = [_Spec(name, [(s.model, name) for s in specs_in], (base_spec.model, name) if base_spec else None,
                 settings, {}, layer_t(name, layer_count)) for name in names]
    return out, layer_count, layer_count, [(recipe.reference_model(), i) for i in range(layer_count or 0)]


def _is_pre_layer(name: str) -> bool:
    """Whether a tensor outside the decoder layers comes before them (embeddings) rather than after (final norm,
    head): slices take the former from the first slice and the latter from the last, as mergekit does."""
    return any(k in name for k in ("embed", "wte", "wpe"))


def _specs_from_slices(recipe: Recipe, models: Mapping[str, InputModel]
                       ) -> tuple[list[_Spec], int | None, int, list[tuple[str, int]]]:
    """A ``slices`` recipe: output layers are the slices' layers in order, renumbered from 0; each output layer
    merges layer ``layer_range[0] + i`` of every source of its slice, with gradients over the slice
    (``t = i / (length - 1)``, 1 for a one-layer slice). Tensors outside the layers come from the first slice's
    sources (embeddings) and the last slice's (final norm, head), at ``t = 0``."""
    src = recipe.source
    slices = recipe.slice_inputs()
    specs: list[_Spec] = []
    layer_sources: list[tuple[str, int]] = []

    def members(sl: SliceInputs) -> list[ModelSpec]:
        return sl.inputs + ([sl.base] if sl.base is not None else [])

    for i, sl in enumerate(slices):
        for m in members(sl):
            n = models[m.model].layer_count()
            lo, hi = m.layer_range or (0, 0)
            if hi > n:
                raise RecipeError(f"{src}: slices[{i}]: layer_range [{lo}, {hi}) of {m.model} goes past its {n} "
                                  f"layers")

    def outside(sl: SliceInputs, pre: bool) -> list[_Spec]:
        lead = members(sl)[0]
        names = [n for n in models[lead.model].tensors if layer_index(n) is None and _is_pre_layer(n) == pre]
        for n in names:
            for m in members(sl):
                if n not in models[m.model].tensors:
                    raise CheckpointError(f"{models[m.model].folder}: tensor {n!r} is missing")
        return [_Spec(n, [(m.model, n) for m in sl.inputs], (sl.base.model, n) if sl.base else None,
                      [dict(m.parameters) for m in sl.inputs], dict(sl.parameters), 0.0) for n in names]

    specs += outside(slices[0], pre=True)
    out_layer = 0
    for i, sl in enumerate(slices):
        for k in range(sl.length):
            t = k / (sl.length - 1) if sl.length > 1 else 1.0
            layer_names = {}
            for m in members(sl):
                layer = (m.layer_range or (0, 0))[0] + k
                found = {with_layer(n, 0): n for n in models[m.model].tensors if layer_index(n) == layer}
                if not found:
                    raise CheckpointError(f"{models[m.model].folder}: no tensors of layer {layer} (slices[{i}])")
                layer_names[m.model] = found
            lead = members(sl)[0]
            for m in members(sl)[1:]:
                if set(layer_names[m.model]) != set(layer_names[lead.model]):
                    raise CheckpointError(f"{models[m.model].folder}: layer {(m.layer_range or (0, 0))[0] + k} "
                                          f"holds other tensors than layer {(lead.layer_range or (0, 0))[0] + k} "
                                          f"of {models[lead.model].folder} (slices[{i}])")
            for key in layer_names[lead.model]:
                specs.append(_Spec(with_layer(key, out_layer), [(m.model, layer_names[m.model][key]) for m in sl.inputs],
                                   (sl.base.model, layer_names[sl.base.model][key]) if sl.base else None,
                                   [dict(m.parameters) for m in sl.inputs], dict(sl.parameters), t))
            layer_sources.append((lead.model, (lead.layer_range or (0, 0))[0] + k))
            out_layer += 1
    specs += outside(slices[-1], pre=False)
    return specs, out_layer, out_layer, layer_sources


def _task(spec: _Spec, models: Mapping[str, InputModel], recipe: Recipe, op: Operator,
          override: torch.dtype | None, vocab: VocabPlan | None) -> Task:
    inputs = [models[m].tensors[n] for m, n in spec.inputs]
    base = models[spec.base[0]].tensors[spec.base[1]] if spec.base is not None else None
    infos = inputs + ([base] if base is not None else [])
    for (m, n), info in zip(spec.inputs + ([spec.base] if spec.base else []), infos):
        if info.shape[1:] != infos[0].shape[1:] or (info.shape != infos[0].shape and not
                                                     (vocab is not None and is_vocab_tensor(n))):
            raise CheckpointError(f"{models[m].folder}: tensor {n!r} has shape {list(info.shape)}, "
                                  f"{infos[0].path.parent} has {list(infos[0].shape)} ({spec.name!r})")
    floating = all(i.dtype.is_floating_point for i in infos)
    shape = infos[0].shape
    aligned = vocab is not None and is_vocab_tensor(spec.name) and floating
    if aligned:
        shape = (vocab.size, *shape[1:])
    compute = None
    out_dtype = infos[0].dtype if base is None else base.dtype
    if floating:
        compute = override or promoted_dtype(recipe.compute_dtype(), [i.dtype for i in infos])
        out_dtype = recipe.output_dtype() or compute
    numel = math.prod(shape)
    work_size = work_dtype(compute).itemsize if compute is not None else 4
    # in flight: the working copies of the inputs, plus one tensor's worth for a read buffer being converted or
    # the output being cast (the operators' own temporaries are blocks); aligning a vocabulary keeps the
    # unaligned copies for a moment
    cost = (len(infos) * (2 if aligned else 1) + 1) * numel * work_size
    bound = (len(infos) * (2 if aligned else 1) + 2) * numel * work_size
    return Task(name=spec.name, inputs=inputs, base=base, settings=spec.settings, out_dtype=out_dtype, shape=shape,
                shard=-1, offset=0, nbytes=numel * out_dtype.itemsize, cost=cost, compute=compute,
                input_names=[n for _, n in spec.inputs], slice_settings=spec.slice_settings, t=spec.t,
                base_name=spec.base[1] if spec.base is not None else None, bound=bound,
                models=[m for m, _ in spec.inputs] + ([spec.base[0]] if spec.base else []), vocab=aligned)


def _lay_out(tasks: list[Task], shard_size: str | int) -> list[Shard]:
    """Greedy shards in task order (a tensor larger than the limit gets a shard of its own); each task gets its
    shard and absolute offset."""
    limit = parse_size(shard_size)
    if limit <= 0:
        raise ValueError(f"shard size must be positive, got {shard_size!r}")
    groups: list[list[Task]] = [[]]
    used = 0
    for task in tasks:
        if groups[-1] and used + task.nbytes > limit:
            groups.append([])
            used = 0
        groups[-1].append(task)
        used += task.nbytes
    shards = []
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        entries, pos = {}, 0
        for task in group:
            entries[task.name] = {"dtype": DTYPE_NAMES[task.out_dtype], "shape": list(task.shape),
                                  "data_offsets": [pos, pos + task.nbytes]}
            pos += task.nbytes
        header = _header_bytes(entries)
        for task in group:
            task.shard, task.offset = i, len(header) + entries[task.name]["data_offsets"][0]
        shards.append(Shard(fname, header, len(header) + pos, group))
    return shards


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


def _new(nbytes: int, dtype: torch.dtype, shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device=device)


class BufferPool:
    """Buffers reused from tensor to tensor. A fresh buffer costs its first touch of every page (page faults:
    measured 0.3-2 s per GB on the course VM, more than reading it from the page cache) and glibc maps every
    allocation above 32 MB afresh, so a merge that allocated per tensor paid that on most of its bytes. A task
    takes its buffers through a :class:`Lease` and gives them back when its tensor is written; buffers in use and
    free ones together stay under ``limit`` bytes (the plan's memory bound) whenever the tasks' own do, so reuse
    adds nothing to peak memory."""

    def __init__(self, limit: int):
        self.limit, self.free, self.lock = limit, [], threading.Lock()
        self.held = 0  # bytes of the buffers taken and not given back

    def take(self, nbytes: int) -> Tensor:
        with self.lock:
            fits = [i for i, b in enumerate(self.free) if nbytes <= b.numel() <= 2 * nbytes + (1 << 20)]
            buf = self.free.pop(min(fits, key=lambda i: self.free[i].numel())) if fits else None
            if buf is None:
                # room for a new buffer: drop free ones that no task can use before the total passes the limit
                while self.free and self.held + nbytes + sum(b.numel() for b in self.free) > self.limit:
                    self.free.pop(min(range(len(self.free)), key=lambda i: self.free[i].numel()))
            self.held += buf.numel() if buf is not None else max(nbytes, 1)
        return buf if buf is not None else torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def give(self, buffers: Sequence[Tensor]) -> None:
        with self.lock:
            self.free.extend(buffers)
            self.held -= sum(b.numel() for b in buffers)
            while self.free and self.held + sum(b.numel() for b in self.free) > self.limit:
                self.free.pop(min(range(len(self.free)), key=lambda i: self.free[i].numel()))

    def lease(self) -> Lease:
        return Lease(self)


class Lease:
    """The buffers one task took from a :class:`BufferPool`, all given back when the lease closes."""

    def __init__(self, pool: BufferPool):
        self.pool, self.taken = pool, []

    def __call__(self, nbytes: int, dtype: torch.dtype, shape: Sequence[int]) -> Tensor:
        buf = self.pool.take(nbytes)
        self.taken.append(buf)
        return buf[:nbytes].view(dtype).view(tuple(shape))

    def release(self, tensor: Tensor) -> None:
        """Give back early the buffer ``tensor`` was taken in (a read buffer once converted)."""
        for i, buf in enumerate(self.taken):
            if buf.data_ptr() == tensor.data_ptr():
                self.pool.give([self.taken.pop(i)])
                return

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.give(self.taken)
        self.taken = []


def _check_finite(x: Tensor, info: TensorInfo | Path, name: str) -> None:
    if x.numel() and x.is_floating_point():
        lo, hi = torch.aminmax(x)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            where = info.path if isinstance(info, TensorInfo) else info
            raise CheckpointError(f"{where}: tensor {name!r} contains NaN or Inf")


def to_work(raw: Tensor, compute: torch.dtype, alloc: Any = _new) -> Tensor:
    """A stored tensor as a working copy: rounded to the compute dtype (as mergekit casts it on loading), held in
    float32 (float64 for a float64 merge). Reuses ``raw``'s memory when it already is a float32 tensor; else the
    copy goes into ``alloc(nbytes, dtype, shape)``."""
    work = work_dtype(compute)
    if raw.dtype == work:
        return round_(raw, compute)
    out = alloc(raw.numel() * work.itemsize, work, raw.shape).copy_(raw)
    if raw.dtype == compute or is_exact(compute) or raw.dtype.itemsize < compute.itemsize:
        return out  # exact: no rounding needed
    return round_(out, compute)


def _cast(x: Tensor, dtype: torch.dtype, alloc: Any) -> Tensor:
    return x if x.dtype == dtype else alloc(x.numel() * dtype.itemsize, dtype, x.shape).copy_(x)


def merge_task(plan: Plan, task: Task, load: Any, alloc: Any = _new) -> Tensor:
    """The merged tensor of ``task`` in its output dtype, from ``load(info, name) -> stored tensor`` (owned by the
    caller's loader; it may be modified), new tensors from ``alloc(nbytes, dtype, shape)``. Shared by the
    streaming engine (which reuses buffers) and the in-memory path."""
    infos = task.inputs + ([task.base] if task.base is not None else [])
    names = task.input_names + ([task.base_name] if task.base is not None else [])
    if task.compute is None:  # not floating point: copied from the base (or the first input)
        return load(task.base, task.base_name) if task.base is not None else load(task.inputs[0], names[0])
    if plan.op.identity is not None and not task.vocab and plan.op.identity(*resolve_params(
            plan.op, task.name, task.settings, plan.recipe.parameters, task.t, task.input_names,
            task.slice_settings)):  # a copy (passthrough): cast the stored tensor, no float32 working copy
        raw = load(infos[0], names[0])
        out = _cast(_cast(raw, task.compute, alloc), task.out_dtype, alloc)
        if out.dtype.itemsize < raw.dtype.itemsize:
            _check_finite(out, plan.reference.folder, f"{task.name} (cast to {task.out_dtype})")
        return out
    work = []
    for info, name in zip(infos, names):
        raw = load(info, name)
        work.append(to_work(raw, task.compute, alloc))
        if work[-1].data_ptr() != raw.data_ptr() and hasattr(alloc, "release"):
            alloc.release(raw)  # the stored copy is no longer needed: the next read reuses it
        del raw
    if task.vocab:
        assert plan.vocab is not None
        work = plan.vocab.align(work, task.models, task.models[-1] if task.base is not None else
                                plan.recipe.base_model)
    base = work.pop() if task.base is not None else None
    merged = merge_tensor(plan.op, task.name, work, base, task.settings, plan.recipe.parameters, task.t,
                          dtype=task.compute, input_names=task.input_names, slice_settings=task.slice_settings)
    del work, base
    if task.out_dtype != task.compute:  # a cast straight to the compute dtype rounds on the way
        round_(merged, task.compute)
    out = _cast(merged, task.out_dtype, alloc)
    del merged
    if out.numel():
        lo, hi = torch.aminmax(out)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise CheckpointError(f"{plan.reference.folder}: merged tensor {task.name!r} is Inf/NaN in "
                                  f"{task.out_dtype} (overflow)")
    return out


class TaskRunner:
    """Carries out the tasks of one :class:`Plan` into ``partial`` (one instance per :func:`run_shards` call):
    holds the input and output file descriptors, writes each shard's header when the shard is opened, merges and
    writes one tensor per :meth:`run_task` (thread-safe) and renames a shard to its final name when its last tensor
    is written. Public so that tests can inject faults into :meth:`run_task` (a crash mid-merge)."""

    def __init__(self, plan: Plan, partial: Path, device: torch.device, progress: Any):
        self.plan, self.partial, self.device, self.progress = plan, partial, device, progress
        self.pool = BufferPool(plan.memory_bound)
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

    def load(self, info: TensorInfo, name: str, alloc: Any = _new) -> Tensor:
        raw = read_tensor(self.fds[info.path], info, alloc(info.nbytes, info.dtype, info.shape))
        if self.device.type != "cpu":
            raw = raw.to(self.device, non_blocking=False)
        _check_finite(raw, info, name)
        return raw

    def run_task(self, task: Task) -> None:
        shard = self.plan.shards[task.shard]
        with torch.no_grad(), self.pool.lease() as lease:
            alloc = lease if self.device.type == "cpu" else functools.partial(_new, device=self.device)
            out = merge_task(self.plan, task, lambda info, name: self.load(info, name, lease), alloc)
            if out.device.type != "cpu":
                out = out.cpu()
            _write_all(self.out_fds[task.shard], _tensor_bytes(out), task.offset,
                       self.partial / (shard.name + ".tmp"))
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
    folders = list(plan.inputs) + [plan.recipe.tokenizer_folder().resolve()]
    for folder in folders:
        for target in targets:
            if target == folder or target in folder.parents or folder in target.parents:
                raise ValueError(f"{out}: output overlaps the input model {folder}; choose another folder")


def output_config(plan: Plan) -> dict[str, Any] | None:
    """The output's ``config.json``: the reference model's, with the output dtype, the number of layers of a
    sliced merge (and per-layer lists such as ``layer_types`` rebuilt layer by layer) and the vocabulary size of
    an aligned vocabulary. None when the reference has no config."""
    cfg_src = plan.reference.folder / "config.json"
    if not cfg_src.is_file():
        return None
    config = json.loads(cfg_src.read_text())
    out_dtype = plan.recipe.output_dtype()
    if out_dtype is not None:
        name = str(out_dtype).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    if plan.recipe.slices is not None and plan.out_layers is not None:
        before = config.get("num_hidden_layers")
        config["num_hidden_layers"] = plan.out_layers
        models = {n: plan.inputs[plan.recipe.resolve_path(n).resolve()].config
                  for n in dict.fromkeys(m for m, _ in plan.layer_sources)}
        for key, value in list(config.items()):
            if isinstance(value, list) and before and len(value) == before and key != "architectures":
                config[key] = [_layer_value(models[m], key, i, value) for m, i in plan.layer_sources]
    if plan.vocab is not None:
        config["vocab_size"] = plan.vocab.size
    return config


def _layer_value(config: Mapping[str, Any], key: str, layer: int, fallback: list[Any]) -> Any:
    values = config.get(key)
    if isinstance(values, list) and layer < len(values):
        return values[layer]
    return fallback[min(layer, len(fallback) - 1)]


def copy_side_files(plan: Plan, partial: Path) -> None:
    """Write everything but the weights into ``partial``: the output config (:func:`output_config`) and the
    reference's ``generation_config.json``, the tokenizer (the aligned vocabulary's, else the files of the
    recipe's tokenizer source), the recipe with absolute paths (``mergekit_config.yml``) and the model card.

    The last step of a merge, single-process or distributed (chapter 07), once all shards are in place."""
    recipe = plan.recipe
    config = output_config(plan)
    if config is not None:
        write_json_atomic(partial / "config.json", config)
    gen = plan.reference.folder / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, partial / gen.name)
    if plan.vocab is not None and plan.vocab.tokenizer is not None:
        plan.vocab.tokenizer.save_pretrained(str(partial))
    else:
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
          progress: bool = True, compute_dtype: str | None = None) -> Path:
    """Carry ``recipe`` out into the checkpoint folder ``out`` (streaming; see the module docstring).

    ``compute_dtype="float32"`` computes in float32 whatever the recipe's ``dtype`` (which then only sets the
    output dtype): task vectors of fine-tunes are small differences of large weights, which float16 / bfloat16
    resolve to a few bits (a bfloat16 delta of 1e-3 on a weight of 1 keeps 1 significant bit), so a float32
    merge is closer to the exact one; the price is a merge that differs from mergekit's by those roundings."""
    from tqdm.auto import tqdm

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (pass --force to overwrite)")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available")
    plan = plan_merge(recipe, shard_size, compute_dtype)
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
    budget_limit = plan.memory_bound
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

    Tensors in flight are bounded by ``budget_limit`` bytes (default: :attr:`Plan.memory_bound`), which is what
    bounds peak memory; the first error stops queuing, lets running tensors finish, and is raised. Within a shard
    the largest tensors start first, so that small ones fill the other threads while a large one runs. Torch's
    own intra-op threads are set to 1 meanwhile: the merge threads are the parallelism, and thousands of small
    block operations each forking a thread team would wait on one another whenever the machine is busy (measured
    100 s against 7 s for a 1 GB TIES merge on 2 loaded cores). Used by :func:`merge` and by the scale-out
    workers of chapter 07, each writing its own shards."""
    shards = list(shards)
    if not shards:
        return
    limit = budget_limit or plan.memory_bound
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

    intra_op = torch.get_num_threads()
    try:
        runner.open_inputs()
        torch.set_num_threads(1)  # before the pool's threads start: each takes the setting when it first runs an op
        with ThreadPoolExecutor(threads, thread_name_prefix="simmerge") as pool:
            for i in shards:
                try:
                    runner.open_shard(i)
                except BaseException:
                    budget.fail()  # queued tensors are skipped; running ones finish
                    raise
                for task in sorted(plan.shards[i].tasks, key=lambda t: -t.cost):
                    if not budget.acquire(task.cost):
                        break
                    pool.submit(run, task)
                if budget.failed:
                    break
        if errors:
            raise errors[0]
    finally:
        torch.set_num_threads(intra_op)
        runner.close()


class _NullBar:
    def update(self, n: int) -> None:
        pass


def merge_in_memory(recipe: Recipe, compute_dtype: str | None = None) -> dict[str, Tensor]:
    """The recipe's result as a state dict, loading the inputs whole (small models): the same plan and operator
    code as the streaming engine, without its reader and writer."""
    from .checkpoint import load_state_dict

    plan = plan_merge(recipe, "1TB", compute_dtype)
    states = {folder: load_state_dict(folder) for folder in plan.inputs}
    by_path = {info.path: folder for folder, m in plan.inputs.items() for info in m.tensors.values()}

    def load(info: TensorInfo, name: str) -> Tensor:
        x = states[by_path[info.path]][name].clone()
        _check_finite(x, info.path, name)
        return x

    with torch.no_grad():
        return {t.name: merge_task(plan, t, load) for t in plan.tasks}


# --- command line ---------------------------------------------------------------------------------------------
def merge_multi(path: str | os.PathLike[str], out: str | os.PathLike[str], keep_steps: bool = False,
                force: bool = False, resume: bool = False, **engine_kwargs: Any) -> Path:
    """Execute a multi-document recipe with the streaming engine: each document in order, ``@name`` references
    resolved to the earlier outputs, intermediates under ``.OUT.steps/`` (removed unless ``keep_steps``), the last
    document into ``out``. ``resume`` keeps finished intermediate steps of an interrupted run."""
    path, out = Path(path), Path(out)
    docs = read_documents(path)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (pass --force to overwrite)")
    steps_dir = out.parent / f".{out.name}.steps"
    outputs: dict[str, str] = {}
    for i, doc in enumerate(docs, start=1):
        name = doc.pop("name", f"step{i}")
        resolved = resolve_references(doc, outputs)
        recipe = Recipe.from_dict(resolved, root=path.resolve().parent, source=f"{path} (document {i}: {name})")
        last = i == len(docs)
        target = out if last else steps_dir / name
        if not last and resume and target.is_dir() and (target / "config.json").is_file():
            outputs[name] = str(target.resolve())
            continue
        merge(recipe, target, force=force if last else True, resume=resume, **engine_kwargs)
        outputs[name] = str(target.resolve())
    if not keep_steps and steps_dir.exists():
        shutil.rmtree(steps_dir)
    return out


def _cmd_merge(args: argparse.Namespace) -> int:

    if is_multi_document(args.recipe):  # a multi-step plan (chapter 05): one document per step, "@name" references
        out = merge_multi(args.recipe, args.out, force=args.force, resume=args.resume, device=args.device,
                          shard_size=args.shard_size, threads=args.threads, progress=not args.quiet,
                          compute_dtype=args.compute_dtype)
        print(out)
        return 0
    recipe = Recipe.from_yaml(args.recipe)
    out = merge(recipe, args.out, device=args.device, resume=args.resume, force=args.force,
                shard_size=args.shard_size, threads=args.threads, progress=not args.quiet,
                compute_dtype=args.compute_dtype)
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
    p.add_argument("--compute-dtype", choices=["float32"], default=None,
                   help="compute in float32 whatever the recipe's dtype (more accurate; differs from mergekit by "
                        "the recipe dtype's rounding); default: the recipe's dtype, as mergekit")
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
