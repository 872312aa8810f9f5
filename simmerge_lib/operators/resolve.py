"""Parameter resolution with mergekit's semantics (scalars, gradients over the layers, filters; a model's own
settings before its slice's before the recipe's), and applying an operator to one tensor or to whole state dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import LAYER_PATTERN, layer_index
from .registry import REQUIRED, Operator, Param, Params, get_operator


def with_layer(name: str, layer: int) -> str:
    """``name`` with its decoder layer index replaced (``model.layers.3.mlp`` -> ``model.layers.7.mlp``)."""
    match = LAYER_PATTERN.search(name)
    if match is None:
        raise ValueError(f"tensor {name!r} is not inside a decoder layer")
    return name[:match.start(1)] + str(layer) + name[match.end(1):]


def layer_t(name: str, layer_count: int | None) -> float:
    """Position used to interpolate gradients: layer / (n_layers - 1) inside layers (1 if one layer), else 0."""
    idx = layer_index(name)
    if idx is None or not layer_count:
        return 0.0
    return idx / (layer_count - 1) if layer_count > 1 else 1.0


def _validate(value: Any, default: Any) -> Any:
    if isinstance(default, Param):
        return default.coerce(value)
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int) and not isinstance(default, bool):
        return int(value)
    return float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else value


def evaluate_setting(setting: Any, name: str, t: float, default: Any = None) -> Any:
    """Resolve one parameter setting (scalar, gradient list, filter dict or list of filter dicts) for a tensor.

    Gradient: with s = t (len - 1), i = floor(s): value = (1 - (s - i)) v_i + (s - i) v_{i+1}. Returns None when
    no filter matches (the next, lower-precedence source is then consulted). ``default`` (a value or a
    :class:`Param`) gives the type values are converted to.
    """
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return _validate(setting, default)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(v, (bool, int, float, str)) for v in setting):
            values = [_validate(v, default) for v in setting]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return _validate((1 - frac) * values[i0] + frac * values[i1], default)
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (name and flt in name):
                return evaluate_setting(cond["value"], name, t, default)
        return None
    raise ValueError(f"unexpected parameter setting {setting!r}")


def resolve(names_defaults: Mapping[str, Any] | Sequence[Param], sources: Sequence[Mapping[str, Any] | None],
            name: str, t: float) -> Params:
    """Each parameter's value for tensor ``name``: the first source (highest precedence first) that sets it,
    else its default. ``names_defaults`` maps names to defaults (None means required) or lists :class:`Param`."""
    specs = (list(names_defaults) if not isinstance(names_defaults, Mapping)
             else [Param(k, type(v) if v is not None else float, REQUIRED if v is None else v)
                   for k, v in names_defaults.items()])
    out: Params = {}
    for spec in specs:
        value = None
        for src in sources:
            if src and spec.name in src:
                value = evaluate_setting(src[spec.name], name, t, spec)
                if value is not None:
                    break
        if value is None:
            if spec.required:
                raise ValueError(f"parameter {spec.name!r} is required (tensor {name!r})")
            value = spec.default
        out[spec.name] = value
    return out


def merge_tensor(op: Operator, name: str, tensors: list[Tensor], base: Tensor | None,
                 model_settings: Sequence[Mapping[str, Any] | None], global_settings: Mapping[str, Any] | None,
                 t: float, *, dtype: torch.dtype | None = None, input_names: Sequence[str] | None = None,
                 slice_settings: Mapping[str, Any] | None = None) -> Tensor:
    """Resolve parameters for one tensor and apply ``op`` to owned working copies (shared by both paths).

    Precedence as in mergekit: a model's parameters come from its own settings, then its slice's, then the
    recipe's global ones, evaluated on the model's *input* tensor name (``input_names[i]``); the merge's global
    parameters from the slice's, then the recipe's, on the output name. ``dtype`` is the compute dtype (None: the
    working copies' own); the result is not yet rounded to it (the caller does, then casts to the output dtype)."""
    tensors = [x.contiguous() for x in tensors]  # block-wise passes use flat views
    base = base.contiguous() if base is not None else None
    params, glob = resolve_params(op, name, model_settings, global_settings, t, input_names, slice_settings)
    return op.fn(tensors, base, params, glob, name, dtype)


def resolve_params(op: Operator, name: str, model_settings: Sequence[Mapping[str, Any] | None],
                   global_settings: Mapping[str, Any] | None, t: float, input_names: Sequence[str] | None = None,
                   slice_settings: Mapping[str, Any] | None = None) -> tuple[list[Params], Params]:
    """(each input's parameters, the global parameters) of ``op`` for tensor ``name``, with :func:`merge_tensor`'s
    precedence."""
    model_specs = [p for p in op.params if p.per_model]
    global_specs = [p for p in op.params if not p.per_model]
    names = list(input_names) if input_names is not None else [name] * len(model_settings)
    params = [resolve(model_specs, [s, slice_settings, global_settings], n, t) for s, n in zip(model_settings, names)]
    return params, resolve(global_specs, [slice_settings, global_settings], name, t)


def infer_layer_count(names: Sequence[str]) -> int | None:
    """Number of decoder layers seen in tensor names (max index + 1), None if there are none."""
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else None


def check_inputs(method: str, n_models: int, has_base: bool) -> Operator:
    """The operator, after checking the number of models and the presence of a base."""
    op = get_operator(method)
    if op.needs_base and not has_base:
        raise ValueError(f"{method}: needs a base model")
    if not op.count_ok(n_models):
        raise ValueError(f"{method}: needs {op.count_text()} model(s) besides the base, got {n_models}")
    return op


def work_dtype(compute: torch.dtype) -> torch.dtype:
    """Dtype of the working copies for a merge computed in ``compute``: float64 for float64, else float32."""
    return torch.float64 if compute == torch.float64 else torch.float32


def compute_dtype(given: torch.dtype | None, inputs: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype a tensor's merge is computed in: the recipe's ``dtype``, else the inputs' common (promoted) dtype,
    as in mergekit."""
    if given is not None:
        return given
    out = inputs[0]
    for d in inputs[1:]:
        out = torch.promote_types(out, d)
    return out


def merge_state_dicts(method: str, models: list[dict[str, Tensor]], base: dict[str, Tensor] | None,
                      parameters: list[dict] | None = None, global_parameters: dict | None = None,
                      layer_count: int | None = None, out_dtype: torch.dtype | None = None,
                      dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Merge state dicts held in memory (small models): the same operator code as the streaming engine.

    ``models`` are the inputs besides the base (for ``linear`` the base is not averaged in: list it in ``models``
    to include it); ``parameters[i]`` are model i's settings, ``global_parameters`` the recipe-level ones (both
    may hold gradients and filters). ``layer_count`` defaults to the layer indices found in tensor names.
    Tensors that are not floating point are copied from the base (or the first model). ``dtype``: the compute dtype
    (default: the inputs' own, promoted); output dtype: ``out_dtype``, else the compute dtype.
    """
    op = check_inputs(method, len(models), base is not None)
    parameters = parameters if parameters is not None else [{} for _ in models]
    if len(parameters) != len(models):
        raise ValueError(f"{method}: {len(parameters)} parameter sets for {len(models)} models")
    reference = base if base is not None else models[0]
    if layer_count is None:
        layer_count = infer_layer_count(list(reference))
    use_base = base is not None and op.accepts_base
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, ref in reference.items():
            inputs = []
            for i, sd in enumerate(models):
                if name not in sd:
                    raise ValueError(f"{method}: tensor {name!r} missing from model {i}")
                if sd[name].shape != ref.shape:
                    raise ValueError(f"{method}: tensor {name!r} has shape {tuple(sd[name].shape)} in model {i}, "
                                     f"{tuple(ref.shape)} in the reference")
                inputs.append(sd[name])
            if not ref.is_floating_point():
                out[name] = ref.clone()
                continue
            stored = [x.dtype for x in inputs] + ([base[name].dtype] if use_base else [])
            compute = compute_dtype(dtype, stored)
            work = work_dtype(compute)
            tensors = [x.to(compute).to(work, copy=True) for x in inputs]
            base_t = base[name].to(compute).to(work, copy=True) if use_base else None
            merged = merge_tensor(op, name, tensors, base_t, parameters, global_parameters,
                                  layer_t(name, layer_count), dtype=compute)
            out[name] = merged.to(compute).to(out_dtype or compute)
    return out
