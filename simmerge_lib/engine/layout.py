"""Planning a merge: every input header read and checked, every output tensor a :class:`TensorJob`, laid out in
shards (:class:`ShardLayout`) before any tensor data is read."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, layer_index, weight_files
from ..operators import Operator, infer_layer_count, layer_t, with_layer, work_dtype
from ..operators import compute_dtype as promoted_dtype
from ..recipe import DTYPES, ModelSpec, Recipe, RecipeError, SliceInputs
from ..vocab import VocabPlan, is_vocab_tensor, plan_vocab
from .files import DTYPE_NAMES, TensorInfo, header_bytes, read_header, shard_groups

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
class TensorJob:
    """One tensor write of the engine (one output tensor): where its inputs are, how they are merged, where it goes."""

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
    jobs: list[TensorJob] = field(default_factory=list)


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


@dataclass
class ShardLayout:
    """Everything decided before merging: inputs, tensor jobs, shards, and a fingerprint for resuming."""

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
    def jobs(self) -> list[TensorJob]:
        return [j for s in self.shards for j in s.jobs]

    @property
    def memory_bound(self) -> int:
        """Bytes the tensors in flight may take: (inputs + 2) x the largest tensor's working size. Each tensor's
        own estimate (:attr:`TensorJob.cost`) is below its share of it, which lets small tensors merge beside the
        largest one."""
        return max((j.bound for j in self.jobs), default=1)


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
               ) -> ShardLayout:
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
    jobs = [_job(spec, models, recipe, op, override, vocab) for spec in specs]
    # Read in file order: sequential I/O on the first input, and shards fill in the order tensors complete.
    first = [(j.inputs or [j.base])[0] for j in jobs]
    order = sorted(range(len(jobs)), key=lambda i: (str(first[i].path), first[i].offset))
    shards = _lay_out([jobs[i] for i in order], shard_size)
    return ShardLayout(recipe, op, inputs, reference, layer_count, shards,
                       _fingerprint(recipe, override, inputs, shards), out_layers, layer_sources, vocab, override)


def _fingerprint(recipe: Recipe, override: torch.dtype | None, inputs: Mapping[Path, InputModel],
                 shards: Sequence[Shard]) -> str:
    """What resuming compares: the recipe (paths resolved), the compute override, every input file's size and
    mtime, and the output shards' names and headers."""
    fp = hashlib.sha256()
    fp.update(json.dumps(recipe.with_paths_resolved().to_dict(), sort_keys=True, default=str).encode())
    fp.update(str(override).encode())
    for path in sorted({t.path for m in inputs.values() for t in m.tensors.values()}):
        st = path.stat()
        fp.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    for s in shards:
        fp.update(s.name.encode() + s.header)
    return fp.hexdigest()


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


def _members(sl: SliceInputs) -> list[ModelSpec]:
    return sl.inputs + ([sl.base] if sl.base is not None else [])


def _check_layer_ranges(src: str, slices: Sequence[SliceInputs], models: Mapping[str, InputModel]) -> None:
    for i, sl in enumerate(slices):
        for m in _members(sl):
            n = models[m.model].layer_count()
            lo, hi = m.layer_range or (0, 0)
            if hi > n:
                raise RecipeError(f"{src}: slices[{i}]: layer_range [{lo}, {hi}) of {m.model} goes past its {n} "
                                  f"layers")


def _outside_specs(sl: SliceInputs, models: Mapping[str, InputModel], pre: bool) -> list[_Spec]:
    """The slice's tensors outside the decoder layers, before them (``pre``) or after, at ``t = 0``."""
    lead = _members(sl)[0]
    names = [n for n in models[lead.model].tensors if layer_index(n) is None and _is_pre_layer(n) == pre]
    for n in names:
        for m in _members(sl):
            if n not in models[m.model].tensors:
                raise CheckpointError(f"{models[m.model].folder}: tensor {n!r} is missing")
    return [_Spec(n, [(m.model, n) for m in sl.inputs], (sl.base.model, n) if sl.base else None,
                  [dict(m.parameters) for m in sl.inputs], dict(sl.parameters), 0.0) for n in names]


def _layer_specs(sl: SliceInputs, i: int, k: int, out_layer: int, models: Mapping[str, InputModel]
                 ) -> list[_Spec]:
    """Output layer ``out_layer``: layer ``layer_range[0] + k`` of every member of slice ``i``."""
    t = k / (sl.length - 1) if sl.length > 1 else 1.0
    layer_names = {}
    for m in _members(sl):
        layer = (m.layer_range or (0, 0))[0] + k
        found = {with_layer(n, 0): n for n in models[m.model].tensors if layer_index(n) == layer}
        if not found:
            raise CheckpointError(f"{models[m.model].folder}: no tensors of layer {layer} (slices[{i}])")
        layer_names[m.model] = found
    lead = _members(sl)[0]
    for m in _members(sl)[1:]:
        if set(layer_names[m.model]) != set(layer_names[lead.model]):
            raise CheckpointError(f"{models[m.model].folder}: layer {(m.layer_range or (0, 0))[0] + k} "
                                  f"holds other tensors than layer {(lead.layer_range or (0, 0))[0] + k} "
                                  f"of {models[lead.model].folder} (slices[{i}])")
    return [_Spec(with_layer(key, out_layer), [(m.model, layer_names[m.model][key]) for m in sl.inputs],
                  (sl.base.model, layer_names[sl.base.model][key]) if sl.base else None,
                  [dict(m.parameters) for m in sl.inputs], dict(sl.parameters), t)
            for key in layer_names[lead.model]]


def _specs_from_slices(recipe: Recipe, models: Mapping[str, InputModel]
                       ) -> tuple[list[_Spec], int | None, int, list[tuple[str, int]]]:
    """A ``slices`` recipe: output layers are the slices' layers in order, renumbered from 0; each output layer
    merges layer ``layer_range[0] + i`` of every source of its slice, with gradients over the slice
    (``t = i / (length - 1)``, 1 for a one-layer slice). Tensors outside the layers come from the first slice's
    sources (embeddings) and the last slice's (final norm, head), at ``t = 0``."""
    slices = recipe.slice_inputs()
    _check_layer_ranges(recipe.source, slices, models)
    specs = _outside_specs(slices[0], models, pre=True)
    layer_sources: list[tuple[str, int]] = []
    out_layer = 0
    for i, sl in enumerate(slices):
        for k in range(sl.length):
            specs += _layer_specs(sl, i, k, out_layer, models)
            lead = _members(sl)[0]
            layer_sources.append((lead.model, (lead.layer_range or (0, 0))[0] + k))
            out_layer += 1
    specs += _outside_specs(slices[-1], models, pre=False)
    return specs, out_layer, out_layer, layer_sources


def _job(spec: _Spec, models: Mapping[str, InputModel], recipe: Recipe, op: Operator,
         override: torch.dtype | None, vocab: VocabPlan | None) -> TensorJob:
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
    return TensorJob(name=spec.name, inputs=inputs, base=base, settings=spec.settings, out_dtype=out_dtype,
                     shape=shape, shard=-1, offset=0, nbytes=numel * out_dtype.itemsize, cost=cost, compute=compute,
                     input_names=[n for _, n in spec.inputs], slice_settings=spec.slice_settings, t=spec.t,
                     base_name=spec.base[1] if spec.base is not None else None, bound=bound,
                     models=[m for m, _ in spec.inputs] + ([spec.base[0]] if spec.base else []), vocab=aligned)


def _lay_out(jobs: list[TensorJob], shard_size: str | int) -> list[Shard]:
    """Greedy shards in job order (:func:`~.files.shard_groups`); each job gets its shard and absolute offset."""
    groups = [[jobs[i] for i in g] for g in shard_groups([j.nbytes for j in jobs], shard_size)]
    shards = []
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        entries, pos = {}, 0
        for job in group:
            entries[job.name] = {"dtype": DTYPE_NAMES[job.out_dtype], "shape": list(job.shape),
                                 "data_offsets": [pos, pos + job.nbytes]}
            pos += job.nbytes
        header = header_bytes(entries)
        for job in group:
            job.shard, job.offset = i, len(header) + entries[job.name]["data_offsets"][0]
        shards.append(Shard(fname, header, len(header) + pos, group))
    return shards
