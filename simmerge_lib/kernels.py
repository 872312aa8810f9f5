"""Tensor kernels shared by the merge operators (chapter 02) and the structural features (chapter 01).

- **Exact selection by magnitude** without sorting: :func:`kth_largest_abs` finds the k-th largest ``|x|`` with a
  two-pass radix select over float32 bit patterns (non-negative floats sort like their bits), in O(n) time and with
  no temporary larger than a block. It also returns how many entries lie strictly above that value and how many
  equal it, which is what an *exact-k* mask needs to break ties (:func:`keep_rank_band_`).
- **Blocks**: element-wise passes run over flat blocks of :data:`BLOCK` elements, so their temporaries stay small
  and in cache whatever the tensor's size (2 KB or 2 GB).
- **Rounding to a compute dtype**: :func:`round_` rounds a float32 working tensor to the values a float16 or
  bfloat16 computation would hold, so that a merge "computed in float16" gives float16's results bit for bit
  while the arithmetic itself runs in float32 (the fastest path on a CPU; every single IEEE operation on
  float16 inputs computed in float32 and rounded once equals the float16 operation).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator

import torch
from torch import Tensor

#: Elements per block of a fused element-wise pass (256 KB of float32: temporaries stay in the L2/L3 cache, which
#: larger blocks do not).
BLOCK = 1 << 16
#: Above this many elements :func:`kth_largest_abs` uses the radix select instead of ``kthvalue`` (which allocates
#: an index tensor and a copy).
RADIX_MIN = 1 << 18
#: Elements per slice of the radix select's passes.
RADIX_SLICE = 1 << 18

_F32_BITS = struct.Struct("<I")
_F32 = struct.Struct("<f")


def blocks(t: Tensor, size: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of consecutive flat blocks of ``t`` (of :data:`BLOCK` elements by default)."""
    n = t.numel()
    size = size or BLOCK
    for start in range(0, n, size):
        yield start, min(n, start + size)


def is_exact(dtype: torch.dtype | None) -> bool:
    """Whether float32 working copies hold ``dtype``'s results exactly (no rounding step needed)."""
    return dtype is None or dtype in (torch.float32, torch.float64)


def round_(x: Tensor, dtype: torch.dtype | None, scratch: Tensor | None = None) -> Tensor:
    """Round the working tensor ``x`` (float32) in place to the nearest value of ``dtype`` (no-op for float32),
    through ``scratch`` (a ``dtype`` buffer of at least one slice, reused; allocated when not given)."""
    if is_exact(dtype) or x.dtype == dtype:
        return x
    flat = x.view(-1)
    if scratch is None:
        scratch = torch.empty(min(flat.numel(), RADIX_SLICE), dtype=dtype, device=x.device)
    size = scratch.numel()
    for start, end in blocks(flat, size):
        part, low = flat[start:end], scratch[:end - start]
        low.copy_(part)
        part.copy_(low)
    return x


def round_scalar(value: float, dtype: torch.dtype | None) -> float:
    """A Python number as ``dtype`` holds it (``0.3`` is ``0.300048828125`` in float16)."""
    if is_exact(dtype):
        return float(value)
    return float(torch.tensor(float(value), dtype=dtype))


# --- exact selection by magnitude -------------------------------------------------------------------------------
def _abs_bits(flat: Tensor, start: int, end: int) -> Tensor:
    a = flat[start:end].to(torch.float32).abs()
    return a.nan_to_num_(nan=0.0, posinf=math.inf).view(torch.int32)  # NaN as 0: below every t > 0


def _select(counts: Tensor, rank: int) -> tuple[int, int]:
    """The bucket holding the rank-th largest entry (1-based) and how many entries lie in higher buckets."""
    above = counts.flip(0).cumsum(0)  # above[j] = entries in the top j + 1 buckets
    j = int(torch.searchsorted(above, rank))  # first j with above[j] >= rank
    return len(counts) - 1 - j, int(above[j - 1]) if j else 0


def kth_largest_abs(x: Tensor, k: int) -> tuple[float, int, int]:
    """``(v, above, equal)``: the k-th largest ``|x|`` (1-based, ``1 <= k <= numel``), the number of entries with
    ``|x| > v`` and the number with ``|x| == v`` (so ``above < k <= above + equal``). NaN counts as 0.

    Small tensors use ``kthvalue``. For large ones the exact same value comes from a two-pass radix select over
    float32 bit patterns: pass 1 counts ``|x|`` by the high 16 bits of its pattern, which gives the bucket holding
    the k-th largest; pass 2 counts the low 16 bits inside that bucket. No temporary is larger than a slice.
    (Two passes over the data instead of the 31 of a bisection over the bit patterns, and no full-size copy as
    numpy's introselect would make.)
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"kth_largest_abs: k={k} outside [1, {n}]")
    if n <= RADIX_MIN:
        mag = flat.to(torch.float32).abs().nan_to_num_(nan=0.0, posinf=math.inf)
        v = float(torch.kthvalue(mag, n - k + 1).values)
        return v, int((mag > v).sum()), int((mag == v).sum())
    high = torch.zeros(1 << 15, dtype=torch.int64)  # bit 31 (the sign) is 0 for |x|
    for start, end in blocks(flat, RADIX_SLICE):
        high += torch.bincount(_abs_bits(flat, start, end) >> 16, minlength=1 << 15)
    bucket, higher = _select(high, k)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for start, end in blocks(flat, RADIX_SLICE):
        bits = _abs_bits(flat, start, end)
        low += torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    low_bits, higher_low = _select(low, k - higher)
    v = _F32.unpack(_F32_BITS.pack((bucket << 16) | low_bits))[0]
    return v, higher + higher_low, int(low[low_bits])


def kept_count(density: float, n: int) -> int:
    """How many of ``n`` entries a trim at ``density`` keeps: ``k = max(1, int(density * n))`` (mergekit's count,
    used by TIES's trim and by the structural features that describe it)."""
    return min(n, max(1, int(density * n)))


def ties_threshold(tau: Tensor, density: float) -> float:
    """Smallest magnitude TIES keeps: the k-th largest ``|tau|`` with ``k = kept_count(density, numel)`` (every
    entry tied with it counts as kept; NaN never counts)."""
    return kth_largest_abs(tau, kept_count(density, tau.numel()))[0]


def keep_rank_band_(x: Tensor, lo: int, hi: int) -> Tensor:
    """Keep, in place, the entries of ``x`` whose rank by descending magnitude lies in ``[lo, hi)`` (0-based) and
    zero the others: exactly ``hi - lo`` entries survive.

    Entries of equal magnitude are ranked by position (the first one ranks higher), so the result is a function
    of the tensor alone. (mergekit ranks them with an unstable argsort, which keeps an arbitrary subset of a tied
    group: the two tools can differ on entries tied at a boundary, never elsewhere.) ``lo = 0`` is TIES's top-k,
    ``lo > 0`` is Model Breadcrumbs' outlier removal.
    """
    flat = x.view(-1)
    n = flat.numel()
    lo, hi = max(0, lo), min(n, hi)
    if hi <= lo:
        return x.zero_()
    if lo == 0 and hi == n:
        return x
    upper = RankCut.at_rank(flat, hi)  # ranks < hi survive this cut
    lower = RankCut.at_rank(flat, lo) if lo > 0 else None  # ranks < lo are removed
    mag = torch.empty(min(n, BLOCK), dtype=torch.float32)
    for start, end in blocks(flat):
        part = flat[start:end]
        m = torch.abs(part, out=mag[: end - start])
        keep = upper.keep(m)
        if lower is not None:
            keep &= ~lower.keep(m)
        part.mul_(keep)  # multiplying (not masked_fill) keeps a NaN visible
    return x


class RankCut:
    """The entries ranked before ``rank`` by descending magnitude (ties by position), as a mask built block by block
    (:meth:`keep`, blocks in order): lets a fused pass apply TIES's trim without a pass of its own."""

    def __init__(self, value: float, quota: int, equal: int):
        self.value, self.quota, self.all_ties = value, quota, quota >= equal

    @classmethod
    def at_rank(cls, flat: Tensor, rank: int) -> RankCut:
        if rank >= flat.numel():
            return cls(-1.0, 0, 0)  # everything is before it
        if rank <= 0:
            return cls(math.inf, 0, 1)  # nothing is before it (|x| > inf never holds)
        v, above, equal = kth_largest_abs(flat, rank)
        return cls(v, rank - above, equal)  # quota: how many of the tied entries rank before the cut

    def keep(self, mag: Tensor, out: Tensor | None = None) -> Tensor:
        """Mask of a block's entries before the cut (into the bool tensor ``out`` when given); blocks must come in
        order (the tie quota is consumed)."""
        if self.all_ties:
            return torch.ge(mag, self.value, out=out) if out is not None else mag >= self.value
        keep = mag > self.value
        tied = mag == self.value
        count = int(tied.sum())
        if count <= self.quota:
            keep |= tied
            self.quota -= count
        elif self.quota > 0:
            first = tied.nonzero().view(-1)[: self.quota]
            keep[first] = True
            self.quota = 0
        return keep
