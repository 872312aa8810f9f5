"""Full-width stand-in checkpoints for a rehearsal: the config's real tensor names and shapes, random weights."""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..checkpoint import INDEX_FILE, write_json_atomic
from ..engine import parse_size
from ..recipe import Recipe
from .estimate import DENSE_111B, TensorSpec, _dtype, load_config, shard_layout, tensor_inventory


def synthesize_checkpoints(root: str | os.PathLike[str], config: Any = DENSE_111B,
                           layers: Sequence[int] | None = (0,),
                           include: str | None = None, n_experts: int = 2, dtype: str = "bfloat16",
                           shard_size: str | int = "1GB", noise: float = 0.1, seed: int = 0,
                           progress: bool = True) -> dict[str, Path]:
    """Sharded checkpoints ``root/base``, ``root/e0`` … with the config's real tensor names and full shapes for
    the decoder ``layers`` given (every tensor when ``layers`` is None; only tensors whose name matches the
    regex ``include``, when given).

    Weights: base ~ N(0, 0.02^2) (plus 1 for norms); expert i = base + tau_i with tau_i ~ N(0, (noise * 0.02)^2),
    seeded per (seed, tensor, model). Each folder holds the real config.json, a safetensors index and
    ``rehearsal.json`` (which tensors were kept). Existing folders made with the same arguments are reused.
    """
    root = Path(root)
    cfg = load_config(config)
    tensors = _chosen_tensors(cfg, layers, include)
    dt = _dtype(dtype)
    names = ["base"] + [f"e{i}" for i in range(n_experts)]
    folders = {n: root / n for n in names}
    spec = {"layers": None if layers is None else list(layers), "include": include, "n_experts": n_experts,
            "dtype": dtype, "shard_size": parse_size(shard_size), "noise": noise, "seed": seed,
            "tensors": {t.name: list(t.shape) for t in tensors}}
    stamp = root / "rehearsal.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec and all(f.is_dir() for f in folders.values()):
        return folders
    if root.exists():
        shutil.rmtree(root)
    config_dict = cfg.to_dict()
    config_dict["dtype"] = dtype
    for folder in folders.values():
        folder.mkdir(parents=True)
        write_json_atomic(folder / "config.json", config_dict)
    groups = shard_layout([(t.name, t.numel * dt.itemsize) for t in tensors], shard_size)
    by_name = {t.name: t for t in tensors}
    bar = tqdm(total=sum(t.numel for t in tensors) * dt.itemsize * len(names), unit="B", unit_scale=True,
               desc="synthesize", disable=not progress)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = _shard_weights([by_name[n] for n in group], n_experts, dt, noise, seed)
        for n, folder in folders.items():
            save_file(shard[n], str(folder / fname), {"format": "pt"})
            bar.update(sum(x.numel() for x in shard[n].values()) * dt.itemsize)
        weight_map.update((tname, fname) for tname in group)
        del shard
    bar.close()
    total = sum(t.numel for t in tensors) * dt.itemsize
    for folder in folders.values():
        write_json_atomic(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        write_json_atomic(folder / "rehearsal.json", spec)
    write_json_atomic(stamp, spec)
    return folders


def _chosen_tensors(cfg: Any, layers: Sequence[int] | None, include: str | None) -> list[TensorSpec]:
    keep = re.compile(include) if include else None
    chosen = None if layers is None else set(layers)
    tensors = [t for t in tensor_inventory(cfg)
               if (chosen is None or t.layer in chosen) and (keep is None or keep.search(t.name))]
    if not tensors:
        raise ValueError(f"no tensor of the config in layers {layers}"
                         + (f" matching {include!r}" if include else ""))
    return tensors


def _shard_weights(tensors: Sequence[TensorSpec], n_experts: int, dt: torch.dtype, noise: float, seed: int
                   ) -> dict[str, dict[str, torch.Tensor]]:
    """One shard's tensors for every model (``base``, ``e0`` …), each tensor from its own seeded generator."""
    shard: dict[str, dict[str, torch.Tensor]] = {"base": {}, **{f"e{j}": {} for j in range(n_experts)}}
    for t in tensors:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib_crc(t.name))
        base = torch.randn(t.shape, generator=gen).mul_(0.02)
        if t.group == "norm":
            base.add_(1.0)
        shard["base"][t.name] = base.to(dt)
        for j in range(n_experts):
            tau = torch.randn(t.shape, generator=gen).mul_(0.02 * noise)
            shard[f"e{j}"][t.name] = tau.add_(base).to(dt)
            del tau
        del base
    return shard


def zlib_crc(text: str) -> int:
    """CRC-32 of a tensor name: its part of the seed."""
    return zlib.crc32(text.encode())


def ties_recipe(folders: Mapping[str, Path], density: float = 0.2, dtype: str = "bfloat16") -> Recipe:
    """A TIES recipe over a synthesized set: base + every expert, equal weights, the given density."""
    experts = [str(p) for n, p in folders.items() if n != "base"]
    return Recipe.from_dict({"merge_method": "ties", "base_model": str(folders["base"]),
                             "models": [{"model": e, "parameters": {"weight": 1.0, "density": density}}
                                        for e in experts],
                             "parameters": {"lambda": 1.0}, "dtype": dtype})
