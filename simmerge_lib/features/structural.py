"""The structural ``st_*`` features: how the task vectors ``tau_a = theta_a - theta_base_a`` and
``tau_b = theta_b - theta_base_b`` relate, streamed one tensor at a time from the four checkpoints.

Per tensor, :func:`_tensor_acc` sums in float64 the quantities every feature is a ratio of (dot products, squared
norms, sign and TIES-mask counts, :class:`_Acc`); sums are added per tensor group (:func:`~simmerge_lib.checkpoint.
tensor_group`), per third of the depth and per block (:func:`~simmerge_lib.checkpoint.layer_index`). What TIES
keeps is counted as the operator counts it: ``k = kernels.kept_count(density, n)`` entries per tensor, every entry
tied with the k-th largest magnitude included (:func:`~simmerge_lib.kernels.ties_threshold`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..checkpoint import layer_index, tensor_group
from ..kernels import ties_threshold
from .columns import _SWAP_EXCHANGE, _SWAP_INVERT, NAN, TIES_DENSITY
from .refs import _CHUNK, ModelLike, TensorReader, as_ref
from .stats import _nanstat, depth_slope


def depth_third(layer: int, n_layers: int) -> int:
    """0, 1 or 2 (early, middle, late) by relative depth, round(2 * layer / (n_layers - 1)): the first and last
    blocks are always early and late (a 2-block model has no middle)."""
    return 0 if n_layers <= 1 else min(2, round(2 * layer / (n_layers - 1)))


@dataclass
class _Acc:
    """Running sums over the entries of a set of tensors; every structural feature is a ratio of these."""

    dot: float = 0.0  # <tau_a, tau_b>
    na: float = 0.0  # ||tau_a||^2
    nb: float = 0.0
    diff: float = 0.0  # ||tau_a - tau_b||^2
    both_nz: int = 0
    either_nz: int = 0
    conflict: int = 0
    inter: int = 0  # |K_a ∩ K_b| of the TIES masks
    union: int = 0
    kept_conflict: int = 0
    tensors: int = 0

    def add(self, o: _Acc) -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, getattr(self, f) + getattr(o, f))

    # An expert that left a group untouched (tau = 0 there) shares no direction with the other: cosine 0 and no
    # sign conflicts, rather than NaN, so a predictor sees a value; NaN only for a group with no tensors at all.
    def cos(self) -> float:
        den = math.sqrt(self.na * self.nb)
        return self.dot / den if den > 0 else (0.0 if self.tensors else NAN)

    def conflict_rate(self) -> float:
        return self.conflict / self.both_nz if self.both_nz else (0.0 if self.tensors else NAN)

    def jaccard(self) -> float:
        return self.inter / self.union if self.union else (0.0 if self.tensors else NAN)

    def kept_conflict_rate(self) -> float:
        return self.kept_conflict / self.inter if self.inter else (0.0 if self.tensors else NAN)


def _dot64(x: torch.Tensor, y: torch.Tensor, subtract: bool = False) -> float:
    """<x, y> (or ||x - y||^2 with ``subtract``) accumulated in float64 slice by slice, with no full-size temporary."""
    x, y = x.flatten(), y.flatten()
    total = 0.0
    for start in range(0, x.numel(), _CHUNK):
        a, b = x[start:start + _CHUNK].double(), y[start:start + _CHUNK].double()
        total += float(torch.dot(a - b, a - b) if subtract else torch.dot(a, b))
    return total


def _tensor_acc(ta: torch.Tensor, tb: torch.Tensor, density: float) -> _Acc:
    ta, tb = ta.flatten(), tb.flatten()
    th_a, th_b = ties_threshold(ta, density), ties_threshold(tb, density)
    acc = _Acc(dot=_dot64(ta, tb), na=_dot64(ta, ta), nb=_dot64(tb, tb), diff=_dot64(ta, tb, subtract=True),
               tensors=1)
    for start in range(0, ta.numel(), _CHUNK):
        a, b = ta[start:start + _CHUNK], tb[start:start + _CHUNK]
        sa, sb = torch.sign(a), torch.sign(b)
        both = (sa != 0) & (sb != 0)
        opposite = both & (sa != sb)
        ka = (a.abs() >= th_a) & (sa != 0)
        kb = (b.abs() >= th_b) & (sb != 0)
        acc.add(_Acc(both_nz=int(both.sum()), either_nz=int(((sa != 0) | (sb != 0)).sum()),
                     conflict=int(opposite.sum()), inter=int((ka & kb).sum()), union=int((ka | kb).sum()),
                     kept_conflict=int((ka & kb & opposite).sum())))
    return acc


#: The groups whose task-vector cosine is a feature, besides ``all`` (every shared tensor).
_GROUPS = ("attn", "mlp", "embed", "early", "mid", "late")


@dataclass
class _WeightSums:
    """Float64 sums over the shared tensors' full weights (experts a, b and their bases), and parameter counts."""

    w_dot: float = 0.0  # <theta_a, theta_b>
    w_na: float = 0.0  # ||theta_a||^2
    w_nb: float = 0.0
    b_dot: float = 0.0  # <theta_base_a, theta_base_b>
    b_na: float = 0.0
    b_nb: float = 0.0
    b_diff: float = 0.0  # ||theta_base_a - theta_base_b||^2
    shared: int = 0  # parameters of a in tensors shared by all four checkpoints
    total: int = 0  # all parameters of a


def _shared_by_all(name: str, ra: TensorReader, others: tuple[TensorReader, ...]) -> bool:
    """Whether tensor ``name`` of a is in every other checkpoint, with the same shape."""
    return all(name in r for r in others) and all(r.shape(name) == ra.shape(name) for r in others)


def _task_vectors(name: str, readers: tuple[TensorReader, ...], shared_base: bool,
                  sums: _WeightSums) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tau_a, tau_b)`` of one tensor, adding its full weights to ``sums`` on the way.

    The task vectors overwrite the experts' fresh copies where the reader owns them, so no fifth full-size tensor
    is allocated (four are alive here across bases, three for a shared base)."""
    ra, rb, rba, rbb = readers
    xa, xba = ra.get(name), rba.get(name)
    xb = rb.get(name)
    xbb = xba if shared_base else rbb.get(name)
    sums.w_dot += _dot64(xa, xb)
    sums.w_na += _dot64(xa, xa)
    sums.w_nb += _dot64(xb, xb)
    sums.b_na += _dot64(xba, xba)
    if not shared_base:
        sums.b_nb += _dot64(xbb, xbb)
        sums.b_dot += _dot64(xba, xbb)
        sums.b_diff += _dot64(xba, xbb, subtract=True)
    ta = xa.sub_(xba) if ra.owns_tensors else xa - xba
    tb = xb.sub_(xbb) if rb.owns_tensors else xb - xbb
    return ta, tb


def _accumulate(readers: tuple[TensorReader, ...], shared_base: bool, density: float
                ) -> tuple[dict[str, _Acc], dict[int, _Acc], _WeightSums]:
    """One pass over a's tensors: the task-vector sums per group (``all`` and :data:`_GROUPS`) and per block, and
    the full-weight sums."""
    ra = readers[0]
    groups: dict[str, _Acc] = {g: _Acc() for g in ("all", *_GROUPS)}
    layers: dict[int, _Acc] = {}
    sums = _WeightSums()
    names = ra.names()
    depths = [i for i in map(layer_index, names) if i is not None]
    n_layers = max(depths) + 1 if depths else 0
    for name in names:
        numel = math.prod(ra.shape(name))
        sums.total += numel
        if not _shared_by_all(name, ra, readers[1:]):
            continue
        sums.shared += numel
        ta, tb = _task_vectors(name, readers, shared_base, sums)
        acc = _tensor_acc(ta, tb, density)
        del ta, tb
        groups["all"].add(acc)
        group = tensor_group(name)
        if group is not None:
            groups[group].add(acc)
        depth = layer_index(name)
        if depth is not None:
            groups[("early", "mid", "late")[depth_third(depth, n_layers)]].add(acc)
            layers.setdefault(depth, _Acc()).add(acc)
    return groups, layers, sums


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else NAN


def _feature_row(groups: Mapping[str, _Acc], layers: Mapping[int, _Acc], sums: _WeightSums) -> dict[str, float]:
    """The ``st_*`` features as ratios of the accumulated sums."""
    g = groups["all"]
    norm_a, norm_b = math.sqrt(g.na), math.sqrt(g.nb)
    layer_cos = [layers[i].cos() for i in sorted(layers)]
    return {
        "st_tv_cos": g.cos(),
        "st_tv_dist": _ratio(math.sqrt(g.diff), norm_a + norm_b),
        "st_tv_norm_ratio": _ratio(norm_a, norm_b),
        "st_tv_norm_balance": _ratio(min(norm_a, norm_b), max(norm_a, norm_b)),
        "st_rel_norm_a": _ratio(norm_a, math.sqrt(sums.b_na)),
        "st_rel_norm_b": _ratio(norm_b, math.sqrt(sums.b_nb)),
        "st_sign_conflict": g.conflict_rate(),
        "st_support_overlap": _ratio(g.both_nz, g.either_nz),
        "st_topk_jaccard": g.jaccard(),
        "st_ties_conflict": g.kept_conflict_rate(),
        **{f"st_tv_cos_{k}": groups[k].cos() for k in _GROUPS},
        "st_layer_cos_mean": _nanstat(layer_cos, np.mean),
        "st_layer_cos_min": _nanstat(layer_cos, np.min),
        "st_layer_cos_std": _nanstat(layer_cos, np.std),
        "st_layer_cos_slope": depth_slope(layer_cos),
        "st_layer_conflict_max": _nanstat([layers[i].conflict_rate() for i in sorted(layers)], np.max),
        "st_weight_cos": _ratio(sums.w_dot, math.sqrt(sums.w_na * sums.w_nb)),
        "st_base_cos": _ratio(sums.b_dot, math.sqrt(sums.b_na * sums.b_nb)),
        "st_base_dist": _ratio(math.sqrt(sums.b_diff), math.sqrt(sums.b_na) + math.sqrt(sums.b_nb)),
        "st_shared_frac": _ratio(sums.shared, sums.total),
    }


def structural_features(a: ModelLike, b: ModelLike, base_a: ModelLike, base_b: ModelLike,
                        density: float = TIES_DENSITY) -> dict[str, float]:
    """The ``st_*`` features of :data:`~simmerge_lib.features.FEATURE_DOCS`, streamed one tensor at a time from the
    four checkpoints.

    ``tau_a = theta_a - theta_base_a`` and ``tau_b = theta_b - theta_base_b``: across bases each expert's task
    vector is taken against its own base. Only tensors whose name and shape agree in all four are used.
    """
    a, b, base_a, base_b = as_ref(a), as_ref(b), as_ref(base_a), as_ref(base_b)
    shared_base = base_a.key == base_b.key
    with contextlib.ExitStack() as stack:
        ra, rb, rba = (stack.enter_context(r.tensors()) for r in (a, b, base_a))
        rbb = rba if shared_base else stack.enter_context(base_b.tensors())
        groups, layers, sums = _accumulate((ra, rb, rba, rbb), shared_base, density)
    if shared_base:  # one base: its sums against itself
        sums.b_nb, sums.b_dot, sums.b_diff = sums.b_na, sums.b_na, 0.0
    return _feature_row(groups, layers, sums)


def swap_structural(feats: Mapping[str, float]) -> dict[str, float]:
    """Structural features of (b, a) from those of (a, b): exact, without reading the weights again."""
    out = dict(feats)
    for k in _SWAP_INVERT:
        out[k] = 1.0 / feats[k] if feats[k] not in (0.0,) and math.isfinite(feats[k]) else NAN
    for k, other in _SWAP_EXCHANGE.items():
        out[k] = feats[other]
    return out
