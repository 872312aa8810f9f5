"""Merge operators (chapter 02): tensor-wise functions over the stack of one tensor from every input model.

Every operator sees, for one tensor name, the float32 working copies of that tensor in each input model (and the
base model's, for the methods that need one), the parameters resolved for that tensor, and returns the merged
float32 tensor. The same functions serve the in-memory path (:func:`merge_state_dicts`, small models, many merges)
and the streaming engine (:mod:`simmerge_lib.engine`, one tensor at a time from disk).

Parameters follow mergekit's recipe semantics so that a recipe means the same in both tools:

- a scalar (``weight: 0.5``);
- a *gradient*: a list of numbers interpolated across the decoder layers, ``t = layer / (n_layers - 1)`` for
  tensors inside layer ``layer`` and ``t = 0`` for the others (embeddings, final norm, head);
- a *filter*: ``{filter: "self_attn", value: ...}`` (or a list of them, first match wins; a filter matches when
  it is a substring of the tensor name, and a missing filter or ``"*"`` matches everything).

A model's own parameters take precedence over the recipe's global ones. Adding an operator is one function and one
decorator line (:func:`operator`).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

#: One tensor's parameters: name -> resolved scalar value.
Params = dict[str, Any]
OperatorFn = Callable[[list[Tensor], "Tensor | None", list[Params], Params, str], Tensor]

_LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class Operator:
    """A registered merge operator.

    ``fn(tensors, base, model_params, global_params, name)`` receives float32 working copies it *owns* (it may
    overwrite them, which keeps peak memory near the size of its inputs) and returns the merged float32 tensor.
    ``model_params`` / ``global_params`` map each accepted parameter to its default.
    """

    name: str
    fn: OperatorFn
    needs_base: bool
    model_params: Mapping[str, Any] = field(default_factory=dict)
    global_params: Mapping[str, Any] = field(default_factory=dict)
    min_models: int = 1
    max_models: int | None = None
    reference: str = ""

    def __call__(self, tensors: list[Tensor], base: Tensor | None, model_params: list[Params],
                 global_params: Params, name: str = "") -> Tensor:
        return self.fn(tensors, base, model_params, global_params, name)

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip()


#: Registry of operators by name (mergekit's method names).
OPERATORS: dict[str, Operator] = {}


def operator(name: str, *, needs_base: bool, model_params: Mapping[str, Any] | None = None,
             global_params: Mapping[str, Any] | None = None, min_models: int = 1, max_models: int | None = None,
             reference: str = "") -> Callable[[OperatorFn], OperatorFn]:
    """Decorator registering ``fn`` in :data:`OPERATORS` under ``name``."""

    def register(fn: OperatorFn) -> OperatorFn:
        if name in OPERATORS:
            raise ValueError(f"operator {name!r} is already registered")
        OPERATORS[name] = Operator(name, fn, needs_base, dict(model_params or {}), dict(global_params or {}),
                                   min_models, max_models, reference)
        return fn

    return register


def get_operator(name: str) -> Operator:
    """The operator called ``name``; a clear error listing the known ones otherwise."""
    try:
        return OPERATORS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r} (known: {', '.join(sorted(OPERATORS))})") from None


# --- building blocks ------------------------------------------------------------------------------------------
def _tensor_seed(seed: int, name: str, index: int) -> int:
    # Each (tensor, model) gets its own stream, so results do not depend on thread scheduling or tensor order.
    return zlib.crc32(f"{int(seed)}:{name}:{index}".encode())


#: Elements per block for element-wise passes: temporaries stay small and in cache whatever the tensor size.
CHUNK = 1 << 20


def _blocks(t: Tensor) -> tuple[Tensor, ...]:
    return t.view(-1).split(CHUNK)


def trim_(tau: Tensor, density: float) -> Tensor:
    """Keep the ``k = max(1, int(density * n))`` largest magnitudes of ``tau`` (in place), zero the rest.

    The threshold is the k-th largest |tau| found by selection (O(n), no full sort); entries tied with it are kept.
    """
    n = tau.numel()
    if density >= 1 or n == 0:
        return tau
    if density <= 0:
        return tau.zero_()
    k = max(1, int(density * n))
    scratch = tau.abs().reshape(-1)
    if scratch.device.type == "cpu":
        # numpy's in-place introselect needs no index tensor (torch.kthvalue allocates 2 int64 copies).
        flat = scratch.numpy()
        flat.partition(n - k)
        threshold = float(flat[n - k])
    else:
        threshold = float(torch.kthvalue(scratch, n - k + 1).values)
    del scratch
    for block in _blocks(tau):
        block.masked_fill_(block.abs() < threshold, 0)
    return tau


def dare_(tau: Tensor, density: float, rescale: bool, seed: int, name: str, index: int) -> Tensor:
    """Drop each entry of ``tau`` with probability ``p = 1 - density`` (in place); survivors times 1/(1-p)."""
    if density >= 1:
        return tau
    if density <= 0:
        return tau.zero_()
    gen = torch.Generator(device=tau.device).manual_seed(_tensor_seed(seed, name, index))
    for block in _blocks(tau):
        block.mul_(torch.empty_like(block).bernoulli_(density, generator=gen))
    if rescale:
        tau.div_(density)
    return tau


def _task_vectors_(tensors: list[Tensor], base: Tensor) -> list[Tensor]:
    for x in tensors:
        x.sub_(base)
    return tensors


def _consensus_merge(deltas: list[Tensor], weights: list[float], normalize: bool) -> Tensor:
    """TIES sign election and disjoint (weighted) mean of already weighted deltas ``d_i = w_i tau_i``.

    sign* = sign(sum_i d_i) (0 counts as +); keep d_i where sign(d_i) = sign*; mean = sum kept d_i / sum kept w_i.
    Works block by block and writes the result over ``deltas[0]`` (no full-size temporaries).
    """
    same_weight = all(w == weights[0] for w in weights) and len(deltas) < 256
    for ds in zip(*(_blocks(d) for d in deltas)):
        total = ds[0].clone()
        for d in ds[1:]:
            total.add_(d)
        positive = total >= 0
        total.zero_()
        # With equal weights the divisor is w * (number of agreeing models): a small integer count.
        divisor = torch.zeros(total.shape, dtype=torch.uint8 if same_weight else total.dtype,
                              device=total.device) if normalize else None
        for d, w in zip(ds, weights):
            agree = torch.where(positive, d > 0, d < 0)
            total.add_(d * agree)  # multiplying (not masked_fill) keeps a NaN visible
            if divisor is not None:
                if same_weight:
                    divisor.add_(agree)
                else:
                    divisor.add_(agree, alpha=w)
        if divisor is not None:
            if same_weight:
                total.div_(weights[0] if weights[0] != 0 else 1.0)
            divisor.masked_fill_(divisor == 0, 1)
            total.div_(divisor)
        ds[0].copy_(total)
    return deltas[0]


# --- operators ------------------------------------------------------------------------------------------------
@operator("linear", needs_base=False, model_params={"weight": 1.0}, global_params={"normalize": True},
          reference="https://arxiv.org/abs/2203.05482")
def linear(tensors: list[Tensor], base: Tensor | None, params: list[Params], g: Params, name: str) -> Tensor:
    """Weighted average: theta = sum_i w_i theta_i / sum_i w_i (the division only when ``normalize``)."""
    weights = [float(p["weight"]) for p in params]
    out = tensors[0].mul_(weights[0])
    for x, w in zip(tensors[1:], weights[1:]):
        out.add_(x, alpha=w)
    if g["normalize"]:
        out.div_(sum(weights))
    return out


def slerp_tensors(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of two whole tensors (overwrites ``v0``).

    d = <v0/|v0|, v1/|v1|>; if |d| > 0.9995 (nearly parallel) theta = (1-t) v0 + t v1, else with Omega = arccos d:
    theta = sin((1-t) Omega)/sin Omega * v0 + sin(t Omega)/sin Omega * v1 (the unnormalized tensors).
    """
    n0 = float(torch.linalg.vector_norm(v0))
    n1 = float(torch.linalg.vector_norm(v1))
    n0 = n0 if n0 > eps else 1.0
    n1 = n1 if n1 > eps else 1.0
    dot = float(torch.linalg.vecdot(v0.reshape(-1), v1.reshape(-1))) / (n0 * n1) if v0.numel() else 1.0
    dot = min(1.0, max(-1.0, dot)) if math.isfinite(dot) else dot
    if not math.isfinite(dot) or abs(dot) > dot_threshold:
        c0, c1 = 1.0 - t, t
    else:
        omega = math.acos(dot)
        sin_omega = math.sin(omega)
        c0, c1 = math.sin((1 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega
    return v0.mul_(c0).add_(v1, alpha=c1)


@operator("slerp", needs_base=True, global_params={"t": None}, min_models=1, max_models=1,
          reference="https://en.wikipedia.org/wiki/Slerp")
def slerp(tensors: list[Tensor], base: Tensor | None, params: list[Params], g: Params, name: str) -> Tensor:
    """SLERP from the base (t = 0) to the other model (t = 1); see :func:`slerp_tensors`."""
    assert base is not None
    return slerp_tensors(float(g["t"]), base, tensors[0])


@operator("task_arithmetic", needs_base=True, model_params={"weight": 1.0},
          global_params={"lambda": 1.0, "normalize": False}, reference="https://arxiv.org/abs/2212.04089")
def task_arithmetic(tensors: list[Tensor], base: Tensor | None, params: list[Params], g: Params,
                    name: str) -> Tensor:
    """theta = theta_0 + lambda * sum_i w_i tau_i with tau_i = theta_i - theta_0 (divided by sum_i w_i when
    ``normalize``)."""
    assert base is not None
    weights = [float(p["weight"]) for p in params]
    taus = _task_vectors_(tensors, base)
    mixed = taus[0].mul_(weights[0])
    for tau, w in zip(taus[1:], weights[1:]):
        mixed.add_(tau, alpha=w)
    if g["normalize"]:
        total = sum(weights)
        mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    return base.add_(mixed, alpha=float(g["lambda"]))


def _sparse_task_merge(tensors: list[Tensor], base: Tensor, params: list[Params], g: Params, name: str, *,
                       sparsify: str, consensus: bool) -> Tensor:
    weights = [float(p["weight"]) for p in params]
    deltas = _task_vectors_(tensors, base)
    for i, (tau, p) in enumerate(zip(deltas, params)):
        if sparsify == "magnitude":
            trim_(tau, float(p["density"]))
        else:
            dare_(tau, float(p["density"]), bool(g["rescale"]), int(g["seed"]), name, i)
        tau.mul_(weights[i])
    if consensus:
        mixed = _consensus_merge(deltas, weights, bool(g["normalize"]))
    else:
        mixed = deltas[0]
        for d in deltas[1:]:
            mixed.add_(d)
        if g["normalize"]:
            total = sum(weights)
            mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    del deltas
    return base.add_(mixed, alpha=float(g["lambda"]))


@operator("ties", needs_base=True, model_params={"weight": 1.0, "density": 1.0},
          global_params={"lambda": 1.0, "normalize": True, "int8_mask": False},
          reference="https://arxiv.org/abs/2306.01708")
def ties(tensors: list[Tensor], base: Tensor | None, params: list[Params], g: Params, name: str) -> Tensor:
    """TIES: tau_i trimmed to its top-``density`` magnitudes, d_i = w_i tau_i; elect sign* = sign(sum_i d_i);
    theta = theta_0 + lambda * sum_i [sign d_i = sign*] d_i / sum_i [sign d_i = sign*] w_i (disjoint mean)."""
    assert base is not None
    return _sparse_task_merge(tensors, base, params, g, name, sparsify="magnitude", consensus=True)


@operator("dare_linear", needs_base=True, model_params={"weight": 1.0, "density": 1.0},
          global_params={"lambda": 1.0, "normalize": False, "rescale": True, "seed": 0},
          reference="https://arxiv.org/abs/2311.03099")
def dare_linear(tensors: list[Tensor], base: Tensor | None, params: list[Params], g: Params, name: str) -> Tensor:
    """DARE + task arithmetic: drop each entry of tau_i with p = 1 - density, rescale survivors by 1/(1-p)
    (``rescale``), then theta = theta_0 + lambda * sum_i w_i tau_i (/ sum_i w_i when ``normalize``).
    Randomness is seeded by (``seed``, tensor name, model index)."""
    assert base is not None
    return _sparse_task_merge(tensors, base, params, g, name, sparsify="dare", consensus=False)


@operator("dare_ties", needs_base=True, model_params={"weight": 1.0, "density": 1.0},
          global_params={"lambda": 1.0, "normalize": False, "rescale": True, "seed": 0, "int8_mask": False},
          reference="https://arxiv.org/abs/2311.03099")
def dare_ties(tensors: list[Tensor], base: Tensor | None, params: list[Params], g: Params, name: str) -> Tensor:
    """DARE + TIES: tau_i' = m_i * tau_i / (1-p) with m_i ~ Bernoulli(1-p) (as in dare_linear), d_i = w_i tau_i';
    sign* = sign(sum_i d_i); theta = theta_0 + lambda * sum_i [sign d_i = sign*] d_i (/ sum of kept w_i when
    ``normalize``)."""
    assert base is not None
    return _sparse_task_merge(tensors, base, params, g, name, sparsify="dare", consensus=True)


# --- parameter resolution (mergekit semantics) ----------------------------------------------------------------
def layer_index(name: str) -> int | None:
    """Decoder layer of a tensor name (``model.layers.3.mlp...`` -> 3), None outside the layers."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def layer_t(name: str, layer_count: int | None) -> float:
    """Position used to interpolate gradients: layer / (n_layers - 1) inside layers (1 if one layer), else 0."""
    idx = layer_index(name)
    if idx is None or not layer_count:
        return 0.0
    return idx / (layer_count - 1) if layer_count > 1 else 1.0


def _validate(value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int) and not isinstance(default, bool):
        return int(value)
    return float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else value


def evaluate_setting(setting: Any, name: str, t: float, default: Any = None) -> Any:
    """Resolve one parameter setting (scalar, gradient list, filter dict or list of filter dicts) for a tensor.

    Gradient: with s = t (len - 1), i = floor(s): value = (1 - (s - i)) v_i + (s - i) v_{i+1}. Returns None when
    no filter matches (the next, lower-precedence source is then consulted).
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


def resolve(names_defaults: Mapping[str, Any], sources: Sequence[Mapping[str, Any] | None], name: str,
            t: float) -> Params:
    """Each parameter's value for tensor ``name``: the first source (highest precedence first) that sets it,
    else its default. A default of None means required."""
    out: Params = {}
    for key, default in names_defaults.items():
        value = None
        for src in sources:
            if src and key in src:
                value = evaluate_setting(src[key], name, t, default)
                if value is not None:
                    break
        if value is None:
            if default is None:
                raise ValueError(f"parameter {key!r} is required (tensor {name!r})")
            value = default
        out[key] = value
    return out


def merge_tensor(op: Operator, name: str, tensors: list[Tensor], base: Tensor | None,
                 model_settings: Sequence[Mapping[str, Any] | None], global_settings: Mapping[str, Any] | None,
                 t: float) -> Tensor:
    """Resolve parameters for one tensor and apply ``op`` to owned float32 copies (shared by both paths)."""
    tensors = [x.contiguous() for x in tensors]  # block-wise passes use flat views
    base = base.contiguous() if base is not None else None
    params = [resolve(op.model_params, [s, global_settings], name, t) for s in model_settings]
    glob = resolve(op.global_params, [global_settings], name, t)
    return op(tensors, base, params, glob, name)


def infer_layer_count(names: Sequence[str]) -> int | None:
    """Number of decoder layers seen in tensor names (max index + 1), None if there are none."""
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else None


def check_inputs(method: str, n_models: int, has_base: bool) -> Operator:
    """The operator, after checking the number of models and the presence of a base."""
    op = get_operator(method)
    if op.needs_base and not has_base:
        raise ValueError(f"{method}: needs a base model")
    if n_models < op.min_models or (op.max_models is not None and n_models > op.max_models):
        want = f"exactly {op.min_models}" if op.min_models == op.max_models else f"at least {op.min_models}"
        raise ValueError(f"{method}: needs {want} model(s) besides the base, got {n_models}")
    return op


def merge_state_dicts(method: str, models: list[dict[str, Tensor]], base: dict[str, Tensor] | None,
                      parameters: list[dict] | None = None, global_parameters: dict | None = None,
                      layer_count: int | None = None, out_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Merge state dicts held in memory (small models): the same operator code as the streaming engine.

    ``models`` are the inputs besides the base (for ``linear`` the base is not averaged in: list it in ``models``
    to include it); ``parameters[i]`` are model i's settings, ``global_parameters`` the recipe-level ones (both
    may hold gradients and filters). ``layer_count`` defaults to the layer indices found in tensor names.
    Tensors that are not floating point are copied from the base (or the first model). Output dtype: the
    reference tensor's unless ``out_dtype``.
    """
    op = check_inputs(method, len(models), base is not None)
    parameters = parameters if parameters is not None else [{} for _ in models]
    if len(parameters) != len(models):
        raise ValueError(f"{method}: {len(parameters)} parameter sets for {len(models)} models")
    reference = base if base is not None else models[0]
    if layer_count is None:
        layer_count = infer_layer_count(list(reference))
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
            dtype = out_dtype or ref.dtype
            if not ref.is_floating_point():
                out[name] = ref.clone()
                continue
            work = [x.to(torch.float32, copy=True) for x in inputs]
            base_t = base[name].to(torch.float32, copy=True) if (base is not None and op.needs_base) else None
            merged = merge_tensor(op, name, work, base_t, parameters, global_parameters,
                                  layer_t(name, layer_count))
            out[name] = merged.to(dtype)
    return out
