"""Plans as merges: each step's recipe, the in-memory left fold of a plan (:class:`Merges`, prefixes merged
once) and the multi-document recipe that ``simmerge merge`` executes."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..catalogue import Catalogue
from ..paths import map_model_names
from ..checkpoint import load_state_dict
from ..documents import REF_PREFIX, write_documents
from ..labels import job_recipe
from ..operators import Candidate
from ..recipe import Recipe
from .plans import Plan


def step_recipe(step: int, a: str, b: str, base: str, op: Candidate, seed: int = 0) -> dict[str, Any]:
    """The recipe of step ``step`` (1-based): merge ``a`` (the running model) with ``b``; names as given."""
    recipe = job_recipe(op.method, a, b, base, op.setting, seed)
    return {"name": f"step{step}", **recipe}


class Merges:
    """State dicts of experts (loaded once) and of plan prefixes (merged once, left fold)."""

    def __init__(self, catalogue: Catalogue, seed: int = 0, cache_size: int = 256):
        self.catalogue, self.seed, self.cache_size = catalogue, seed, cache_size
        self._experts: dict[str, dict[str, torch.Tensor]] = {}
        self._prefixes: dict[tuple, dict[str, torch.Tensor]] = {}
        self.merges = 0

    def expert(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._experts:
            self._experts[name] = load_state_dict(self.catalogue.path(name))
        return self._experts[name]

    def layers(self, name: str) -> int | None:
        cfg = self.catalogue.path(name) / "config.json"
        return json.loads(cfg.read_text()).get("num_hidden_layers") if cfg.is_file() else None

    def state(self, plan: Plan) -> dict[str, torch.Tensor]:
        """The merged model of ``plan`` (its left fold), caching every prefix."""
        if plan.k == 1:
            return self.expert(plan.order[0])
        key = (plan.order, plan.ops)
        if key not in self._prefixes:
            prev = self.state(plan.prefix(plan.k - 1))
            base = self.catalogue.base_of(plan.order[0]).name
            recipe = step_recipe(plan.k - 1, "@prev", plan.order[-1], base, plan.ops[-1], self.seed)
            states = {"@prev": prev}

            def lookup(name: str) -> Mapping[str, torch.Tensor]:
                return states[name] if name in states else self.expert(name)  # bases load the same way

            rec = Recipe.from_dict({k: v for k, v in recipe.items() if k != "name"}, source=recipe["name"])
            merged = rec.merge_states(lookup, self.layers(plan.order[0]))
            self.merges += 1
            if len(self._prefixes) >= self.cache_size:
                self._prefixes.pop(next(iter(self._prefixes)))
            self._prefixes[key] = merged
        return self._prefixes[key]


def plan_documents(plan_: Plan, catalogue: Catalogue, seed: int = 0) -> list[dict[str, Any]]:
    """One recipe document per step (absolute model paths; step j > 1 names the previous result ``"@step<j-1>"``)."""
    if plan_.k < 2:
        raise ValueError("a plan of one expert has no merge step")
    base = catalogue.base_of(plan_.order[0]).name
    docs = []
    for j, (op, e) in enumerate(zip(plan_.ops, plan_.order[1:]), start=1):
        a = plan_.order[0] if j == 1 else f"{REF_PREFIX}step{j - 1}"
        doc = step_recipe(j, a, e, base, op, seed)
        docs.append(map_model_names(doc, lambda n: n if n.startswith(REF_PREFIX) else str(catalogue.path(n).resolve())))
    return docs


def write_plan_recipe(plan_: Plan, catalogue: Catalogue, path: str | os.PathLike[str], seed: int = 0,
                      comment: str | None = None) -> Path:
    """Write the plan as a multi-document YAML recipe (atomically); ``simmerge merge`` executes it."""
    return write_documents(plan_documents(plan_, catalogue, seed), path, comment or plan_.describe())
