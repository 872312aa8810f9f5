"""Reading and writing Hugging Face checkpoint folders (config, safetensors shards + index, tokenizer, card).

Inputs are read-only to the kit: files are only ever opened for reading. Outputs are written atomically: into
``OUT.partial`` first, renamed to ``OUT`` when complete, so nothing half-written ever looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CARD_FILE = "simmerge_card.json"


#: A decoder layer inside a tensor name: ``model.layers.3.``, ``transformer.h.3.``, ``blocks.3.`` (group 1: the index).
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Decoder layer of a tensor name (``model.layers.3.mlp.up_proj.weight`` -> 3); None outside the layers."""
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


def tensor_group(name: str) -> str | None:
    """The group of a tensor name: ``attn``, ``mlp``, ``embed`` (embeddings and output head) or None (norms...)."""
    low = name.lower()
    if "embed" in low or "lm_head" in low or low.startswith(("wte", "wpe")) or ".wte." in low or ".wpe." in low:
        return "embed"
    if "attn" in low or "attention" in low:
        return "attn"
    if "mlp" in low or "feed_forward" in low or "ffn" in low or "experts" in low:
        return "mlp"
    return None


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used; the message names the file and the problem."""


def weight_files(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Map every tensor name of a checkpoint to the safetensors file that holds it.

    Reads ``model.safetensors.index.json`` when present (refusing any shard outside the folder), else the single
    ``model.safetensors``. Nothing but the index and the shards' headers is read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (does not exist or is not a directory)")
    index_path = folder / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc})") from None
        root = folder.resolve()
        files: dict[str, Path] = {}
        for name, shard in weight_map.items():
            path = (folder / shard).resolve()
            if root not in path.parents:
                raise CheckpointError(f"{index_path}: shard {shard!r} lies outside the checkpoint folder; refused")
            if not path.is_file():
                raise CheckpointError(f"{index_path}: shard {shard!r} named for {name!r} is missing")
            files[name] = path
        return files
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{folder}: no {SINGLE_FILE} and no {INDEX_FILE}")
    with _open(single) as handle:
        return {name: single for name in handle.keys()}


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Any]:
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt headers
        raise CheckpointError(f"{path}: cannot read safetensors header ({exc})") from None
    with handle as opened:
        yield opened


def iter_tensors(folder: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one tensor at a time, shard by shard (memory: one tensor)."""
    by_file: dict[Path, list[str]] = {}
    for name, path in weight_files(folder).items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with _open(path) as handle:
            for name in names:
                try:
                    yield name, handle.get_tensor(name)
                except Exception as exc:
                    raise CheckpointError(f"{path}: cannot read tensor {name!r} ({exc})") from None


def load_state_dict(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint in memory (small models only)."""
    return dict(iter_tensors(folder))


def read_card(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The kit's model card (base, task, recipe, scores) of a catalogue checkpoint; ``{}`` if it has none."""
    path = Path(folder) / CARD_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield ``OUT.partial`` to write into; on success it replaces ``OUT``. On error the partial folder stays
    (for resuming) and ``OUT`` is untouched. An existing ``OUT`` is an error unless ``force``."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (pass force=True / --force to overwrite)")
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    yield partial
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own "Loading weights" / "Writing model shards" bars inside the block: the kit draws
    one bar per long step, and dozens of tiny checkpoints would otherwise print a bar each."""
    from transformers.utils import logging as hf_logging  # heavy: kept off the start of `simmerge merge`

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def save_pretrained_atomic(model: Any, tokenizer: Any, out: str | os.PathLike[str], card: dict[str, Any],
                           max_shard_size: str = "5GB", force: bool = False) -> Path:
    """Save a transformers model + tokenizer + kit card as a checkpoint folder, atomically."""
    stale = Path(out).with_name(Path(out).name + ".partial")
    if stale.exists():  # a model save is cheap to redo: never mix files of two attempts
        shutil.rmtree(stale)
    with atomic_folder(out, force=force) as partial, quiet_transformers():
        model.save_pretrained(partial, max_shard_size=max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        write_json_atomic(partial / CARD_FILE, card)
    return Path(out)
