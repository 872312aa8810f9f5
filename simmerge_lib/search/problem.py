"""The merge problem: two same-base experts in memory and a cost-counting, caching scorer of recipes.

quality(r; n) = mean_{t in T} score_t(merge(r); n) / ref_t(n) over the parents' tasks T, with ref_t(n) the best
parent's own score on t with the same first n eval examples."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

# The module, not its functions: tests replace evaluate.resolve_evaluator to score without decoding.
from .. import evaluate
from ..catalogue import Catalogue
from ..checkpoint import load_state_dict
from ..tasks import SPLIT_SIZES
from .spaces import METHODS, DepthRecipe, DepthSpace, LayerwiseSpace, SearchRecipe


def _mean_quality(normalized: Mapping[str, float]) -> float:
    values = [v for v in normalized.values() if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


class MergeProblem:
    """Two same-base experts of a catalogue, their tensors in memory, and a cost-counting scorer of recipes.

    Costs: ``evaluations`` (models scored) and ``examples`` (examples decoded, summed over tasks); results are
    cached per (recipe, n), so a repeated configuration costs nothing."""

    def __init__(self, catalogue: Catalogue | str | Path, a: str, b: str, tasks: Sequence[str] | None = None,
                 device: str = "cpu") -> None:
        self.catalogue = catalogue if isinstance(catalogue, Catalogue) else Catalogue.load(catalogue)
        ea, eb = self.catalogue.entry(a), self.catalogue.entry(b)
        if ea.role != "expert" or eb.role != "expert":
            raise ValueError(f"search: {a!r} and {b!r} must both be experts of catalogue {self.catalogue.name!r}")
        if ea.base != eb.base:
            raise ValueError(f"search: {a!r} (base {ea.base}) and {b!r} (base {eb.base}) do not share a base")
        self.a, self.b, self.base = a, b, str(ea.base)
        self.tasks = tuple(tasks) if tasks else tuple(t for t in self.catalogue.tasks
                                                     if t in set(ea.tasks) | set(eb.tasks))
        if not self.tasks:
            raise ValueError(f"search: experts {a!r} and {b!r} name no task")
        self.device = device
        self.evaluator = evaluate.resolve_evaluator(self.catalogue.evaluator)
        self.states = {n: load_state_dict(self.catalogue.path(n)) for n in (a, b, self.base)}
        config = json.loads((self.catalogue.path(self.base) / "config.json").read_text())
        self.layer_count = int(config["num_hidden_layers"])
        self._skeletons: dict[int, tuple[Any, Any]] = {}
        self._cache: dict[tuple[str, Any], dict[str, float]] = {}
        self._refs: dict[tuple[str, Any], float] = {}
        self.evaluations = 0
        self.examples = 0
        self.heldout_examples = 0

    def paths(self) -> dict[str, str]:
        """Model name → checkpoint folder (for writing recipes that mergekit or the engine can run)."""
        return {n: str(self.catalogue.path(n)) for n in (self.a, self.b, self.base)}

    def layerwise_space(self, n_groups: int | None = None, methods: Sequence[str] = METHODS) -> LayerwiseSpace:
        return LayerwiseSpace(self.a, self.b, self.base, self.layer_count, n_groups, methods)

    def depth_space(self, extra_layers: int = 1) -> DepthSpace:
        return DepthSpace(self.a, self.b, self.layer_count, extra_layers)

    def skeleton(self, depth: int) -> tuple[Any, Any]:
        """A model of the base's architecture with ``depth`` decoder layers (reused across evaluations)."""
        if depth not in self._skeletons:
            path = self.catalogue.path(self.base)
            config = AutoConfig.from_pretrained(path)
            config.num_hidden_layers = depth
            if getattr(config, "layer_types", None):
                config.layer_types = [config.layer_types[0]] * depth
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(self.device).eval()
            self._skeletons[depth] = (model, AutoTokenizer.from_pretrained(path))
        return self._skeletons[depth]

    def state_dict(self, recipe: SearchRecipe) -> dict[str, Tensor]:
        return recipe.build(self.states) if isinstance(recipe, DepthRecipe) else recipe.merge(self.states)

    def _depth(self, recipe: SearchRecipe) -> int:
        return recipe.depth if isinstance(recipe, DepthRecipe) else self.layer_count

    def _owners(self, task: str) -> list[str]:
        """The parents that serve ``task`` (both when neither does): whose best score normalizes it."""
        return [m for m in (self.a, self.b) if task in self.catalogue.entry(m).tasks] or [self.a, self.b]

    def _score(self, state: Mapping[str, Tensor], depth: int, n: int) -> dict[str, float]:
        model, tok = self.skeleton(depth)
        model.load_state_dict(state, strict=True)
        self.evaluations += 1
        self.examples += n * len(self.tasks)
        scores = self.evaluator(model, tok, list(self.tasks), int(n))
        return {t: float(scores[t]) for t in self.tasks}

    def reference(self, task: str, n: int) -> float:
        """The best parent's own score on ``task`` with ``n`` examples (the normalizer; not counted as cost)."""
        if (task, n) not in self._refs:
            best = 0.0
            for m in self._owners(task):
                model, tok = self.skeleton(self.layer_count)
                model.load_state_dict(self.states[m], strict=True)
                best = max(best, float(self.evaluator(model, tok, [task], int(n))[task]))
            self._refs[(task, n)] = best
        return self._refs[(task, n)]

    def scores(self, recipe: SearchRecipe, n: int) -> dict[str, float]:
        """Raw scores of the merged model on the parent tasks (first ``n`` eval examples each)."""
        key = (recipe.key(), int(n))
        if key not in self._cache:
            self._cache[key] = self._score(self.state_dict(recipe), self._depth(recipe), n)
        return self._cache[key]

    def normalized(self, recipe: SearchRecipe, n: int) -> dict[str, float]:
        """norm_t = score_t / ref_t(n) per parent task (NaN where the reference is 0)."""
        raw = self.scores(recipe, n)
        out = {}
        for t in self.tasks:
            ref = self.reference(t, n)
            out[t] = raw[t] / ref if ref > 0 else math.nan
        return out

    def quality(self, recipe: SearchRecipe, n: int) -> float:
        """Mean normalized score over the parent tasks (the merge quality)."""
        return _mean_quality(self.normalized(recipe, n))

    # --- held-out examples -----------------------------------------------------------------------------------
    def _slice_scores(self, state: Mapping[str, Tensor], depth: int, start: int, stop: int) -> dict[str, float]:
        if self.catalogue.evaluator is not None:
            raise ValueError("held-out scoring reads each example's result: the kit's tasks only (this catalogue "
                             f"names the evaluator {self.catalogue.evaluator!r})")
        model, tok = self.skeleton(depth)
        model.load_state_dict(state, strict=True)
        detail = evaluate.synthetic_detail(model, tok, list(self.tasks), stop)
        self.heldout_examples += (stop - start) * len(self.tasks)
        return {t: float(exact[start:stop].mean()) for t, (exact, _) in detail.items()}

    def _heldout_reference(self, task: str, start: int, stop: int) -> float:
        """The best parent's own score on ``task``'s eval examples [start, stop)."""
        span = f"heldout:{start}:{stop}"
        if (task, span) not in self._refs:
            owners = self._owners(task)
            for m in owners:
                if (f"parent:{m}", span) not in self._cache:
                    self._cache[(f"parent:{m}", span)] = self._slice_scores(self.states[m], self.layer_count,
                                                                           start, stop)
            self._refs[(task, span)] = max(self._cache[(f"parent:{m}", span)][task] for m in owners)
        return self._refs[(task, span)]

    def heldout_normalized(self, recipe: SearchRecipe, start: int, stop: int | None = None) -> dict[str, float]:
        """norm_t on the eval examples [start, stop) of each parent task (default: to the end of the split): examples
        a search that scored the first ``start`` never saw, so a recipe chosen for being best there is not flattered
        by the noise it was chosen on. Normalized by the best parent's own score on the same examples. The kit's
        tasks only (the per-example results are read); not counted as search cost."""
        stop = SPLIT_SIZES["eval"] if stop is None else int(stop)
        if not 0 <= start < stop:
            raise ValueError(f"held-out examples: need 0 <= start < stop, got {start}, {stop}")
        key = (recipe.key(), f"heldout:{start}:{stop}")
        if key not in self._cache:
            self._cache[key] = self._slice_scores(self.state_dict(recipe), self._depth(recipe), start, stop)
        raw = self._cache[key]
        out = {}
        for t in self.tasks:
            ref = self._heldout_reference(t, start, stop)
            out[t] = raw[t] / ref if ref > 0 else math.nan
        return out

    def heldout_quality(self, recipe: SearchRecipe, start: int, stop: int | None = None) -> float:
        """Merge quality on the held-out examples (:meth:`heldout_normalized`)."""
        return _mean_quality(self.heldout_normalized(recipe, start, stop))
