"""Row statistics of probe outputs: divergences, entropies, cosines, linear CKA and slopes over depth.

The feature arithmetic runs in NumPy float64: these are small matrices (positions × width), for which torch's
thread pool costs more than the arithmetic on a busy CPU; inputs may be tensors or arrays."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .columns import NAN


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def kl_rows(logp: torch.Tensor | np.ndarray, logq: torch.Tensor | np.ndarray) -> np.ndarray:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)) for each row of two log-probability matrices (nats, >= 0)."""
    logp, logq = _np(logp), _np(logq)
    return np.maximum((np.exp(logp) * (logp - logq)).sum(-1), 0.0)


def js_rows(logp: torch.Tensor | np.ndarray, logq: torch.Tensor | np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence per row, in bits: 1/2 KL(p||m) + 1/2 KL(q||m) with m = (p+q)/2; in [0, 1]."""
    logp, logq = _np(logp), _np(logq)
    logm = np.logaddexp(logp, logq) - math.log(2.0)
    return (0.5 * kl_rows(logp, logm) + 0.5 * kl_rows(logq, logm)) / math.log(2.0)


def entropy_rows(logp: torch.Tensor | np.ndarray) -> np.ndarray:
    """Shannon entropy H(p) = -sum_v p(v) log p(v) per row (nats)."""
    logp = _np(logp)
    return -(np.exp(logp) * logp).sum(-1)


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA (Kornblith et al., 2019) of two representations ``x: [n, p]``, ``y: [n, q]`` of the same inputs.

    With column-centred X, Y: CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), equal to the normalised HSIC of the
    linear kernels <K, L>_F / (||K||_F ||L||_F) with K = X X^T, L = Y Y^T. Widths p and q may differ. CKA is 1 for
    x against itself and invariant to orthogonal transforms and isotropic scaling of either side; NaN when one
    side is constant.
    """
    x, y = _np(x), _np(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same inputs on both sides; got {x.shape[0]} and {y.shape[0]} rows")
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    if x.shape[0] < min(x.shape[1], y.shape[1]):  # the n x n kernel form is the cheaper one for wide models
        k, l_ = x @ x.T, y @ y.T
        num, den = float((k * l_).sum()), float(np.linalg.norm(k) * np.linalg.norm(l_))
    else:
        num = float(np.linalg.norm(y.T @ x) ** 2)
        den = float(np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    return num / den if den > 0 else NAN


def cosine(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """<x, y> / (||x|| ||y||) of two flattened tensors of equal size; NaN if either is zero."""
    x, y = _np(x).ravel(), _np(y).ravel()
    den = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / den if den > 0 else NAN


def row_cosine(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> np.ndarray:
    """Cosine of each row of ``x`` with the same row of ``y`` (0 where a row is zero)."""
    x, y = _np(x), _np(y)
    den = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    return np.divide((x * y).sum(-1), den, out=np.zeros_like(den), where=den > 0)


def depth_slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against relative depth ``i / (L - 1)`` in [0, 1]; NaN for fewer than 2."""
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v)
    if ok.sum() < 2:
        return NAN
    depth = np.linspace(0.0, 1.0, len(v))[ok]
    return float(np.polyfit(depth, v[ok], 1)[0])


def _nanstat(values: Sequence[float], fn: Any) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(fn(v)) if v.size else NAN
