"""Search spaces and their recipes: layer-wise fusion (one :class:`~simmerge_lib.operators.Candidate` per tensor group)
and depth-level integration (a new stack of decoder layers, mergekit's ``passthrough`` with ``slices``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from torch import Tensor

from ..paths import map_model_names
from ..checkpoint import layer_index
from ..operators import Candidate, get_operator, param_range
from ..recipe import Recipe

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
_LAYER_PREFIX = "model.layers."


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ============================================================================================ a group's candidate
def group_candidate(method: str, mix: float = 0.5, lam: float = 1.0, density: float = 0.5) -> Candidate:
    """One group's operator and the space's three parameters, ``mix``, ``lambda`` and ``density`` (an operator
    ignores those it does not use)."""
    return Candidate.make(method, {"mix": mix, "lambda": lam, "density": density})


def group_parameters(candidate: Candidate) -> tuple[float, float, float]:
    """(mix, lambda, density) of a group's candidate (defaults 0.5, 1, 0.5 for a parameter it does not name)."""
    p = candidate.setting
    return float(p.get("mix", 0.5)), float(p.get("lambda", 1.0)), float(p.get("density", 0.5))


def group_recipe(candidate: Candidate, a: str, b: str, base: str, seed: int = 0) -> dict[str, Any]:
    """The mergekit recipe (model names) a group's candidate means for experts a, b of ``base``: linear weights
    (mix, 1 - mix), SLERP t = 1 - mix, task-vector weights (2 mix, 2 (1 - mix)) with lambda (and density and seed
    where the operator has them)."""
    m, lam, dens = group_parameters(candidate)
    method = candidate.method
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": m}},
                                                    {"model": b, "parameters": {"weight": 1.0 - m}}],
                "dtype": "float32"}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                "parameters": {"t": 1.0 - m}, "dtype": "float32"}
    op = get_operator(method)
    if not (op.needs_base and "weight" in op.model_params and "lambda" in op.global_params):
        raise ValueError(f"layer-wise search: unsupported operator {method!r} (one of {METHODS}, or a "
                         f"task-vector operator with weight and lambda)")
    pa: dict[str, Any] = {"weight": 2.0 * m}
    pb: dict[str, Any] = {"weight": 2.0 * (1.0 - m)}
    glob: dict[str, Any] = {"lambda": lam}
    if "density" in op.model_params:
        pa["density"], pb["density"] = dens, dens
    if "seed" in op.global_params:
        glob["seed"] = int(seed)
    return {"merge_method": method, "base_model": base,
            "models": [{"model": a, "parameters": pa}, {"model": b, "parameters": pb}],
            "parameters": glob, "dtype": "float32"}


def coefficients(candidate: Candidate) -> tuple[float, float]:
    """How much of each task vector a group's merge adds to the base, (c_a, c_b): theta ≈ theta_0 + c_a tau_a +
    c_b tau_b before trimming / dropping (linear and SLERP: the mix; task-vector operators: lambda times the weights
    (2 mix, 2 (1 - mix)), divided by their sum when the operator normalizes). A surrogate input: the scale of the
    merged task vector explains more of a recipe's quality than any raw parameter."""
    m, lam, _ = group_parameters(candidate)
    if candidate.method in ("linear", "slerp"):
        return m, 1.0 - m
    normalize = bool(get_operator(candidate.method).global_params.get("normalize") or False)
    scale = lam / (2.0 if normalize else 1.0)
    return 2.0 * m * scale, 2.0 * (1.0 - m) * scale


def kept(candidate: Candidate) -> float:
    """The share of each task vector's entries a group's operator keeps (its density when it trims or drops)."""
    traits = get_operator(candidate.method).traits
    return group_parameters(candidate)[2] if {"trim", "drop"} & set(traits) else 1.0


def setting_from_grid(method: str, parameters: Mapping[str, Any]) -> Candidate:
    """The group candidate equal to a labels-grid point (``labels.job_recipe``'s reading of a setting)."""
    p = dict(parameters)
    if method == "linear":
        return group_candidate("linear", mix=float(p.get("weight", 0.5)))
    if method == "slerp":
        return group_candidate("slerp", mix=1.0 - float(p.get("t", 0.5)))
    # labels give both experts the weight 1 (mix 0.5); a setting naming a's weight w keeps the ratio w : 1 - w
    mix = float(p.get("weight", 0.5))
    return group_candidate(method, mix=mix, lam=float(p.get("lambda", 1.0)), density=float(p.get("density", 1.0)))


# ============================================================================================ layer-wise fusion
@dataclass(frozen=True)
class LayerwiseRecipe:
    """Per tensor group (``outer`` + blocks of decoder layers), one candidate (operator with its parameters).

    ``blocks[k]`` lists the decoder layers of block k; ``settings[0]`` is the ``outer`` group's candidate
    (embeddings, final norm, head) and ``settings[k + 1]`` block k's."""

    a: str
    b: str
    base: str
    blocks: tuple[tuple[int, ...], ...]
    settings: tuple[Candidate, ...]
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
        return [Recipe.from_dict(group_recipe(s, self.a, self.b, self.base, self.seed), source=f"group {g}")
                for g, s in enumerate(self.settings)]

    def to_dict(self, paths: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Serializable form: per group its tensors (``layers`` list, or ``outer``) and its mergekit recipe (model
        names, or the folders ``paths`` maps them to)."""
        def recipe(s: Candidate) -> dict[str, Any]:
            r = group_recipe(s, self.a, self.b, self.base, self.seed)
            return map_model_names(r, lambda n: paths.get(n, n)) if paths else r

        groups = [{"tensors": "outer", "recipe": recipe(self.settings[0])}]
        for block, s in zip(self.blocks, self.settings[1:]):
            groups.append({"tensors": {"layers": list(block)}, "recipe": recipe(s)})
        return {"kind": "layerwise", "groups": groups}

    def key(self) -> str:
        return _digest(self.to_dict())

    def merge(self, states: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Merge in memory: each group's tensors by its own recipe (:meth:`Recipe.merge_states`, the engine's
        operator code)."""
        reference = states[self.base]
        subsets: list[list[str]] = [[] for _ in self.settings]
        for name in reference:
            subsets[self.group_of(name)].append(name)
        out: dict[str, Tensor] = {}
        for names, recipe in zip(subsets, self.group_recipes()):
            if names:
                out.update(recipe.merge_states(lambda m, names=names: {n: states[m][n] for n in names},
                                               self.layer_count))
        return {n: out[n] for n in reference}


def layer_blocks(layer_count: int, n_groups: int | None = None) -> tuple[tuple[int, ...], ...]:
    """``n_groups`` contiguous blocks of decoder layers (default: one block per layer)."""
    n = layer_count if n_groups is None else max(1, min(int(n_groups), layer_count))
    return tuple(tuple(int(i) for i in part) for part in np.array_split(np.arange(layer_count), n))


class LayerwiseSpace:
    """Layer-wise fusion: per group an operator (categorical) and mix / lambda / density (see the package doc)."""

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

    def candidate(self, params: Mapping[str, Any], g: int) -> Candidate:
        """Group ``g``'s candidate in a configuration."""
        return group_candidate(str(params[f"g{g}_op"]), float(params[f"g{g}_mix"]), float(params[f"g{g}_lam"]),
                               float(params[f"g{g}_density"]))

    def from_params(self, params: Mapping[str, Any]) -> LayerwiseRecipe:
        settings = tuple(self.candidate(params, g) for g in range(len(self.groups)))
        return LayerwiseRecipe(self.a, self.b, self.base, self.blocks, settings, self.seed)

    def uniform_params(self, candidate: Candidate) -> dict[str, Any]:
        """The parameters that apply ``candidate`` to every group (a fixed operator inside this space)."""
        mix, lam, density = group_parameters(candidate)
        out: dict[str, Any] = {}
        for g in range(len(self.groups)):
            out.update({f"g{g}_op": candidate.method, f"g{g}_mix": float(np.clip(mix, *MIX_RANGE)),
                        f"g{g}_lam": float(np.clip(lam, *LAMBDA_RANGE)),
                        f"g{g}_density": float(np.clip(density, *DENSITY_RANGE))})
        return out

    def feature_names(self) -> list[str]:
        names = []
        for g in range(len(self.groups)):
            names += [f"g{g}_is_{m}" for m in self.methods] + [f"g{g}_mix", f"g{g}_lam", f"g{g}_density"]
            names += [f"g{g}_coef_a", f"g{g}_coef_b", f"g{g}_coef_sum", f"g{g}_kept"]
        return names

    def encode(self, params: Mapping[str, Any]) -> np.ndarray:
        """Numeric vector of a configuration: per group the one-hot operator, the raw parameters and what they mean
        for the merged task vector (:func:`coefficients`, :func:`kept`)."""
        row: list[float] = []
        for g in range(len(self.groups)):
            candidate = self.candidate(params, g)
            ca, cb = coefficients(candidate)
            row += [float(params[f"g{g}_op"] == m) for m in self.methods]
            row += [*group_parameters(candidate), ca, cb, ca + cb, kept(candidate)]
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
        """mergekit's passthrough recipe: one single-layer slice per position, ``scale`` on o_proj / down_proj
        (model names, or the folders ``paths`` maps them to)."""
        slices = []
        for s in self.stack:
            source: dict[str, Any] = {"model": s.model, "layer_range": [int(s.layer), int(s.layer) + 1]}
            if s.scale != 1.0:
                source["parameters"] = {"scale": [*({"filter": f, "value": float(s.scale)} for f in RESIDUAL_OUTPUTS),
                                                  {"value": 1.0}]}
            slices.append({"sources": [source]})
        out = {"merge_method": "passthrough", "base_model": self.outer, "slices": slices, "dtype": "float32"}
        return map_model_names(out, lambda n: paths.get(n, n)) if paths else out

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
