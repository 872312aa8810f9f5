"""Where the kit reads and writes: everything a run produces lives under ``build/``."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: Repository root when the kit is installed editable; otherwise the current directory.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = PROJECT_ROOT / "data"


def build_dir() -> Path:
    """Root of all outputs: ``$SIMMERGE_BUILD`` if set, else ``<project>/build``."""
    root = os.environ.get("SIMMERGE_BUILD")
    path = Path(root) if root else PROJECT_ROOT / "build"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_path(*parts: str) -> Path:
    """A path under ``build/`` whose parent folder exists."""
    path = build_dir().joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def map_model_names(recipe: Mapping[str, Any], to: Callable[[str], str]) -> dict[str, Any]:
    """A mergekit recipe (``models`` or ``slices`` form) with every model reference ``name`` replaced by
    ``to(name)``: ``base_model``, ``tokenizer_source`` (unless it is one of mergekit's keywords ``base`` and
    ``union``), each entry of ``models`` (a mapping's ``model`` or a bare name) and each slice source's ``model``.

    The one "replace model names with paths" of the kit (here, at the bottom of the layers, so that the merge
    path reaches it without importing the catalogue's table libraries)."""
    out = dict(recipe)
    if isinstance(out.get("base_model"), str):
        out["base_model"] = to(out["base_model"])
    if isinstance(out.get("tokenizer_source"), str) and out["tokenizer_source"] not in ("base", "union"):
        out["tokenizer_source"] = to(out["tokenizer_source"])
    if "models" in out:
        out["models"] = [{**m, "model": to(m["model"])} if isinstance(m, Mapping) else to(m) for m in out["models"]]
    if "slices" in out:
        out["slices"] = [{**s, "sources": [{**src, "model": to(src["model"])} for src in s["sources"]]}
                         for s in out["slices"]]
    return out
