"""Where the kit reads and writes: everything a run produces lives under ``build/``."""

from __future__ import annotations

import os
from pathlib import Path

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
