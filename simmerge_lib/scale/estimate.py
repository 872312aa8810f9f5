"""What a merge of checkpoints of one config costs, from the config alone: the tensor inventory (built on the
``meta`` device) and the :class:`CostEstimate` (bytes read and written, output shards, peak memory, wall time)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..checkpoint import layer_index, tensor_group
from ..engine import parse_size, shard_groups
from ..operators import get_operator
from ..paths import DATA_DIR
from ..recipe import DTYPES

#: The shipped config with the shape of a 111B dense decoder (Cohere-style, grouped-query attention).
DENSE_111B = DATA_DIR / "configs" / "dense-111b" / "config.json"
#: Fixed resident set of a merge process, added to the tensor-dependent part of the memory bound: the interpreter
#: with torch imported plus what the merge kernels add once they have run (code pages, thread pools), whatever the
#: model size, with room for other builds of torch.
OVERHEAD_BYTES = 384 * 2**20
GB = 1e9
MB = 2**20


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model, as the config defines it."""

    name: str
    shape: tuple[int, ...]
    numel: int
    layer: int | None  # decoder layer index, None for embeddings, final norm, head

    @property
    def group(self) -> str:
        """``embed``, ``attn``, ``mlp`` (:func:`~simmerge_lib.checkpoint.tensor_group`) or ``norm`` (the rest)."""
        return tensor_group(self.name) or "norm"


def load_config(config: str | os.PathLike[str] | Mapping[str, Any] | Any) -> Any:
    """A transformers ``PretrainedConfig`` from a config.json path, its folder, a dict, or a config object."""
    from transformers import AutoConfig, PretrainedConfig  # heavy: only planning from a config needs it

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
    from transformers import AutoModelForCausalLM  # heavy: only planning from a config needs it

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
    return [[sizes[i][0] for i in group] for group in shard_groups([n for _, n in sizes], shard_size)]


@dataclass
class CostEstimate:
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
        shard_of = {n: i for i, names in enumerate(self.shards) for n in names}
        isz, osz = _dtype(self.in_dtype).itemsize, _dtype(self.out_dtype).itemsize
        return pd.DataFrame([{
            "name": t.name, "shape": "x".join(map(str, t.shape)), "layer": t.layer, "group": t.group,
            "params": t.numel, "bytes_read": self.n_models * t.numel * isz, "bytes_written": t.numel * osz,
            "shard": shard_of[t.name]} for t in self.tensors])

    def per_layer(self) -> pd.DataFrame:
        """Bytes read and written per decoder layer (embeddings / final norm / head as layer ``other``)."""
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
                     throughput_source: str = "given", overhead_bytes: int = OVERHEAD_BYTES) -> CostEstimate:
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
    return CostEstimate(config=name, n_models=n_models, method=method, in_dtype=str(in_dt).removeprefix("torch."),
                        out_dtype=str(out_dt).removeprefix("torch."), shard_size=parse_size(shard_size),
                        workers=workers, tensors=tensors, shards=shards, gb_per_s=gb_per_s,
                        throughput_source=throughput_source if gb_per_s else "", overhead_bytes=overhead_bytes)
