"""The catalogue file: which checkpoints exist, which base each expert comes from, and which tasks it serves.

``catalogue.json`` sits in a folder; model paths are relative to that folder (or absolute, for a user's own
checkpoints). Schema::

    {
      "name": "default",
      "tasks": ["reverse", "sort", ...],
      "evaluator": null,                  # or "package.module:function" for a user's own tasks (see evaluate.py)
      "recipe": {...}, "recipe_hash": "…", # how the kit built it (absent for user catalogues)
      "build": {"seconds": 212.3, "workers": 2, "resumed": false},   # the kit's last build (absent otherwise)
      "models": [
        {"name": "base0", "path": "base0", "role": "base", "base": null, "tasks": [], "recipe": {}, "scores": {}},
        {"name": "base0-reverse", "path": "experts/base0-reverse", "role": "expert", "base": "base0",
         "tasks": ["reverse"], "recipe": {...}, "scores": {"reverse": 0.98, ...}}
      ]
    }
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import pandas as pd

from .checkpoint import write_json_atomic
from .paths import map_model_names

CATALOGUE_FILE = "catalogue.json"
PairKind = Literal["same_base", "cross_base", "all"]
_Key = TypeVar("_Key", str, pd.Series)


def pair_key(a: _Key, b: _Key) -> _Key:
    """The key of a pair of experts, ``"a|b"`` (element-wise for two Series of names); tables write a pair in
    catalogue order, so one pair has one key."""
    return a + "|" + b


@dataclass
class ModelEntry:
    """One checkpoint of the catalogue."""

    name: str
    path: str
    role: Literal["base", "expert"]
    base: str | None = None
    tasks: list[str] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class Catalogue:
    """A set of bases and experts; see the module docstring for the file format."""

    root: Path
    name: str
    tasks: list[str]
    models: list[ModelEntry]
    evaluator: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    recipe_hash: str | None = None
    #: How the kit built it: wall seconds, workers, and whether finished checkpoints were reused (absent otherwise).
    build: dict[str, Any] = field(default_factory=dict)

    # --- loading and saving ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Catalogue:
        """Load ``catalogue.json`` (or the folder holding it), checking that every entry is consistent."""
        path = Path(path)
        file = path / CATALOGUE_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no catalogue file (build one with `simmerge zoo build`)")
        try:
            raw = json.loads(file.read_text())
            models = [ModelEntry(**m) for m in raw["models"]]
            catalogue = cls(root=file.parent, name=raw.get("name", file.parent.name), tasks=list(raw["tasks"]),
                            models=models, evaluator=raw.get("evaluator"), recipe=raw.get("recipe", {}),
                            recipe_hash=raw.get("recipe_hash"), build=raw.get("build", {}))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{file}: not a valid catalogue ({type(exc).__name__}: {exc})") from None
        catalogue.validate(file)
        return catalogue

    def validate(self, file: Path | None = None) -> None:
        where = file or self.root / CATALOGUE_FILE
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: model names repeat")
        for m in self.models:
            if m.role not in ("base", "expert"):
                raise ValueError(f"{where}: model {m.name!r} has role {m.role!r}; expected 'base' or 'expert'")
            if m.role == "expert":
                if m.base not in names or self.entry(m.base).role != "base":
                    raise ValueError(f"{where}: expert {m.name!r} names base {m.base!r}, which is not a base here")
                unknown = set(m.tasks) - set(self.tasks)
                if not m.tasks or unknown:
                    raise ValueError(f"{where}: expert {m.name!r} has tasks {m.tasks}; the catalogue's are {self.tasks}")

    def save(self) -> Path:
        data = {"name": self.name, "tasks": self.tasks, "evaluator": self.evaluator, "recipe": self.recipe,
                "recipe_hash": self.recipe_hash, "models": [asdict(m) for m in self.models]}
        if self.build:
            data["build"] = self.build
        file = self.root / CATALOGUE_FILE
        write_json_atomic(file, data)
        return file

    # --- queries -----------------------------------------------------------------------------------------------
    def entry(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"no model {name!r} in catalogue {self.name!r}")

    def path(self, name: str) -> Path:
        """Absolute folder of a model."""
        p = Path(self.entry(name).path)
        return p if p.is_absolute() else self.root / p

    def with_paths(self, recipe: Mapping[str, Any], absolute: bool = False) -> dict[str, Any]:
        """``recipe`` with its model names replaced by their folders (as written in the catalogue, i.e. relative
        to :attr:`root` for the kit's own models, or absolute with ``absolute``); see :func:`map_model_names`."""
        return map_model_names(recipe, (lambda n: str(self.path(n))) if absolute else (lambda n: self.entry(n).path))

    def bases(self) -> list[ModelEntry]:
        return [m for m in self.models if m.role == "base"]

    def experts(self, base: str | None = None) -> list[ModelEntry]:
        return [m for m in self.models if m.role == "expert" and (base is None or m.base == base)]

    def base_of(self, expert: str) -> ModelEntry:
        base = self.entry(expert).base
        if base is None:
            raise ValueError(f"{expert!r} is a base, not an expert")
        return self.entry(base)

    def pairs(self, kind: PairKind = "same_base", ordered: bool = False,
              distinct_tasks: bool = True) -> list[tuple[str, str]]:
        """Pairs of experts: sharing a base, across bases, or all; unordered (a < b in catalogue order) by default.

        ``distinct_tasks`` drops pairs whose experts serve the same task set (merging two experts of one task is
        a different question from combining skills)."""
        experts = self.experts()
        combos = itertools.permutations(experts, 2) if ordered else itertools.combinations(experts, 2)
        out = []
        for a, b in combos:
            same = a.base == b.base
            if (kind == "same_base" and not same) or (kind == "cross_base" and same):
                continue
            if distinct_tasks and set(a.tasks) == set(b.tasks):
                continue
            out.append((a.name, b.name))
        return out

    def scores_frame(self) -> pd.DataFrame:
        """One row per model × task with the recorded eval score (tidy)."""
        rows = [{"model": m.name, "role": m.role, "base": m.base or m.name, "expert_task": ",".join(m.tasks),
                 "task": t, "score": s} for m in self.models for t, s in m.scores.items()]
        return pd.DataFrame(rows)
