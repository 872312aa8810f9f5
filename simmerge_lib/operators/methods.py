"""The registered operators, each one function with its reference formula and its :func:`~.registry.operator`
declaration (parameters, base policy, model counts, traits, default label grid). Importing this module registers
them, in this order, in :data:`~.registry.OPERATORS`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..kernels import BLOCK, round_
from .registry import REQUIRED, OperatorFn, Param, Params, operator
from .sparsify import _blocks, _task_vector_merge, _task_vectors_

# --- parameter declarations shared by several operators -------------------------------------------------------
def _weight(default: Any = 1.0, rng: tuple[float, float] = (0.0, 2.0)) -> Param:
    # mergekit requires a weight; the kit's default of 1 keeps recipes written before the registry valid.
    return Param("weight", float, default, per_model=True, range=rng, doc="the model's weight w_i")


_DENSITY = Param("density", float, 1.0, per_model=True, range=(0.1, 1.0), doc="fraction of tau_i kept")
_LAMBDA = Param("lambda", float, 1.0, range=(0.3, 1.5), doc="scale of the merged task vector")
_INT8_MASK = Param("int8_mask", bool, False, doc="mergekit's memory hint for its sign mask; no effect on the result")
_SEED = Param("seed", int, 0, doc="seed of the random masks (with the tensor name and model index)")


def _normalize(default: bool) -> Param:
    return Param("normalize", bool, default, doc="divide by the (kept) weights' sum")


def _rescale(default: bool, how: str) -> Param:
    return Param("rescale", bool, default, doc=how)


def _task_vector_operator(sparsify: str | None, consensus: bool, doc: str) -> OperatorFn:
    """An operator of the generalized task arithmetic (:func:`~.sparsify._task_vector_merge`): tau_i sparsified per
    ``sparsify`` (None, ``magnitude``, ``dare``, ``outliers``, ``della``), combined with TIES's sign election when
    ``consensus``; ``doc`` is its formula."""

    def merge(tensors: list[Tensor], base: Tensor | None, params: list[Params], g: Params, name: str,
              dtype: torch.dtype | None = None) -> Tensor:
        assert base is not None
        return _task_vector_merge(tensors, base, params, g, name, dtype, sparsify=sparsify, consensus=consensus)

    merge.__doc__ = doc
    return merge


# --- operators ------------------------------------------------------------------------------------------------
@operator("linear", base="ignored", params=[_weight(1.0, (0.0, 1.0)), _normalize(True)],
          traits=("interpolate",), grid=[{"weight": 0.5}], reference="https://arxiv.org/abs/2203.05482")
def linear(tensors: list[Tensor], base: Tensor | None, params: list[Params], g: Params, name: str,
           dtype: torch.dtype | None = None) -> Tensor:
    """Weighted average: theta = sum_i w_i theta_i / sum_i w_i (the division only when ``normalize``); computed in
    float32 from inputs in the compute dtype, as mergekit does."""
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
    # norms and dot of float32 blocks summed in float64: one float32 sum over a 43M-element tensor is off by ~1e-6
    # relative, which nearly parallel tensors (fine-tunes of one base) turn into ~1e-4 errors of the result
    v0, v1 = v0.contiguous(), v1.contiguous()
    n0 = math.sqrt(_dot(v0, v0))
    n1 = math.sqrt(_dot(v1, v1))
    n0 = n0 if n0 > eps else 1.0
    n1 = n1 if n1 > eps else 1.0
    dot = _dot(v0, v1) / (n0 * n1) if v0.numel() else 1.0
    dot = min(1.0, max(-1.0, dot)) if math.isfinite(dot) else dot
    if not math.isfinite(dot) or abs(dot) > dot_threshold:
        c0, c1 = 1.0 - t, t
    else:
        omega = math.acos(dot)
        sin_omega = math.sin(omega)
        c0, c1 = math.sin((1 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega
    return v0.mul_(c0).add_(v1, alpha=c1)


@operator("slerp", base="required", params=[Param("t", float, REQUIRED, range=(0.0, 1.0),
                                                  doc="0 = the base, 1 = the other model")],
          min_models=1, max_models=1, traits=("interpolate", "spherical"), grid=[{"t": 0.5}],
          reference="https://en.wikipedia.org/wiki/Slerp")
def slerp(tensors: list[Tensor], base: Tensor | None, params: list[Params], g: Params, name: str,
          dtype: torch.dtype | None = None) -> Tensor:
    """SLERP from the base (t = 0) to the other model (t = 1); see :func:`slerp_tensors` (float32 compute)."""
    assert base is not None
    return slerp_tensors(float(g["t"]), base, tensors[0])


def nuslerp_tensors(t: float, v0: Tensor, v1: Tensor, dim: int | None = None, eps: float = 1e-8) -> Tensor:
    """SLERP of ``v0`` to ``v1`` over vectors along ``dim`` (None: the whole tensor is one vector), overwriting
    ``v0``: with u = v / max(|v|, 1e-7), cos Omega = <u0, u1>; theta = (sin((1-t) Omega) v0 + sin(t Omega) v1) /
    sin Omega, and (1-t) v0 + t v1 where 1 - cos^2 Omega <= eps^2 (colinear)."""
    if dim is None:  # statistics in float64, block by block: no full-size temporary
        n0 = max(math.sqrt(_dot(v0, v0)), 1e-7)
        n1 = max(math.sqrt(_dot(v1, v1)), 1e-7)
        cos = min(1.0, max(-1.0, _dot(v0, v1) / (n0 * n1)))
        if 1 - cos * cos <= eps ** 2:
            c0, c1 = 1 - t, t
        else:
            theta = math.acos(cos)
            c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
        return v0.mul_(c0).add_(v1, alpha=c1)
    a, b = v0.movedim(dim, -1), v1.movedim(dim, -1)
    n0 = torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_(min=1e-7)
    n1 = torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp_(min=1e-7)
    cos = ((a * b).sum(dim=-1, keepdim=True) / (n0 * n1)).clamp_(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.where(colinear, torch.ones_like(cos), torch.sin(theta))
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin_theta)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin_theta)
    a.mul_(c0).add_(b * c1)  # a is a view of v0
    return v0


def _dot(x: Tensor, y: Tensor) -> float:
    """<x, y>: float32 dot products of blocks, summed in float64 (no full-size temporary)."""
    return sum(float(torch.dot(a, b)) for a, b in zip(_blocks(x), _blocks(y)))


@operator("nuslerp", base="optional",
          params=[_weight(1.0, (0.0, 1.0)),
                  Param("nuslerp_flatten", bool, True, doc="the whole tensor is one vector"),
                  Param("nuslerp_row_wise", bool, False, doc="vectors along dim 0 (else along the last dim)")],
          min_models=2, max_models=2, traits=("interpolate", "spherical"), grid=[{"weight": 0.5}],
          reference="https://github.com/arcee-ai/mergekit")
def nuslerp(tensors: list[Tensor], base: Tensor | None, params: list[Params], g: Params, name: str,
            dtype: torch.dtype | None = None) -> Tensor:
    """NuSLERP: SLERP between two models at t = w_1 / (w_0 + w_1) (0.5 if the weights sum to 0): of the models
    themselves, or with a base of their task vectors, theta = theta_0 + slerp(t, tau_0, tau_1); see
    :func:`nuslerp_tensors` (``nuslerp_flatten``: one vector; else per row, or per column with ``row_wise``)."""
    w0, w1 = (float(p["weight"]) for p in params)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    dim = None if g["nuslerp_flatten"] else (0 if g["nuslerp_row_wise"] else -1)
    v0, v1 = tensors
    if base is not None:
        _task_vectors_(tensors, base, dtype)
        merged = nuslerp_tensors(t, v0, v1, dim)
        return base.add_(round_(merged, dtype))
    return nuslerp_tensors(t, v0, v1, dim)


task_arithmetic = operator("task_arithmetic", base="required",
                           params=[_weight(), _LAMBDA, _normalize(False), _INT8_MASK],
                           traits=("task_vector",), grid=[{"lambda": 0.8}, {"lambda": 1.0}],
                           reference="https://arxiv.org/abs/2212.04089")(_task_vector_operator(
    None, False,
    """theta = theta_0 + lambda * sum_i w_i tau_i with tau_i = theta_i - theta_0 (divided by sum_i w_i when
    ``normalize``)."""))


ties = operator("ties", base="required",
                params=[_weight(), _DENSITY, _LAMBDA, _normalize(True),
                        _rescale(False, "match each trimmed tau_i's L1 norm to the untrimmed one"), _INT8_MASK],
                traits=("task_vector", "trim", "sign_elect"), grid=[{"density": 0.2}, {"density": 0.5}],
                reference="https://arxiv.org/abs/2306.01708")(_task_vector_operator(
    "magnitude", True,
    """TIES: tau_i trimmed to its top-``density`` magnitudes (:func:`trim_`), d_i = w_i tau_i; elect
    sign* = sign(sum_i d_i); theta = theta_0 + lambda * sum_i [sign d_i = sign*] d_i / sum_i [sign d_i = sign*] w_i
    (disjoint mean; without ``normalize`` no division)."""))


_DARE_PARAMS = [_weight(), _DENSITY, _LAMBDA, _normalize(False),
                _rescale(True, "survivors times 1/density"), _SEED, _INT8_MASK]


dare_linear = operator("dare_linear", base="required", params=_DARE_PARAMS, traits=("task_vector", "drop"),
                       grid=[{"density": 0.5}], reference="https://arxiv.org/abs/2311.03099")(_task_vector_operator(
    "dare", False,
    """DARE + task arithmetic: drop each entry of tau_i with p = 1 - density, rescale survivors by 1/(1-p)
    (``rescale``), then theta = theta_0 + lambda * sum_i w_i tau_i (/ sum_i w_i when ``normalize``).
    Randomness is seeded by (``seed``, tensor name, model index)."""))


dare_ties = operator("dare_ties", base="required", params=_DARE_PARAMS, traits=("task_vector", "drop", "sign_elect"),
                     grid=[{"density": 0.5}], reference="https://arxiv.org/abs/2311.03099")(_task_vector_operator(
    "dare", True,
    """DARE + TIES: tau_i' = m_i * tau_i / (1-p) with m_i ~ Bernoulli(1-p) (as in dare_linear), d_i = w_i tau_i';
    sign* = sign(sum_i d_i); theta = theta_0 + lambda * sum_i [sign d_i = sign*] d_i (/ sum of kept w_i when
    ``normalize``)."""))


_GAMMA = Param("gamma", float, 0.01, per_model=True, range=(0.0, 0.05), doc="fraction of largest entries dropped")
_BREADCRUMBS_PARAMS = [_weight(), _DENSITY, _GAMMA, _LAMBDA, _normalize(False),
                       _rescale(False, "match each trimmed tau_i's L1 norm to the untrimmed one"), _INT8_MASK]
_BREADCRUMBS_GRID = [{"density": 0.5, "gamma": 0.01}, {"density": 0.9, "gamma": 0.01}]


breadcrumbs = operator("breadcrumbs", base="required", params=_BREADCRUMBS_PARAMS, traits=("task_vector", "trim"),
                       grid=_BREADCRUMBS_GRID, reference="https://arxiv.org/abs/2312.06795")(_task_vector_operator(
    "outliers", False,
    """Model Breadcrumbs: tau_i loses its ``gamma`` largest magnitudes (outliers) and its smallest ones, keeping
    ``density`` of its entries (:func:`outlier_trim_`); theta = theta_0 + lambda * sum_i w_i tau_i (/ sum_i w_i when
    ``normalize``)."""))


breadcrumbs_ties = operator("breadcrumbs_ties", base="required", params=_BREADCRUMBS_PARAMS,
                            traits=("task_vector", "trim", "sign_elect"), grid=_BREADCRUMBS_GRID,
                            reference="https://arxiv.org/abs/2312.06795")(_task_vector_operator(
    "outliers", True,
    """Model Breadcrumbs' trim (:func:`outlier_trim_`) with TIES's sign election: d_i = w_i tau_i;
    sign* = sign(sum_i d_i); theta = theta_0 + lambda * sum_i [sign d_i = sign*] d_i (/ sum of kept w_i when
    ``normalize``)."""))


_EPSILON = Param("epsilon", float, 0.15, per_model=True, range=(0.01, 0.2),
                 doc="keep probabilities span density +- epsilon")


def _della_params(normalize: bool) -> list[Param]:
    return [_weight(), _DENSITY, _EPSILON, _LAMBDA, _normalize(normalize),
            _rescale(True, "match each pruned tau_i's L1 norm to the unpruned one"), _SEED, _INT8_MASK]


_DELLA_GRID = [{"density": 0.3, "epsilon": 0.1}, {"density": 0.5, "epsilon": 0.15}]


della = operator("della", base="required", params=_della_params(True), traits=("task_vector", "drop", "sign_elect"),
                 grid=_DELLA_GRID, reference="https://arxiv.org/abs/2406.11617")(_task_vector_operator(
    "della", True,
    """DELLA: tau_i pruned by MagPrune (:func:`della_`: entry of magnitude rank r in its row kept with probability
    density - epsilon + 2 epsilon r / (L-1)), rescaled to its L1 norm (``rescale``); d_i = w_i tau_i;
    sign* = sign(sum_i d_i); theta = theta_0 + lambda * sum_i [sign d_i = sign*] d_i / sum of kept w_i
    (``normalize``). Randomness is seeded by (``seed``, tensor name, model index)."""))


della_linear = operator("della_linear", base="required", params=_della_params(False), traits=("task_vector", "drop"),
                        grid=_DELLA_GRID, reference="https://arxiv.org/abs/2406.11617")(_task_vector_operator(
    "della", False,
    """DELLA without the sign election: tau_i pruned by MagPrune (:func:`della_`) and L1-rescaled (``rescale``);
    theta = theta_0 + lambda * sum_i w_i tau_i (/ sum_i w_i when ``normalize``)."""))


@operator("model_stock", base="required",
          params=[Param("filter_wise", bool, False, doc="one ratio per row instead of per tensor")],
          min_models=2, traits=("interpolate", "task_vector"), grid=[{}],
          reference="https://arxiv.org/abs/2403.19522")
def model_stock(tensors: list[Tensor], base: Tensor | None, params: list[Params], g: Params, name: str,
                dtype: torch.dtype | None = None) -> Tensor:
    """Model Stock: with N models and cos = the mean pairwise cosine of their task vectors tau_i (per tensor, or
    per row when ``filter_wise``), t = N cos / (1 + (N-1) cos) (0 where the denominator vanishes) and
    theta = t * mean_i theta_i + (1 - t) * theta_0: the closer the fine-tunes agree, the further from the base."""
    assert base is not None
    n = len(tensors)
    shape = base.shape
    width = shape[-1] if (g["filter_wise"] and base.dim() > 1) else base.numel()
    rows = [x.reshape(-1, width) for x in (*tensors, base)]
    # Gram statistics of the task vectors in float64, a chunk of rows at a time (no full-size temporaries)
    n_rows = rows[0].shape[0]
    dots = torch.zeros(n, n, n_rows, dtype=torch.float64)
    step = max(1, BLOCK // max(1, width)) if width < BLOCK else 1
    for start in range(0, n_rows, step):
        b = rows[n][start:start + step]
        for cols in _col_chunks(width):
            taus = [round_(x[start:start + step, cols] - b[:, cols], dtype).double() for x in rows[:n]]
            for i in range(n):
                for j in range(i, n):
                    dots[i, j, start:start + step] += (taus[i] * taus[j]).sum(dim=1)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            norms = dots[i, i].sqrt() * dots[j, j].sqrt()
            cosines.append((dots[i, j] / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    n * cos / torch.where(singular, torch.ones_like(cos), denominator)).to(base.dtype)
    round_(t, dtype)
    average = tensors[0]
    for x in tensors[1:]:
        average.add_(x)
    round_(average.div_(n), dtype)
    out = rows[n]
    out.mul_(1 - t).add_(average.reshape(-1, width).mul_(t))
    return base


def _col_chunks(width: int) -> list[slice]:
    return [slice(s, min(width, s + BLOCK)) for s in range(0, width, BLOCK)]


@operator("passthrough", base="ignored",
          params=[Param("scale", float, None, per_model=True, doc="multiply the tensor by this (none: copy)")],
          min_models=1, max_models=1, reference="https://github.com/arcee-ai/mergekit",
          identity=lambda params, g: params[0].get("scale") is None)
def passthrough(tensors: list[Tensor], base: Tensor | None, params: list[Params], g: Params, name: str,
                dtype: torch.dtype | None = None) -> Tensor:
    """theta = theta_1 (times ``scale`` when set): copies one model's tensor, which with ``slices`` stacks layers
    of several models (a "frankenmerge")."""
    scale = params[0].get("scale")
    return tensors[0] if scale is None else tensors[0].mul_(float(scale))
