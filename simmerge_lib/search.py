"""Chapter 08 — automated merge search: search spaces of fine-grained recipes, Optuna optimizers with multi-fidelity
evaluation, and a surrogate benchmark that makes comparing search algorithms cheap.

**Problem.** Two experts a, b of one base (:class:`MergeProblem`). A candidate recipe r is merged in memory and scored
on the parents' tasks T = tasks(a) ∪ tasks(b) with the first n examples of each task's ``eval`` split:

    norm_t(r; n) = score_t(merge(r); n) / ref_t(n),       quality(r; n) = mean_{t in T} norm_t(r; n)

where ref_t(n) is the best parent's own score on t with the same n (the *merge quality* of the labels chapter).

**Search space 1 — layer-wise fusion** (:class:`LayerwiseSpace`). Tensors are split into groups: ``outer``
(embeddings, final norm, head) and G contiguous blocks of decoder layers. Each group g picks an operator o_g and its
parameters from one fixed-dimensional vector (so that every sampler, NSGA-II's crossover included, sees the same
space): mix_g in [0, 1] (a's share: linear weights (mix, 1 - mix), SLERP t = 1 - mix, task-vector weights
(2 mix, 2 (1 - mix))), lambda_g in [0.3, 1.5] and density_g in [0.1, 1]; parameters an operator does not use are
ignored. A sample is a :class:`LayerwiseRecipe`: one mergekit recipe per group (each a valid :class:`~.recipe.Recipe`
the engine runs), and the merged model takes each group's tensors from its group's recipe.

**Search space 2 — depth-level integration** (:class:`DepthSpace`). A new layer stack of depth D (from L - 1 to
L + ``extra_layers`` for L-layer inputs): position j copies decoder layer l_j of model s_j in {a, b}, in any order,
with its residual-branch outputs (``o_proj``, ``down_proj``) scaled by c_j in [0.5, 1.5]; embeddings, final norm and
head come from one model. A sample is a :class:`DepthRecipe`, written as mergekit's ``passthrough`` recipe with
``slices`` (one single-layer slice per position, ``scale`` filtered to o_proj / down_proj). The kit's
:mod:`~.recipe` and :mod:`~.engine` do not implement ``slices``, so this module builds the stack itself
(:meth:`DepthRecipe.build`) and reads the same YAML back (:meth:`DepthRecipe.from_dict`).

**Optimizers** (:func:`run_search`, Optuna): TPE (one objective: quality), NSGA-II (one objective per parent task:
the Pareto front of task trade-offs), random search as the control. *Multi-fidelity*: a trial is scored on n_1 < n_2
< … examples per task (nested prefixes of the eval split) and reports quality(r; n_k) after each rung; a
successive-halving or Hyperband pruner stops trials that rank in the bottom of their rung, so a pruned trial costs
sum_{k<=stop} n_k |T| decoded examples instead of sum_k n_k |T|.

**Surrogate benchmark** (:func:`collect_samples`, :func:`fit_surrogate`, :func:`surrogate_quality`): a random
forest maps the encoded configuration x(r) to (quality, norm_t for t in T). Its quality is measured on held-out
*groups* (:func:`group_split`: the group of a sample is its pair and its canonical recipe, so a configuration sampled
twice never sits on both sides), as R² and Kendall's τ of predicted vs measured quality. Optimizers then run against
the surrogate (:class:`Surrogate` as the objective: milliseconds per trial) at equal budget, and the best configuration
of each is merged and scored for real. Baselines: the SimMerge predictor's choice for the pair (:func:`simmerge_choice`;
it also warm-starts the search) and the best fixed operator of the labels table (:func:`best_fixed_choice`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch
from torch import Tensor

from .catalogue import Catalogue
from .operators import get_operator, layer_index, merge_state_dicts, param_range
from .recipe import Recipe

#: Operators a layer-wise group uses by default (the labels chapter's grid operators). Any registered task-vector
#: operator with a per-model ``weight`` and a global ``lambda`` can be named too (breadcrumbs, della, ...).
METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties")
#: Ranges of the continuous parameters of a group: the registry's (a linear weight, TIES's lambda and density),
#: and the depth scale of a stacked slice.
MIX_RANGE, LAMBDA_RANGE, DENSITY_RANGE = (param_range("linear", "weight"), param_range("ties", "lambda"),
                                          param_range("ties", "density"))
SCALE_RANGE = (0.5, 1.5)
#: Tensors scaled by a depth slice's ``scale``: the outputs of the residual branches.
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")
SAMPLERS = ("random", "tpe", "nsga2", "qmc")
_LAYER_PREFIX = "model.layers."

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ============================================================================================ layer-wise fusion
@dataclass(frozen=True)
class GroupSetting:
    """One group's operator and parameters (unused ones are ignored by that operator)."""

    method: str
    mix: float = 0.5
    lam: float = 1.0
    density: float = 0.5

    def recipe(self, a: str, b: str, base: str, seed: int = 0) -> dict[str, Any]:
        """The mergekit recipe (model names) this setting means for experts a, b of ``base``."""
        m, lam, dens = float(self.mix), float(self.lam), float(self.density)
        if self.method == "linear":
            return {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": m}},
                                                        {"model": b, "parameters": {"weight": 1.0 - m}}],
                    "dtype": "float32"}
        if self.method == "slerp":
            return {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                    "parameters": {"t": 1.0 - m}, "dtype": "float32"}
        op = get_operator(self.method)
        if not (op.needs_base and "weight" in op.model_params and "lambda" in op.global_params):
            raise ValueError(f"layer-wise search: unsupported operator {self.method!r} (one of {METHODS}, or a "
                             f"task-vector operator with weight and lambda)")
        wa, wb = 2.0 * m, 2.0 * (1.0 - m)
        pa: dict[str, Any] = {"weight": wa}
        pb: dict[str, Any] = {"weight": wb}
        glob: dict[str, Any] = {"lambda": lam}
        if "density" in op.model_params:
            pa["density"], pb["density"] = dens, dens
        if "seed" in op.global_params:
            glob["seed"] = int(seed)
        return {"merge_method": self.method, "base_model": base,
                "models": [{"model": a, "parameters": pa}, {"model": b, "parameters": pb}],
                "parameters": glob, "dtype": "float32"}


    def coefficients(self) -> tuple[float, float]:
        """How much of each task vector the group's merge adds to the base, (c_a, c_b): theta ≈ theta_0 +
        c_a tau_a + c_b tau_b before trimming / dropping (linear and SLERP: the mix; task-vector operators: lambda
        times the weights (2 mix, 2 (1 - mix)), divided by their sum when the operator normalizes). A surrogate
        input: the scale of the merged task vector explains more of a recipe's quality than any raw parameter."""
        m = float(self.mix)
        if self.method in ("linear", "slerp"):
            return m, 1.0 - m
        normalize = bool(get_operator(self.method).global_params.get("normalize") or False)
        scale = float(self.lam) / (2.0 if normalize else 1.0)
        return 2.0 * m * scale, 2.0 * (1.0 - m) * scale

    def kept(self) -> float:
        """The share of each task vector's entries the operator keeps (its density when it trims or drops)."""
        traits = get_operator(self.method).traits
        return float(self.density) if {"trim", "drop"} & set(traits) else 1.0


def setting_from_grid(method: str, parameters: Mapping[str, Any]) -> GroupSetting:
    """The :class:`GroupSetting` equal to a labels-grid point (``labels.job_recipe``'s reading of a setting)."""
    p = dict(parameters)
    if method == "linear":
        return GroupSetting("linear", mix=float(p.get("weight", 0.5)))
    if method == "slerp":
        return GroupSetting("slerp", mix=1.0 - float(p.get("t", 0.5)))
    # labels give both experts the weight 1 (mix 0.5); a setting naming a's weight w keeps the ratio w : 1 - w
    mix = float(p.get("weight", 0.5))
    return GroupSetting(method, mix=mix, lam=float(p.get("lambda", 1.0)), density=float(p.get("density", 1.0)))


@dataclass(frozen=True)
class LayerwiseRecipe:
    """Per tensor group (``outer`` + blocks of decoder layers), one operator with its parameters.

    ``blocks[k]`` lists the decoder layers of block k; ``settings[0]`` is the ``outer`` group (embeddings, final
    norm, head) and ``settings[k + 1]`` block k's."""

    a: str
    b: str
    base: str
    blocks: tuple[tuple[int, ...], ...]
    settings: tuple[GroupSetting, ...]
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.settings) != len(self.blocks) + 1:
            raise ValueError(f"layer-wise recipe: {len(self.settings)} settings for {len(self.blocks)} blocks + outer")

    @property
    def layer_count(self) -> int:
        return sum(len(b) for b in self.blocks)

    def group_of(self, name: str) -> int:
        """0 for tensors outside the decoder layers, k + 1 for block k."""
        idx = layer_index(name)
        if idx is None:
            return 0
        for k, block in enumerate(self.blocks):
            if idx in block:
                return k + 1
        raise ValueError(f"layer-wise recipe: tensor {name!r} is in layer {idx}, outside the recipe's blocks")

    def group_recipes(self) -> list[Recipe]:
        """One validated :class:`Recipe` per group (outer first)."""
        return [Recipe.from_dict(s.recipe(self.a, self.b, self.base, self.seed), source=f"group {g}")
                for g, s in enumerate(self.settings)]

    def to_dict(self, paths: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Serializable form: per group its tensors (``layers`` list, or ``outer``) and its mergekit recipe."""
        def fix(r: dict[str, Any]) -> dict[str, Any]:
            if not paths:
                return r
            r = dict(r)
            if "base_model" in r:
                r["base_model"] = paths.get(r["base_model"], r["base_model"])
            r["models"] = [{**m, "model": paths.get(m["model"], m["model"])} for m in r["models"]]
            return r

        groups = [{"tensors": "outer", "recipe": fix(self.settings[0].recipe(self.a, self.b, self.base, self.seed))}]
        for block, s in zip(self.blocks, self.settings[1:]):
            groups.append({"tensors": {"layers": list(block)},
                           "recipe": fix(s.recipe(self.a, self.b, self.base, self.seed))})
        return {"kind": "layerwise", "groups": groups}

    def key(self) -> str:
        return _digest(self.to_dict())

    def merge(self, states: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Merge in memory: each group's tensors by its own recipe (same operator code as the engine)."""
        recipes = self.group_recipes()
        reference = states[self.base]
        subsets: list[list[str]] = [[] for _ in recipes]
        for name in reference:
            subsets[self.group_of(name)].append(name)
        out: dict[str, Tensor] = {}
        for names, recipe in zip(subsets, recipes):
            if not names:
                continue
            specs, base_spec = recipe.merge_inputs()
            models = [{n: states[s.model][n] for n in names} for s in specs]
            base = {n: states[base_spec.model][n] for n in names} if base_spec is not None else None
            out.update(merge_state_dicts(recipe.merge_method, models, base, [dict(s.parameters) for s in specs],
                                         recipe.parameters, layer_count=self.layer_count))
        return {n: out[n] for n in reference}


def layer_blocks(layer_count: int, n_groups: int | None = None) -> tuple[tuple[int, ...], ...]:
    """``n_groups`` contiguous blocks of decoder layers (default: one block per layer)."""
    n = layer_count if n_groups is None else max(1, min(int(n_groups), layer_count))
    return tuple(tuple(int(i) for i in part) for part in np.array_split(np.arange(layer_count), n))


class LayerwiseSpace:
    """Layer-wise fusion: per group an operator (categorical) and mix / lambda / density (see the module doc)."""

    kind = "layerwise"

    def __init__(self, a: str, b: str, base: str, layer_count: int, n_groups: int | None = None,
                 methods: Sequence[str] = METHODS, seed: int = 0) -> None:
        self.a, self.b, self.base, self.seed = a, b, base, seed
        self.blocks = layer_blocks(layer_count, n_groups)
        self.methods = tuple(methods)
        self.groups = ["outer", *[f"layers{blk[0]}-{blk[-1]}" for blk in self.blocks]]

    def suggest(self, trial: optuna.Trial) -> LayerwiseRecipe:
        params = {}
        for g in range(len(self.groups)):
            params[f"g{g}_op"] = trial.suggest_categorical(f"g{g}_op", list(self.methods))
            params[f"g{g}_mix"] = trial.suggest_float(f"g{g}_mix", *MIX_RANGE)
            params[f"g{g}_lam"] = trial.suggest_float(f"g{g}_lam", *LAMBDA_RANGE)
            params[f"g{g}_density"] = trial.suggest_float(f"g{g}_density", *DENSITY_RANGE)
        return self.from_params(params)

    def from_params(self, params: Mapping[str, Any]) -> LayerwiseRecipe:
        settings = tuple(GroupSetting(str(params[f"g{g}_op"]), float(params[f"g{g}_mix"]),
                                      float(params[f"g{g}_lam"]), float(params[f"g{g}_density"]))
                         for g in range(len(self.groups)))
        return LayerwiseRecipe(self.a, self.b, self.base, self.blocks, settings, self.seed)

    def uniform_params(self, setting: GroupSetting) -> dict[str, Any]:
        """The parameters that apply ``setting`` to every group (a fixed operator inside this space)."""
        out: dict[str, Any] = {}
        for g in range(len(self.groups)):
            out.update({f"g{g}_op": setting.method, f"g{g}_mix": float(np.clip(setting.mix, *MIX_RANGE)),
                        f"g{g}_lam": float(np.clip(setting.lam, *LAMBDA_RANGE)),
                        f"g{g}_density": float(np.clip(setting.density, *DENSITY_RANGE))})
        return out

    def feature_names(self) -> list[str]:
        names = []
        for g in range(len(self.groups)):
            names += [f"g{g}_is_{m}" for m in self.methods] + [f"g{g}_mix", f"g{g}_lam", f"g{g}_density"]
            names += [f"g{g}_coef_a", f"g{g}_coef_b", f"g{g}_coef_sum", f"g{g}_kept"]
        return names

    def encode(self, params: Mapping[str, Any]) -> np.ndarray:
        """Numeric vector of a configuration: per group the one-hot operator, the raw parameters and what they mean
        for the merged task vector (:meth:`GroupSetting.coefficients`, :meth:`GroupSetting.kept`)."""
        row: list[float] = []
        for g in range(len(self.groups)):
            setting = GroupSetting(str(params[f"g{g}_op"]), float(params[f"g{g}_mix"]), float(params[f"g{g}_lam"]),
                                   float(params[f"g{g}_density"]))
            ca, cb = setting.coefficients()
            row += [float(params[f"g{g}_op"] == m) for m in self.methods]
            row += [setting.mix, setting.lam, setting.density, ca, cb, ca + cb, setting.kept()]
        return np.asarray(row, dtype=float)


# ============================================================================================ depth-level integration
@dataclass(frozen=True)
class DepthSlice:
    """Position of the new stack: decoder layer ``layer`` of ``model``, residual outputs scaled by ``scale``."""

    model: str
    layer: int
    scale: float = 1.0


@dataclass(frozen=True)
class DepthRecipe:
    """A new layer stack (mergekit ``passthrough`` with ``slices``); outer tensors come from ``outer``."""

    outer: str
    stack: tuple[DepthSlice, ...]

    @property
    def depth(self) -> int:
        return len(self.stack)

    def to_dict(self, paths: Mapping[str, str] | None = None) -> dict[str, Any]:
        """mergekit's passthrough recipe: one single-layer slice per position, ``scale`` on o_proj / down_proj."""
        def p(name: str) -> str:
            return paths.get(name, name) if paths else name

        slices = []
        for s in self.stack:
            source: dict[str, Any] = {"model": p(s.model), "layer_range": [int(s.layer), int(s.layer) + 1]}
            if s.scale != 1.0:
                source["parameters"] = {"scale": [*({"filter": f, "value": float(s.scale)} for f in RESIDUAL_OUTPUTS),
                                                  {"value": 1.0}]}
            slices.append({"sources": [source]})
        return {"merge_method": "passthrough", "base_model": p(self.outer), "slices": slices, "dtype": "float32"}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], names: Mapping[str, str] | None = None,
                  source: str = "<recipe>") -> DepthRecipe:
        """Read the passthrough recipe written by :meth:`to_dict` (``names`` maps paths back to model names)."""
        def n(path: str) -> str:
            return names.get(path, path) if names else path

        if data.get("merge_method") != "passthrough" or not isinstance(data.get("slices"), list) or not data["slices"]:
            raise ValueError(f"{source}: a depth recipe is merge_method: passthrough with a non-empty 'slices' list")
        if "base_model" not in data:
            raise ValueError(f"{source}: a depth recipe names the model of the outer tensors as base_model")
        stack = []
        for i, sl in enumerate(data["slices"]):
            sources = sl.get("sources") if isinstance(sl, Mapping) else None
            if not isinstance(sources, list) or len(sources) != 1:
                raise ValueError(f"{source}: slices[{i}] must hold exactly one source")
            src = sources[0]
            lo, hi = src.get("layer_range", [None, None])
            if not isinstance(lo, int) or hi != lo + 1:
                raise ValueError(f"{source}: slices[{i}].layer_range must be [l, l + 1], got {src.get('layer_range')}")
            scale = 1.0
            for cond in (src.get("parameters") or {}).get("scale", []) or []:
                if cond.get("filter") in RESIDUAL_OUTPUTS:
                    scale = float(cond["value"])
            stack.append(DepthSlice(n(str(src["model"])), lo, scale))
        return cls(n(str(data["base_model"])), tuple(stack))

    def key(self) -> str:
        return _digest(self.to_dict())

    def build(self, states: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """The stacked state dict: ``model.layers.j.*`` = ``model.layers.l_j.*`` of s_j (scaled), outer copied."""
        out: dict[str, Tensor] = {}
        for name, t in states[self.outer].items():
            if layer_index(name) is None:
                out[name] = t.clone()
        for j, s in enumerate(self.stack):
            prefix = f"{_LAYER_PREFIX}{s.layer}."
            found = False
            for name, t in states[s.model].items():
                if name.startswith(prefix):
                    found = True
                    new = f"{_LAYER_PREFIX}{j}.{name[len(prefix):]}"
                    scaled = s.scale != 1.0 and any(f in name for f in RESIDUAL_OUTPUTS)
                    out[new] = t * s.scale if scaled else t.clone()
            if not found:
                raise ValueError(f"depth recipe: model {s.model!r} has no layer {s.layer}")
        return out


class DepthSpace:
    """Depth-level integration: depth D, outer source, and per position (model, layer, scale)."""

    kind = "depth"

    def __init__(self, a: str, b: str, layer_count: int, extra_layers: int = 1) -> None:
        self.a, self.b, self.layer_count = a, b, int(layer_count)
        self.min_depth = max(1, self.layer_count - 1)
        self.max_depth = self.layer_count + int(extra_layers)

    def suggest(self, trial: optuna.Trial) -> DepthRecipe:
        # Every position is sampled even when D leaves it unused: a fixed-dimensional space for NSGA-II and the
        # surrogate (unused positions are ignored by from_params and masked by encode).
        params: dict[str, Any] = {"depth": trial.suggest_int("depth", self.min_depth, self.max_depth),
                                  "outer": trial.suggest_categorical("outer", [self.a, self.b])}
        for j in range(self.max_depth):
            params[f"p{j}_src"] = trial.suggest_categorical(f"p{j}_src", [self.a, self.b])
            params[f"p{j}_layer"] = trial.suggest_int(f"p{j}_layer", 0, self.layer_count - 1)
            params[f"p{j}_scale"] = trial.suggest_float(f"p{j}_scale", *SCALE_RANGE)
        return self.from_params(params)

    def from_params(self, params: Mapping[str, Any]) -> DepthRecipe:
        depth = int(params["depth"])
        stack = tuple(DepthSlice(str(params[f"p{j}_src"]), int(params[f"p{j}_layer"]), float(params[f"p{j}_scale"]))
                      for j in range(depth))
        return DepthRecipe(str(params["outer"]), stack)

    def identity_params(self, model: str) -> dict[str, Any]:
        """``model`` itself: its own layers in order, scale 1 (extra positions repeat the last layer, unused)."""
        out: dict[str, Any] = {"depth": self.layer_count, "outer": model}
        for j in range(self.max_depth):
            out.update({f"p{j}_src": model, f"p{j}_layer": min(j, self.layer_count - 1), f"p{j}_scale": 1.0})
        return out

    def feature_names(self) -> list[str]:
        names = ["depth", "outer_is_b"]
        for j in range(self.max_depth):
            names += [f"p{j}_active", f"p{j}_is_b", f"p{j}_layer", f"p{j}_scale"]
        return names

    def encode(self, params: Mapping[str, Any]) -> np.ndarray:
        depth = int(params["depth"])
        row = [float(depth), float(params["outer"] == self.b)]
        for j in range(self.max_depth):
            on = j < depth
            row += [float(on), float(on and params[f"p{j}_src"] == self.b),
                    float(params[f"p{j}_layer"]) if on else -1.0, float(params[f"p{j}_scale"]) if on else 0.0]
        return np.asarray(row, dtype=float)


Space = LayerwiseSpace | DepthSpace
SearchRecipe = LayerwiseRecipe | DepthRecipe


# ============================================================================================ the merge problem
class MergeProblem:
    """Two same-base experts of a catalogue, their tensors in memory, and a cost-counting scorer of recipes.

    Costs: ``evaluations`` (models scored) and ``examples`` (examples decoded, summed over tasks); results are
    cached per (recipe, n), so a repeated configuration costs nothing."""

    def __init__(self, catalogue: Catalogue | str | Path, a: str, b: str, tasks: Sequence[str] | None = None,
                 device: str = "cpu") -> None:
        from .evaluate import resolve_evaluator

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
        self.evaluator = resolve_evaluator(self.catalogue.evaluator)
        from .checkpoint import load_state_dict

        self.states = {n: load_state_dict(self.catalogue.path(n)) for n in (a, b, self.base)}
        config = json.loads((self.catalogue.path(self.base) / "config.json").read_text())
        self.layer_count = int(config["num_hidden_layers"])
        self._skeletons: dict[int, tuple[Any, Any]] = {}
        self._cache: dict[tuple[str, int], dict[str, float]] = {}
        self._refs: dict[tuple[str, int], float] = {}
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
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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
            owners = [m for m in (self.a, self.b) if task in self.catalogue.entry(m).tasks] or [self.a, self.b]
            best = 0.0
            for m in owners:
                model, tok = self.skeleton(self.layer_count)
                model.load_state_dict(self.states[m], strict=True)
                best = max(best, float(self.evaluator(model, tok, [task], int(n))[task]))
            self._refs[(task, n)] = best
        return self._refs[(task, n)]

    def scores(self, recipe: SearchRecipe, n: int) -> dict[str, float]:
        """Raw scores of the merged model on the parent tasks (first ``n`` eval examples each)."""
        key = (recipe.key(), int(n))
        if key not in self._cache:
            depth = recipe.depth if isinstance(recipe, DepthRecipe) else self.layer_count
            self._cache[key] = self._score(self.state_dict(recipe), depth, n)
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
        values = [v for v in self.normalized(recipe, n).values() if not math.isnan(v)]
        return float(np.mean(values)) if values else math.nan

    # --- held-out examples -----------------------------------------------------------------------------------
    def _slice_scores(self, state: Mapping[str, Tensor], depth: int, start: int, stop: int) -> dict[str, float]:
        from .evaluate import synthetic_detail

        if self.catalogue.evaluator is not None:
            raise ValueError("held-out scoring reads each example's result: the kit's tasks only (this catalogue "
                             f"names the evaluator {self.catalogue.evaluator!r})")
        model, tok = self.skeleton(depth)
        model.load_state_dict(state, strict=True)
        detail = synthetic_detail(model, tok, list(self.tasks), stop)
        self.heldout_examples += (stop - start) * len(self.tasks)
        return {t: float(exact[start:stop].mean()) for t, (exact, _) in detail.items()}

    def heldout_normalized(self, recipe: SearchRecipe, start: int, stop: int | None = None) -> dict[str, float]:
        """norm_t on the eval examples [start, stop) of each parent task (default: to the end of the split): examples
        a search that scored the first ``start`` never saw, so a recipe chosen for being best there is not flattered
        by the noise it was chosen on. Normalized by the best parent's own score on the same examples. The kit's
        tasks only (the per-example results are read); not counted as search cost."""
        from .tasks import SPLIT_SIZES

        stop = SPLIT_SIZES["eval"] if stop is None else int(stop)
        if not 0 <= start < stop:
            raise ValueError(f"held-out examples: need 0 <= start < stop, got {start}, {stop}")
        key = (recipe.key(), f"heldout:{start}:{stop}")
        if key not in self._cache:
            depth = recipe.depth if isinstance(recipe, DepthRecipe) else self.layer_count
            self._cache[key] = self._slice_scores(self.state_dict(recipe), depth, start, stop)
        raw = self._cache[key]
        out = {}
        for t in self.tasks:
            rkey = (t, f"heldout:{start}:{stop}")
            if rkey not in self._refs:
                owners = [m for m in (self.a, self.b) if t in self.catalogue.entry(m).tasks] or [self.a, self.b]
                for m in owners:
                    if (f"parent:{m}", f"heldout:{start}:{stop}") not in self._cache:
                        self._cache[(f"parent:{m}", f"heldout:{start}:{stop}")] = self._slice_scores(
                            self.states[m], self.layer_count, start, stop)
                self._refs[rkey] = max(self._cache[(f"parent:{m}", f"heldout:{start}:{stop}")][t] for m in owners)
            ref = self._refs[rkey]
            out[t] = raw[t] / ref if ref > 0 else math.nan
        return out

    def heldout_quality(self, recipe: SearchRecipe, start: int, stop: int | None = None) -> float:
        """Merge quality on the held-out examples (:meth:`heldout_normalized`)."""
        values = [v for v in self.heldout_normalized(recipe, start, stop).values() if not math.isnan(v)]
        return float(np.mean(values)) if values else math.nan


# ============================================================================================ optimizers
def fidelity_schedule(n_max: int, n_min: int, eta: int = 2) -> list[int]:
    """Rungs n_min, n_min·eta, … up to n_max (n_max always last): the examples per task of each rung."""
    if n_min <= 0 or n_max < n_min or eta < 2:
        raise ValueError(f"fidelity schedule: need 0 < n_min <= n_max and eta >= 2, got {n_min}, {n_max}, {eta}")
    rungs = [int(n_min)]
    while rungs[-1] * eta < n_max:
        rungs.append(rungs[-1] * eta)
    if rungs[-1] != n_max:
        rungs.append(int(n_max))
    return rungs


def make_sampler(name: str, seed: int = 0, n_objectives: int = 1, n_startup: int = 10) -> optuna.samplers.BaseSampler:
    """``random``, ``tpe`` (multivariate), ``nsga2`` or ``qmc`` (Sobol) with a seed."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, 2 * n_startup)))
    if name == "qmc":
        import warnings

        with warnings.catch_warnings():  # "experimental" in some Optuna releases
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")


def make_pruner(name: str | None, rungs: Sequence[int], eta: int = 2) -> optuna.pruners.BasePruner:
    """``None`` (never prune), ``sha`` (successive halving) or ``hyperband`` over rungs measured in examples."""
    if name in (None, "none"):
        return optuna.pruners.NopPruner()
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=int(rungs[0]), reduction_factor=eta)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=int(rungs[0]), max_resource=int(rungs[-1]),
                                              reduction_factor=eta)
    raise ValueError(f"unknown pruner {name!r}; expected none, sha or hyperband")


@dataclass
class SearchResult:
    """A finished search: the Optuna study, one row per trial, and the best recipe."""

    study: optuna.Study
    space: Any
    trials: pd.DataFrame
    objectives: list[str]
    sampler: str
    pruner: str | None

    @property
    def best_params(self) -> dict[str, Any]:
        done = self.trials[self.trials.state == "COMPLETE"]
        if done.empty:
            raise ValueError("search: no trial completed")
        row = done.loc[done["value"].idxmax()]
        return dict(row["params"])

    @property
    def best_recipe(self) -> SearchRecipe:
        return self.space.from_params(self.best_params)

    @property
    def best_value(self) -> float:
        return float(self.trials.loc[self.trials.state == "COMPLETE", "value"].max())

    def pareto(self) -> pd.DataFrame:
        """Rows of the non-dominated trials (multi-objective searches; maximisation)."""
        done = self.trials[self.trials.state == "COMPLETE"]
        return done[pareto_mask(done[self.objectives].to_numpy())].reset_index(drop=True)


def pareto_mask(values: np.ndarray) -> np.ndarray:
    """True for rows not dominated by any other row (maximise every column; NaN counts as -inf)."""
    v = np.nan_to_num(np.asarray(values, dtype=float), nan=-np.inf)
    keep = np.ones(len(v), dtype=bool)
    for i in range(len(v)):
        dominated = np.all(v >= v[i], axis=1) & np.any(v > v[i], axis=1)
        keep[i] = not dominated.any()
    return keep


def run_search(space: Space, n_trials: int, problem: MergeProblem | None = None,
               surrogate: Surrogate | None = None, sampler: str = "tpe", objectives: str = "quality",
               fidelities: Sequence[int] = (32,), pruner: str | None = None, eta: int = 2, seed: int = 0,
               warm_start: Sequence[Mapping[str, Any]] = (), progress: bool = False,
               n_startup: int = 10) -> SearchResult:
    """Run ``n_trials`` of an Optuna study over ``space``, scored by real merges (``problem``) or a ``surrogate``.

    ``objectives="quality"``: maximise merge quality; with ``pruner`` (``sha`` / ``hyperband``) each trial climbs
    the ``fidelities`` (examples per task) and reports quality at each rung. ``objectives="tasks"``: maximise each
    parent task's normalized score (NSGA-II; Optuna does not prune multi-objective trials, so only the last rung is
    used). ``warm_start`` configurations are enqueued first (e.g. the SimMerge choice).

    Each row of the trials table: number, state, value (quality), the per-task objectives, cost_examples,
    evaluations (both cumulative over the study, real merges only), trial_examples (this trial's own cost),
    best_so_far, rung (last fidelity reached), key (canonical recipe digest), params.
    """
    if (problem is None) == (surrogate is None):
        raise ValueError("run_search: pass exactly one of problem (real merges) or surrogate")
    tasks = list(problem.tasks if problem is not None else surrogate.tasks)
    multi = objectives == "tasks"
    if objectives not in ("quality", "tasks"):
        raise ValueError(f"objectives must be 'quality' or 'tasks', got {objectives!r}")
    rungs = sorted(int(n) for n in fidelities)
    if multi or pruner in (None, "none"):
        rungs = rungs[-1:]
    # A fixed study name: Hyperband assigns trials to brackets by a hash of (study name, trial number), and the
    # default name is a random UUID, which made the same seed prune different trials from run to run.
    study = optuna.create_study(study_name=f"{sampler}-{space.kind}-{objectives}-{seed}",
                                directions=["maximize"] * (len(tasks) if multi else 1),
                                sampler=make_sampler(sampler, seed, len(tasks) if multi else 1, n_startup),
                                pruner=make_pruner(None if multi else pruner, rungs, eta))
    for params in warm_start:
        study.enqueue_trial(dict(params), skip_if_exists=True)
    rows: list[dict[str, Any]] = []
    start_examples = problem.examples if problem else 0
    start_evals = problem.evaluations if problem else 0

    def objective(trial: optuna.Trial) -> float | list[float]:
        recipe = space.suggest(trial)
        params = dict(trial.params)
        row: dict[str, Any] = {"number": trial.number, "params": params, "key": recipe.key()}
        rows.append(row)
        before = problem.examples if problem else 0
        for k, n in enumerate(rungs):
            if problem is not None:
                norm = problem.normalized(recipe, n)
            else:
                norm = surrogate.predict_tasks([params])[0]
            values = [v for v in norm.values() if not math.isnan(v)]
            quality = float(np.mean(values)) if values else 0.0
            row.update({"value": quality, "rung": n, **{f"task:{t}": norm[t] for t in tasks}})
            row["cost_examples"] = (problem.examples - start_examples) if problem else 0
            row["evaluations"] = (problem.evaluations - start_evals) if problem else 0
            row["trial_examples"] = (problem.examples - before) if problem else 0
            if not multi and len(rungs) > 1:
                trial.report(quality, n)
                if k < len(rungs) - 1 and trial.should_prune():
                    raise optuna.TrialPruned()
        if multi:
            return [0.0 if math.isnan(norm[t]) else float(norm[t]) for t in tasks]
        return quality

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_trials, desc=f"{sampler} on {space.kind}", leave=False)
    callbacks = [lambda s, t: bar.update(1)] if bar is not None else []
    study.optimize(objective, n_trials=n_trials, callbacks=callbacks, catch=())
    if bar is not None:
        bar.close()
    states = {t.number: t.state.name for t in study.trials}
    frame = pd.DataFrame(rows)
    frame["state"] = frame.number.map(states)
    # A pruned trial's quality is a low-fidelity estimate: the trace's best counts finished trials only.
    finished = frame.value.where(frame.state == "COMPLETE")
    frame["best_so_far"] = finished.cummax()
    frame["sampler"], frame["space"] = sampler, space.kind
    frame["pruner"] = pruner if not multi else None
    return SearchResult(study, space, frame, [f"task:{t}" for t in tasks], sampler, pruner)


# ============================================================================================ surrogate benchmark
def collect_samples(problem: MergeProblem, space: Space, n_samples: int, n: int, seed: int = 0,
                    sampler: str = "random", progress: bool = False) -> pd.DataFrame:
    """Score ``n_samples`` configurations for real (``n`` examples per task): the surrogate's training data.

    Columns: params, key, quality, task:<t> per parent task, pair, group (pair + canonical recipe, the split unit)."""
    result = run_search(space, n_samples, problem=problem, sampler=sampler, fidelities=(n,), seed=seed,
                        progress=progress)
    return samples_from_trials(result.trials, problem)


def samples_from_trials(trials: pd.DataFrame, problem: MergeProblem) -> pd.DataFrame:
    """Completed trials of real searches as surrogate samples (see :func:`collect_samples`)."""
    done = trials[trials.state == "COMPLETE"].copy()
    task_cols = [f"task:{t}" for t in problem.tasks]
    out = done[["params", "key", "value", *task_cols]].rename(columns={"value": "quality"})
    out["pair"] = f"{problem.a}|{problem.b}"
    out["group"] = out.pair + "#" + out.key
    return out.reset_index(drop=True)


def group_split(samples: pd.DataFrame, test_size: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train / test row indices with no ``group`` on both sides (sklearn's GroupShuffleSplit)."""
    from sklearn.model_selection import GroupShuffleSplit

    if samples.group.nunique() < 2:
        raise ValueError("surrogate split: need at least two sample groups")
    split = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    train, test = next(split.split(samples, groups=samples.group))
    return train, test


def check_no_leakage(samples: pd.DataFrame, train: np.ndarray, test: np.ndarray, space: Space) -> None:
    """Raise if a group, a recipe or an identical encoded configuration sits in both train and test."""
    tr, te = samples.iloc[train], samples.iloc[test]
    for col in ("group", "key"):
        shared = set(tr[col]) & set(te[col])
        if shared:
            raise ValueError(f"surrogate split leaks: {len(shared)} {col}(s) in both train and test")
    enc_tr = {space.encode(p).tobytes() for p in tr.params}
    if any(space.encode(p).tobytes() in enc_tr for p in te.params):
        raise ValueError("surrogate split leaks: an identical configuration is in both train and test")


@dataclass
class Surrogate:
    """A regressor from encoded configurations to (quality, per-task normalized scores)."""

    space: Any
    tasks: list[str]
    model: Any
    targets: list[str] = field(default_factory=list)

    def predict(self, params: Sequence[Mapping[str, Any]]) -> np.ndarray:
        x = np.stack([self.space.encode(p) for p in params])
        y = self.model.predict(x)
        return y.reshape(len(x), -1)

    def predict_quality(self, params: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return self.predict(params)[:, 0]

    def predict_tasks(self, params: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
        y = self.predict(params)
        return [{t: float(row[1 + i]) for i, t in enumerate(self.tasks)} for row in y]


def fit_surrogate(samples: pd.DataFrame, space: Space, seed: int = 0, n_estimators: int = 200) -> Surrogate:
    """Fit a random forest on (encoded configuration → quality, task scores); NaN task scores count as 0."""
    from sklearn.ensemble import RandomForestRegressor

    tasks = [c.removeprefix("task:") for c in samples.columns if c.startswith("task:")]
    targets = ["quality", *[f"task:{t}" for t in tasks]]
    x = np.stack([space.encode(p) for p in samples.params])
    y = samples[targets].fillna(0.0).to_numpy(dtype=float)
    model = RandomForestRegressor(n_estimators=n_estimators, min_samples_leaf=2, random_state=seed, n_jobs=1)
    model.fit(x, y)
    return Surrogate(space, tasks, model, targets)


def surrogate_quality(samples: pd.DataFrame, space: Space, test_size: float = 0.25, seed: int = 0,
                      n_estimators: int = 200) -> dict[str, Any]:
    """Held-out R² and Kendall τ of predicted vs measured quality (group split, checked for leakage)."""
    from scipy.stats import kendalltau
    from sklearn.metrics import r2_score

    train, test = group_split(samples, test_size, seed)
    check_no_leakage(samples, train, test, space)
    model = fit_surrogate(samples.iloc[train], space, seed, n_estimators)
    measured = samples.iloc[test].quality.fillna(0.0).to_numpy()
    predicted = model.predict_quality(list(samples.iloc[test].params))
    tau = kendalltau(predicted, measured).statistic if len(test) > 1 else math.nan
    return {"r2": float(r2_score(measured, predicted)) if len(test) > 1 else math.nan,
            "kendall_tau": float(tau) if tau is not None else math.nan, "n_train": int(len(train)),
            "n_test": int(len(test)), "measured": measured, "predicted": predicted}


def compare_on_surrogate(surrogate: Surrogate, samplers: Sequence[str], n_trials: int, seeds: Sequence[int] = (0,),
                         warm_start: Sequence[Mapping[str, Any]] = (), progress: bool = False) -> pd.DataFrame:
    """Every sampler × seed against the surrogate at the same budget: the concatenated trial tables."""
    frames = []
    for name in samplers:
        for seed in seeds:
            res = run_search(surrogate.space, n_trials, surrogate=surrogate, sampler=name, objectives="quality",
                             seed=seed, warm_start=warm_start, progress=progress)
            frames.append(res.trials.assign(seed=seed))
    return pd.concat(frames, ignore_index=True)


def best_configs(trials: pd.DataFrame) -> pd.DataFrame:
    """Per sampler (over seeds) the configuration with the best value: columns sampler, seed, value, params."""
    done = trials[trials.state == "COMPLETE"]
    idx = done.groupby("sampler", sort=False).value.idxmax()
    return done.loc[idx, ["sampler", "seed", "value", "params"]].reset_index(drop=True)


# ============================================================================================ baselines
def best_fixed_choice(labels_file: str | Path | None) -> tuple[str, dict[str, Any]] | None:
    """The labels table's best fixed (method, setting) over same-base pairs, as (method, parameters); None without
    a labels table."""
    if labels_file is None or not Path(labels_file).exists():
        return None
    from .labels import best_fixed, load_labels, merge_quality

    labels = load_labels(labels_file)
    quality = merge_quality(labels)
    same = quality[quality.same_base].dropna(subset=["quality"])
    method, setting = best_fixed(same if len(same) else quality)
    params = labels[(labels.method == method) & (labels.setting == setting)].parameters.iloc[0]
    return method, json.loads(params)


def simmerge_choice(problem: MergeProblem, predictor_file: str | Path | None,
                    features_file: str | Path | None = None, n_probes: int = 8) -> tuple[str, dict[str, Any]] | None:
    """The SimMerge predictor's (method, parameters) for the pair; None without a predictor file.

    Features come from the features table when it has the pair's rows, else they are computed (``n_probes``)."""
    if predictor_file is None or not Path(predictor_file).exists():
        return None
    from .labels import setting_parameters
    from .predictor import load_predictor, owner_rows, recommend_rows

    predictor = load_predictor(predictor_file)
    rows = None
    want = pd.DataFrame({"a": problem.a, "b": problem.b, "task": list(problem.tasks)})
    if features_file is not None and Path(features_file).exists():
        try:
            rows = owner_rows(pd.read_parquet(features_file), want)
        except ValueError:  # the table lacks this pair's owner-oriented rows: compute them
            rows = None
    if rows is None:
        rows = recommend_rows(problem.catalogue, problem.a, problem.b, n_probes)
    best = predictor.recommend(rows).iloc[0]
    return str(best.method), setting_parameters(str(best.setting))


def uniform_recipe(space: LayerwiseSpace, method: str, parameters: Mapping[str, Any]
                   ) -> tuple[LayerwiseRecipe, dict[str, Any]]:
    """A labels-grid choice as a layer-wise recipe (the same operator on every group) and its space parameters."""
    params = space.uniform_params(setting_from_grid(method, parameters))
    return space.from_params(params), params


def choose_pair(catalogue: Catalogue, labels_file: str | Path | None = None) -> tuple[str, str]:
    """A same-base pair worth searching: the one with the largest oracle − best-fixed gap in the labels (so search
    has room to help), else the first same-base pair of experts with different tasks."""
    if labels_file is not None and Path(labels_file).exists():
        from .labels import load_labels, merge_quality, oracle_vs_fixed

        quality = merge_quality(load_labels(labels_file))
        same = quality[quality.same_base].dropna(subset=["quality"])
        if len(same):
            gaps = oracle_vs_fixed(same).sort_values(["gap", "a", "b"], ascending=[False, True, True])
            names = {m.name for m in catalogue.models}
            for row in gaps.itertuples():
                if row.a in names and row.b in names:
                    return str(row.a), str(row.b)
    for a, b in catalogue.pairs("same_base"):
        if set(catalogue.entry(a).tasks) != set(catalogue.entry(b).tasks):
            return a, b
    raise ValueError(f"catalogue {catalogue.name!r}: no same-base pair of experts to search")



# ============================================================================================ the chapter's experiment
#: Per-profile sizes of :func:`run_experiment` (real trials are merges + evaluations; surrogate trials are cheap).
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"n_eval": 16, "n_min": 4, "real_trials": 6, "nsga_trials": 4, "depth_trials": 4, "samples": 8,
              "surrogate_trials": 30, "seeds": (0,), "n_probes": 4, "trees": 30, "pairs": 2},
    "default": {"n_eval": 128, "n_min": 16, "real_trials": 40, "nsga_trials": 24, "depth_trials": 24, "samples": 60,
                "surrogate_trials": 150, "seeds": (0, 1), "n_probes": 8, "trees": 100, "pairs": 4},
    "full": {"n_eval": 256, "n_min": 16, "real_trials": 120, "nsga_trials": 60, "depth_trials": 60, "samples": 200,
             "surrogate_trials": 500, "seeds": (0, 1, 2, 3, 4), "n_probes": 32, "trees": 200, "pairs": 8},
}
#: Samplers compared on the surrogate at equal budget.
COMPARED = ("random", "qmc", "tpe", "nsga2")


def _finite(x: Any, digits: int = 4) -> float | None:
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


def profile_settings(profile: str) -> dict[str, Any]:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    return dict(PROFILES[profile])


@dataclass
class Experiment:
    """Everything chapter 08 shows: real searches, the surrogate and its comparison, baselines and the summary."""

    problem: MergeProblem
    settings: dict[str, Any]
    real: dict[str, SearchResult]
    samples: pd.DataFrame
    surrogate_metrics: dict[str, Any]
    surrogate: Surrogate
    comparison: pd.DataFrame
    verified: pd.DataFrame
    baselines: pd.DataFrame
    leaderboard: pd.DataFrame
    summary: dict[str, Any]

    def best(self) -> pd.Series:
        """The leaderboard's best row: source, kind, quality (real, ``n_eval`` examples), recipe."""
        return self.leaderboard.iloc[0]


def heldout_choice(tables: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None], a: str, b: str,
                   family: str = "forest", feature_set: str = "all", seed: int = 0) -> dict[str, Any]:
    """The SimMerge choice for (a, b) from a predictor that never trained on a pair holding either expert or one of
    their siblings (chapter 04's leave-one-expert-out), and the best fixed candidate of the same training pairs.

    ``tables``: (features, labels, reference) of the catalogue (:func:`simmerge_lib.predictor.load_tables`).
    Returns choice (method, parameters), predicted (its predicted quality), abstain (the predictor would rather
    keep a parent), fixed (method, parameters), train_pairs."""
    from .labels import setting_parameters
    from .predictor import expert_tasks, fit_predictor, owner_rows, siblings, training_table

    features, labels, reference = tables
    table = training_table(features, labels, reference)
    sib = siblings(table)
    held = {a, b} | sib.get(a, set()) | sib.get(b, set())
    train = table[~(table.a.isin(held) | table.b.isin(held))]
    if train.pair.nunique() < 2:
        raise ValueError(f"held-out SimMerge choice for {a}|{b}: fewer than two training pairs without them")
    predictor = fit_predictor(train, family=family, feature_set=feature_set, seed=seed, classifier=False)
    task_of = expert_tasks(table)
    rows = owner_rows(features, pd.DataFrame({"a": a, "b": b, "task": [task_of[a], task_of[b]]}))
    rec = predictor.recommend(rows).iloc[0]
    fixed_method, fixed_setting = predictor.fixed.split("|", 1)
    return {"choice": (str(rec.method), setting_parameters(str(rec.setting))), "predicted": float(rec.predicted),
            "abstain": bool(rec.abstain), "fixed": (fixed_method, setting_parameters(fixed_setting)),
            "train_pairs": int(train.pair.nunique())}


def label_oracle(labels: pd.DataFrame, a: str, b: str) -> tuple[str, dict[str, Any], float] | None:
    """The pair's best candidate of the label grid in hindsight: (method, parameters, its labelled quality); None
    when the labels do not hold the pair."""
    from .labels import merge_quality

    q = merge_quality(labels[((labels.a == a) & (labels.b == b)) | ((labels.a == b) & (labels.b == a))])
    q = q.dropna(subset=["quality"])
    if q.empty:
        return None
    top = q.loc[q.quality.idxmax()]
    params = labels[(labels.method == top.method) & (labels.setting == top.setting)].parameters.iloc[0]
    return str(top.method), json.loads(params), float(top.quality)


def choose_pairs(catalogue: Catalogue, labels: pd.DataFrame, n: int) -> list[tuple[str, str]]:
    """``n`` same-base pairs of experts of different tasks spread over the labels' ranking of the oracle − best
    fixed gap (the pair with the most room for a better recipe, the one with the least, and evenly in between), so
    that search is tried where choosing matters and where it does not."""
    from .labels import merge_quality, oracle_vs_fixed

    quality = merge_quality(labels)
    same = quality[quality.same_base].dropna(subset=["quality"])
    names = {m.name for m in catalogue.models}
    gaps = oracle_vs_fixed(same).sort_values(["gap", "a", "b"], ascending=[False, True, True])
    gaps = gaps[gaps.a.isin(names) & gaps.b.isin(names)].reset_index(drop=True)
    if gaps.empty:
        return [choose_pair(catalogue)]
    picks = sorted({int(round(i)) for i in np.linspace(0, len(gaps) - 1, min(n, len(gaps)))})
    return [(str(gaps.a[i]), str(gaps.b[i])) for i in picks]


def run_experiment(catalogue: Catalogue | str | Path, profile: str = "smoke", labels_file: str | Path | None = None,
                   predictor_file: str | Path | None = None, features_file: str | Path | None = None,
                   pair: tuple[str, str] | None = None, seed: int = 0, progress: bool = True,
                   tables: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None] | None = None,
                   detailed: bool = True, family: str = "forest", **overrides: Any) -> Experiment:
    """Chapter 08 end to end on one same-base pair (``pair``, else :func:`choose_pair`):

    1. baselines: the best fixed candidate and the SimMerge predictor's choice; given ``tables`` (features, labels,
       reference) both come from the pairs that hold neither expert nor a sibling of theirs (:func:`heldout_choice`:
       the pair's own labels never reach the choice), else from the labels file and the predictor file (fallbacks:
       linear 0.5, the best fixed candidate); the label grid's best candidate for the pair in hindsight when the
       labels hold it;
    2. real searches on the first ``n_eval`` eval examples per task: TPE + Hyperband over the layer-wise space
       (warm-started with the SimMerge choice and the best fixed candidate, so it can only match or beat both on
       these examples), TPE over the depth space, and (``detailed``) NSGA-II per task (Pareto front);
    3. the surrogate: random real samples + every completed real trial, R² / Kendall τ on held-out groups;
    4. (``detailed``) random, QMC, TPE and NSGA-II on the surrogate at equal budget over ``seeds``; each one's best
       configuration merged and scored for real;
    5. the honest comparison (kit tasks): the best recipe found, the baselines and the label oracle re-scored on
       the eval examples the search never saw ([``n_eval``, 512)), where the search's pick is not flattered by the
       noise it was picked on.
    """
    import time

    start = time.perf_counter()
    cfg = {**profile_settings(profile), **overrides}
    cat = catalogue if isinstance(catalogue, Catalogue) else Catalogue.load(catalogue)
    a, b = pair or choose_pair(cat, labels_file)
    problem = MergeProblem(cat, a, b)
    space = problem.layerwise_space()
    n_full = int(cfg["n_eval"])
    rungs = fidelity_schedule(n_full, int(cfg["n_min"]))

    oracle = None
    choice_info: dict[str, Any] = {}
    if tables is not None:
        try:
            choice_info = heldout_choice(tables, a, b, family=family, seed=seed)
        except (ValueError, KeyError) as exc:
            choice_info = {"error": str(exc)}
        oracle = label_oracle(tables[1], a, b)
    if "choice" in choice_info:
        fixed, fixed_source = choice_info["fixed"], "best fixed of the pairs without these experts"
        choice, choice_source = choice_info["choice"], "predictor trained without these experts and siblings"
    else:
        fixed = best_fixed_choice(labels_file)
        fixed_source = "labels" if fixed else "default (linear 0.5: no labels table)"
        fixed = fixed or ("linear", {"weight": 0.5})
        choice = None
        choice_error = choice_info.get("error")
        if choice_error is None:
            try:
                choice = simmerge_choice(problem, predictor_file, features_file, n_probes=int(cfg["n_probes"]))
            except (ValueError, KeyError) as exc:  # a predictor trained on another catalogue's features
                choice_error = str(exc)
        reason = f": {choice_error}" if choice_error else ""
        choice_source = "predictor" if choice else f"best fixed (no usable predictor{reason})"
        choice = choice or fixed
    base_rows = []
    candidates = [("best_fixed", fixed, fixed_source), ("simmerge_choice", choice, choice_source)]
    if oracle is not None:
        candidates.append(("label_oracle", oracle[:2], f"the label grid's best for this pair ({oracle[2]:.3f} at "
                                                        f"n = {int(tables[1].n_eval.iloc[0])})"))
    for name, (method, params), source in candidates:
        recipe, sp = uniform_recipe(space, method, params)
        base_rows.append({"baseline": name, "method": method, "parameters": json.dumps(params, sort_keys=True),
                          "source": source, "quality": problem.quality(recipe, n_full),
                          **{f"task:{t}": v for t, v in problem.normalized(recipe, n_full).items()}, "params": sp})
    baselines = pd.DataFrame(base_rows)
    warm = [baselines.params.iloc[1], baselines.params.iloc[0]]

    real = {"tpe+hyperband": run_search(space, int(cfg["real_trials"]), problem=problem, sampler="tpe",
                                        fidelities=rungs, pruner="hyperband", seed=seed, warm_start=warm,
                                        progress=progress)}
    if detailed:
        real["nsga2 (tasks)"] = run_search(space, int(cfg["nsga_trials"]), problem=problem, sampler="nsga2",
                                           objectives="tasks", fidelities=(n_full,), seed=seed + 1, warm_start=warm,
                                           progress=progress)
    real["tpe (depth)"] = run_search(problem.depth_space(), int(cfg["depth_trials"]), problem=problem, sampler="tpe",
                                     fidelities=(n_full,), seed=seed + 2, progress=progress,
                                     warm_start=[problem.depth_space().identity_params(a)])
    search_evaluations, search_examples = problem.evaluations, problem.examples
    # Distinct seeds per run: equal seeds would replay the same random start-up configurations (cache hits).
    collected = collect_samples(problem, space, int(cfg["samples"]), n_full, seed=seed + 3, progress=progress)
    from_runs = [samples_from_trials(r.trials, problem) for k, r in real.items() if r.space.kind == "layerwise"]
    samples = pd.concat([collected, *from_runs], ignore_index=True)
    metrics = surrogate_quality(samples, space, seed=seed, n_estimators=int(cfg["trees"]))
    surrogate = fit_surrogate(samples, space, seed=seed, n_estimators=int(cfg["trees"]))
    comparison = pd.DataFrame(columns=["sampler", "seed", "number", "value", "best_so_far", "state", "params"])
    vrows = []
    if detailed:
        comparison = compare_on_surrogate(surrogate, COMPARED, int(cfg["surrogate_trials"]), seeds=cfg["seeds"],
                                          progress=progress)
        for row in best_configs(comparison).itertuples():
            recipe = space.from_params(row.params)
            vrows.append({"sampler": row.sampler, "predicted": float(row.value),
                          "quality": problem.quality(recipe, n_full), "params": row.params})
    verified = pd.DataFrame(vrows, columns=["sampler", "predicted", "quality", "params"])

    board = [{"source": f"real {k}", "kind": r.space.kind, "quality": r.best_value, "recipe": r.best_recipe}
             for k, r in real.items() if (r.trials.state == "COMPLETE").any()]
    board += [{"source": f"surrogate {r.sampler}", "kind": "layerwise", "quality": float(r.quality),
               "recipe": space.from_params(r.params)} for r in verified.itertuples()]
    board += [{"source": r.baseline, "kind": "fixed operator", "quality": float(r.quality),
               "recipe": space.from_params(r.params)} for r in baselines.itertuples()]
    leaderboard = (pd.DataFrame(board).sort_values("quality", ascending=False, kind="stable", na_position="last")
                   .reset_index(drop=True))
    searched = leaderboard[~leaderboard.source.isin(["best_fixed", "simmerge_choice", "label_oracle"])]
    searched = searched.dropna(subset=["quality"])
    best_row = searched.iloc[0] if len(searched) else None

    from .tasks import SPLIT_SIZES

    heldout: dict[str, float | None] = {}
    stop = SPLIT_SIZES["eval"]
    if cat.evaluator is None and n_full < stop:
        if best_row is not None:
            heldout["best_found"] = problem.heldout_quality(best_row.recipe, n_full, stop)
        depth = real["tpe (depth)"]
        if (depth.trials.state == "COMPLETE").any():
            heldout["best_depth"] = problem.heldout_quality(depth.best_recipe, n_full, stop)
        for r in baselines.itertuples():
            heldout[r.baseline] = problem.heldout_quality(space.from_params(r.params), n_full, stop)
    hq = {k: _finite(v) for k, v in heldout.items()}
    summary = {
        "profile": profile, "catalogue": cat.name, "pair": f"{a}|{b}", "tasks": list(problem.tasks),
        "n_eval": n_full, "fidelities": rungs,
        "trials": int(sum(len(r.trials) for r in real.values()) + len(collected)),
        "surrogate_trials": int(len(comparison)),
        "real_evaluations": int(problem.evaluations), "real_examples": int(problem.examples),
        "search_evaluations": int(search_evaluations), "search_examples": int(search_examples),
        "best_found_quality": round(float(best_row.quality), 4) if best_row is not None else None,
        "best_found_by": str(best_row.source) if best_row is not None else None,
        "simmerge_choice_quality": _finite(baselines.quality.iloc[1]),
        "best_fixed_quality": _finite(baselines.quality.iloc[0]),
        "label_oracle_quality": _finite(baselines.quality.iloc[2]) if len(baselines) > 2 else None,
        "label_oracle_labelled": round(oracle[2], 4) if oracle is not None else None,
        "simmerge_choice": f"{choice[0]} {json.dumps(choice[1], sort_keys=True)}",
        "simmerge_choice_source": choice_source, "simmerge_choice_abstains": choice_info.get("abstain"),
        "best_fixed": f"{fixed[0]} {json.dumps(fixed[1], sort_keys=True)}", "best_fixed_source": fixed_source,
        "heldout_examples": [n_full, stop] if heldout else None, "heldout_quality": hq,
        "heldout_examples_decoded": int(problem.heldout_examples),
        # NaN (e.g. τ of a constant held-out set) becomes null: the benchmark JSON stays strict JSON
        "surrogate_r2": _finite(metrics["r2"]), "surrogate_kendall_tau": _finite(metrics["kendall_tau"]),
        "surrogate_samples": int(len(samples)), "surrogate_test": int(metrics["n_test"]),
        "pareto_size": int(len(real["nsga2 (tasks)"].pareto())) if "nsga2 (tasks)" in real else None,
        "real_best": {k: round(r.best_value, 4) for k, r in real.items() if (r.trials.state == "COMPLETE").any()},
        "surrogate_winner_quality": {r.sampler: round(float(r.quality), 4) for r in verified.itertuples()},
        "pruned_trials": int((real["tpe+hyperband"].trials.state == "PRUNED").sum()),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return Experiment(problem, cfg, real, samples, metrics, surrogate, comparison, verified, baselines, leaderboard,
                      summary)


def pair_study(catalogue: Catalogue | str | Path, profile: str, pairs: Sequence[tuple[str, str]],
               tables: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None] | None = None, seed: int = 0,
               progress: bool = False, family: str = "forest", detailed_first: bool = True, **overrides: Any
               ) -> tuple[list[Experiment], pd.DataFrame]:
    """:func:`run_experiment` on each pair (the first one ``detailed``: NSGA-II and the optimizers on the surrogate;
    the others the searches the comparison needs), and one row per pair: in-sample and held-out quality of the best
    recipe found, of the SimMerge choice, the best fixed candidate and the label oracle, the search's real-merge
    budget, and the surrogate's held-out R² and Kendall τ."""
    experiments, rows = [], []
    for i, pair in enumerate(pairs):
        exp = run_experiment(catalogue, profile, pair=tuple(pair), seed=seed, progress=progress, tables=tables,
                             detailed=detailed_first and i == 0, family=family, **overrides)
        experiments.append(exp)
        s, h = exp.summary, exp.summary["heldout_quality"]
        rows.append({"pair": s["pair"], "best_found_by": s["best_found_by"], "best_found": s["best_found_quality"],
                     "simmerge_choice": s["simmerge_choice_quality"], "best_fixed": s["best_fixed_quality"],
                     "label_oracle": s["label_oracle_quality"], "heldout_best_found": h.get("best_found"),
                     "heldout_best_depth": h.get("best_depth"), "heldout_simmerge_choice": h.get("simmerge_choice"),
                     "heldout_best_fixed": h.get("best_fixed"), "heldout_label_oracle": h.get("label_oracle"),
                     "choice": s["simmerge_choice"], "search_evaluations": s["search_evaluations"],
                     "search_examples": s["search_examples"], "surrogate_r2": s["surrogate_r2"],
                     "surrogate_kendall_tau": s["surrogate_kendall_tau"], "surrogate_samples": s["surrogate_samples"],
                     "seconds": s["seconds"]})
    return experiments, pd.DataFrame(rows)


def pair_study_summary(table: pd.DataFrame) -> dict[str, Any]:
    """The claims of the pair study: on how many pairs the best recipe found matched or beat the SimMerge choice
    (on the search's examples, where the warm start guarantees it, and on held-out examples, where nothing does),
    the mean held-out gains over the choice and over the best fixed candidate, the search budget and the surrogate's
    mean held-out Kendall τ."""
    def share(x: pd.Series, y: pd.Series) -> str:
        ok = (x >= y - 1e-9)[x.notna() & y.notna()]
        return f"{int(ok.sum())}/{len(ok)}"

    return {"pairs": int(len(table)),
            "best_found_ge_choice": share(table.best_found, table.simmerge_choice),
            "heldout_best_found_ge_choice": share(table.heldout_best_found, table.heldout_simmerge_choice),
            "heldout_gain_over_choice": _finite((table.heldout_best_found - table.heldout_simmerge_choice).mean()),
            "heldout_gain_over_fixed": _finite((table.heldout_best_found - table.heldout_best_fixed).mean()),
            "heldout_choice_minus_fixed": _finite((table.heldout_simmerge_choice - table.heldout_best_fixed).mean()),
            "heldout_oracle_minus_found": _finite((table.heldout_label_oracle - table.heldout_best_found).mean()),
            "search_evaluations_per_pair": _finite(table.search_evaluations.mean(), 1),
            "search_examples_per_pair": _finite(table.search_examples.mean(), 1),
            "mean_kendall_tau": _finite(table.surrogate_kendall_tau.mean()),
            "min_kendall_tau": _finite(table.surrogate_kendall_tau.min()),
            "mean_r2": _finite(table.surrogate_r2.mean())}


# ============================================================================================ command line
def _cmd_search(args: Any) -> int:
    from .checkpoint import write_json_atomic
    from .paths import build_path
    from .predictor import predictor_path

    catalogue = Path(args.catalogue) if args.catalogue else build_path("zoo", args.profile)
    if not (catalogue / "catalogue.json").is_file():
        raise FileNotFoundError(f"{catalogue}: no catalogue.json "
                                f"(build one with `simmerge zoo --profile {args.profile}`)")
    pair = tuple(args.pair.split("|")) if args.pair else None
    if pair is not None and len(pair) != 2:
        raise ValueError(f"--pair {args.pair!r}: expected 'expertA|expertB'")
    exp = run_experiment(catalogue, args.profile, labels_file=build_path("labels", f"{args.profile}.parquet"),
                         predictor_file=predictor_path(args.profile),
                         features_file=build_path("features", f"{args.profile}.parquet"), pair=pair, seed=args.seed,
                         progress=not args.quiet)
    print(json.dumps(exp.summary))
    best = exp.best()
    print(f"# best: {best.source}, quality {best.quality:.3f}")
    text = __import__("yaml").safe_dump(best.recipe.to_dict(exp.problem.paths()), sort_keys=False)
    print(text, end="")
    if args.out:
        write_json_atomic(args.out, {**exp.summary, "best_recipe": best.recipe.to_dict(exp.problem.paths())})
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("search", help="search layer-wise / depth merge recipes for a pair (Optuna)",
                              description="Chapter 08: real searches (TPE + Hyperband, NSGA-II per task, layer "
                                          "stacks), a surrogate benchmark, and the best recipe found.")
    p.add_argument("--profile", default="default", choices=sorted(PROFILES), help="sizes and default catalogue")
    p.add_argument("--catalogue", help="catalogue folder (default build/zoo/<profile>)")
    p.add_argument("--pair", help="'expertA|expertB' (default: the labels' pair with the largest oracle gap)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the summary and the best recipe as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_search)
