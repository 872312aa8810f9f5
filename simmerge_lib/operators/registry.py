"""The operator registry: :class:`Operator` (one function plus everything the kit needs to use it), its
parameters (:class:`Param`), the :func:`operator` decorator, and the one operator × setting type
(:class:`Candidate`) with its keys and labels."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..kernels import BLOCK

Params = dict[str, Any]
OperatorFn = Callable[..., Tensor]

#: Traits an operator can have (the bandit's shared arm description, chapter 06).
TRAITS = ("interpolate", "spherical", "task_vector", "trim", "drop", "sign_elect")
#: Elements per block for element-wise passes (kept for callers of the former API).
CHUNK = BLOCK


class _Required:
    def __repr__(self) -> str:
        return "required"


#: Default of a parameter that a recipe must set.
REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Param:
    """One parameter of an operator.

    ``per_model``: set per input model (``models[i].parameters``) or once for the merge (``parameters``; a global
    setting of a per-model parameter is every model's default). ``range``: the interval searched by labels, search
    and bandit (None: not searched). ``default``: :data:`REQUIRED` when a recipe must set it, ``None`` for an
    optional setting with no value (passthrough's ``scale``)."""

    name: str
    kind: type
    default: Any = REQUIRED
    per_model: bool = False
    range: tuple[float, float] | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any) -> Any:
        """``value`` as this parameter's type (YAML ``1`` for a float, ``"1e-3"`` strings, ``true``)."""
        if value is None:
            return None
        if self.kind is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if self.kind is int:
            return int(value)
        return float(value)


@dataclass(frozen=True)
class Operator:
    """A registered merge operator (see :func:`operator`).

    ``fn(tensors, base, model_params, global_params, name, dtype)`` receives working copies it *owns* (it may
    overwrite them, which keeps peak memory near the size of its inputs) and returns the merged tensor.
    ``base`` is ``"required"`` (task-vector methods, SLERP), ``"optional"`` (NuSLERP) or ``"ignored"`` (linear,
    passthrough: every listed model is an input). ``min_models`` / ``max_models`` count the inputs besides the base.
    """

    name: str
    fn: OperatorFn
    base: str
    params: tuple[Param, ...] = ()
    min_models: int = 1
    max_models: int | None = None
    traits: tuple[str, ...] = ()
    grid: tuple[Mapping[str, Any], ...] = ()
    reference: str = ""
    #: ``identity(model_params, global_params)``: whether the operator returns its single input unchanged for these
    #: parameters (then the engine copies the stored tensor without a float32 working copy).
    identity: Callable[[list[Params], Params], bool] | None = None

    def __call__(self, tensors: list[Tensor], base: Tensor | None, model_params: list[Params],
                 global_params: Params, name: str = "", dtype: torch.dtype | None = None) -> Tensor:
        return self.fn(tensors, base, model_params, _with_defaults(self, global_params), name, dtype)

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip()

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    @property
    def accepts_base(self) -> bool:
        return self.base != "ignored"

    @property
    def model_params(self) -> dict[str, Any]:
        """Per-model parameters and their defaults (None: required or unset)."""
        return {p.name: (None if p.required else p.default) for p in self.params if p.per_model}

    @property
    def global_params(self) -> dict[str, Any]:
        """Global parameters and their defaults (None: required or unset)."""
        return {p.name: (None if p.required else p.default) for p in self.params if not p.per_model}

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def count_ok(self, n: int) -> bool:
        return n >= self.min_models and (self.max_models is None or n <= self.max_models)

    def count_text(self) -> str:
        if self.min_models == self.max_models:
            return f"exactly {self.min_models}"
        return f"at least {self.min_models}" + (f" and at most {self.max_models}" if self.max_models else "")


def _with_defaults(op: Operator, given: Mapping[str, Any]) -> Params:
    out = {p.name: p.default for p in op.params if not p.per_model and not p.required}
    out.update(given)
    return out


#: Registry of operators by name (mergekit's method names).
OPERATORS: dict[str, Operator] = {}


def operator(name: str, *, base: str, params: Sequence[Param] = (), min_models: int = 1,
             max_models: int | None = None, traits: Sequence[str] = (), grid: Sequence[Mapping[str, Any]] = (),
             reference: str = "", identity: Callable[[list[Params], Params], bool] | None = None
             ) -> Callable[[OperatorFn], OperatorFn]:
    """Decorator registering ``fn`` in :data:`OPERATORS` under ``name`` with everything the kit needs to use it:
    parameters, base policy, model counts, traits (:data:`TRAITS`) and the default label grid (order-free)."""

    def register(fn: OperatorFn) -> OperatorFn:
        if name in OPERATORS:
            raise ValueError(f"operator {name!r} is already registered")
        if base not in ("required", "optional", "ignored"):
            raise ValueError(f"operator {name!r}: base must be required, optional or ignored, got {base!r}")
        unknown = set(traits) - set(TRAITS)
        if unknown:
            raise ValueError(f"operator {name!r}: unknown traits {sorted(unknown)} (known: {TRAITS})")
        names = {p.name for p in params}
        for setting in grid:
            if set(setting) - names:
                raise ValueError(f"operator {name!r}: grid setting {dict(setting)} names unknown parameters")
        OPERATORS[name] = Operator(name, fn, base, tuple(params), min_models, max_models, tuple(traits),
                                   tuple(dict(s) for s in grid), reference, identity)
        return fn

    return register


def get_operator(name: str) -> Operator:
    """The operator called ``name``; a clear error listing the known ones otherwise."""
    try:
        return OPERATORS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r} (known: {', '.join(sorted(OPERATORS))})") from None


def default_grid(methods: Sequence[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Each operator's default label grid (copies): ``{method: [setting, ...]}`` for the operators that have one
    (passthrough has none: it is not a way to merge two experts)."""
    names = list(OPERATORS) if methods is None else list(methods)
    return {n: [dict(s) for s in get_operator(n).grid] for n in names if get_operator(n).grid}


def setting_label(setting: Mapping[str, Any]) -> str:
    """A short stable string for a grid point: keys sorted, numbers with ``%g`` (``density=0.2,weight=0.5``)."""
    def fmt(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    return ",".join(f"{k}={fmt(setting[k])}" for k in sorted(setting)) or "default"


def setting_parameters(label: str) -> dict[str, float]:
    """The parameters of a setting label, the inverse of :func:`setting_label` (``"density=0.2,weight=0.5"`` →
    ``{"density": 0.2, "weight": 0.5}``; ``"default"`` → ``{}``)."""
    if label in ("", "default"):
        return {}
    try:
        return {k: float(v) for k, v in (part.split("=", 1) for part in label.split(","))}
    except ValueError:
        raise ValueError(f"not a setting label: {label!r} (expected 'name=value,...')") from None


def candidate_key(method: Any, setting: Any) -> Any:
    """``method|setting-label``: a candidate's key in tables (element-wise for two Series of strings)."""
    return method + "|" + setting


@dataclass(frozen=True)
class Candidate:
    """A merge candidate: an operator at one setting of its parameters (one grid point, as in the labels table).

    The one operator × setting type of the kit: label grids, the predictor's candidates, the planner's step
    operators, the bandit's arms and the search's per-group choices are all candidates."""

    method: str
    params: tuple[tuple[str, float], ...] = ()

    @classmethod
    def make(cls, method: str, setting: Mapping[str, Any] | str | None = None) -> Candidate:
        """From a method and a setting: a dict, its JSON (the labels' ``parameters`` column) or a setting label."""
        if isinstance(setting, str):
            setting = (json.loads(setting) if setting.lstrip().startswith("{") else setting_parameters(setting)
                       ) if setting else {}
        return cls(method, tuple(sorted((str(k), float(v)) for k, v in dict(setting or {}).items())))

    @property
    def setting(self) -> dict[str, float]:
        return dict(self.params)

    @property
    def setting_label(self) -> str:
        return setting_label(self.setting)

    @property
    def key(self) -> str:
        """``method|setting-label`` (:func:`candidate_key`), e.g. ``ties|density=0.5``."""
        return candidate_key(self.method, self.setting_label)

    @property
    def label(self) -> str:
        """``method[setting-label]``, e.g. ``ties[density=0.5]``."""
        return f"{self.method}[{self.setting_label}]"


def param_range(method: str, name: str) -> tuple[float, float] | None:
    """The range searched for parameter ``name`` of ``method`` (None if it is not searched)."""
    return get_operator(method).param(name).range
