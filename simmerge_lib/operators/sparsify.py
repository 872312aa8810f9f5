"""Building blocks of the task-vector operators: task vectors, the trims and random drops that sparsify them
(TIES, Model Breadcrumbs, DARE, DELLA), the L1 rescale, and the fused pass that combines them onto the base."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
from torch import Tensor

from ..kernels import BLOCK, RankCut, blocks, is_exact, keep_rank_band_, kept_count, round_, round_scalar
from .registry import Params

def _tensor_seed(seed: int, name: str, index: int) -> int:
    # Each (tensor, model) gets its own stream, so results do not depend on thread scheduling or tensor order.
    return zlib.crc32(f"{int(seed)}:{name}:{index}".encode())


def _blocks(t: Tensor) -> tuple[Tensor, ...]:
    return t.view(-1).split(BLOCK)


def trim_(tau: Tensor, density: float) -> Tensor:
    """TIES's trim, in place: keep the ``k = max(1, int(density * n))`` largest magnitudes of ``tau``, zero the
    rest (``density >= 1`` keeps all, ``<= 0`` none). Exactly k entries survive; entries tied at the threshold are
    kept in order of position (:func:`~simmerge_lib.kernels.keep_rank_band_`). The threshold comes from a radix
    select: O(n), no sort."""
    n = tau.numel()
    if density >= 1 or n == 0:
        return tau
    if density <= 0:
        return tau.zero_()
    return keep_rank_band_(tau, 0, kept_count(density, n))


def outlier_trim_(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs' trim, in place: drop the ``int(gamma * n)`` largest magnitudes (outliers) and the
    smallest ones, keeping ``int(density * n)`` entries: by ascending magnitude rank r, keep
    ``n_bot <= r < n_bot + int(density * n)`` with ``n_bot = max(0, n - int(density * n) - int(gamma * n))``."""
    n = tau.numel()
    if density >= 1:
        return tau
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    return keep_rank_band_(tau, n - n_bot - target, n - n_bot)


def dare_(tau: Tensor, density: float, rescale: bool, seed: int, name: str, index: int) -> Tensor:
    """Drop each entry of ``tau`` with probability ``p = 1 - density`` (in place); survivors times 1/(1-p) when
    ``rescale`` (the DARE paper's rescale; mergekit instead matches the L1 norm, equal in expectation)."""
    if density >= 1:
        return tau
    if density <= 0:
        return tau.zero_()
    gen = torch.Generator(device=tau.device).manual_seed(_tensor_seed(seed, name, index))
    u = torch.empty(min(tau.numel(), BLOCK), dtype=tau.dtype, device=tau.device)
    for block in _blocks(tau):
        draw = torch.rand(block.numel(), generator=gen, out=u[:block.numel()], dtype=tau.dtype)
        block.mul_(draw < density)  # kept with probability density (one comparison: cheaper than bernoulli_)
    if rescale:
        tau.div_(density)
    return tau


def della_(tau: Tensor, density: float, epsilon: float, seed: int, name: str, index: int) -> Tensor:
    """DELLA's MagPrune, in place: along dim 1 (each row of a matrix; a 1-D tensor is one row) rank the entries by
    magnitude, r = 0 .. L-1 from the smallest (equal magnitudes by position), and keep each with probability
    p = (density - epsilon) + 2 epsilon r / (L - 1): larger entries are kept more often, the mean keep rate is
    ``density``. Needs 0 < density +- epsilon < 1.

    Drawn exactly without sorting every row: with u ~ U(0, 1), an entry is kept iff u < p(r), i.e. iff
    r > c = (u - (density - epsilon)) / (2 epsilon / (L - 1)). A histogram of each row's magnitudes (1024 equal
    bins) bounds r to the ranks of its bin, which decides almost every entry; only the few whose c falls inside
    their bin's ranks get their exact rank by counting (a chunk with many such entries, e.g. rows of equal values,
    is ranked by a stable sort instead): the same distribution as an argsort per row, without sorting every row."""
    if density >= 1:
        return tau
    if density <= 0:
        return tau.zero_()
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della: density {density} +- epsilon {epsilon} must lie in (0, 1) (tensor {name!r})")
    view = tau.unsqueeze(0) if tau.dim() < 2 else tau
    moved = view.movedim(1, -1)
    rows = moved.reshape(-1, moved.shape[-1])  # a view for 1-D and 2-D tensors, a copy beyond
    width = rows.shape[1]
    gen = torch.Generator(device=tau.device).manual_seed(_tensor_seed(seed, name, index))
    low, slope = density - epsilon, (2 * epsilon / (width - 1) if width > 1 else 0.0)
    step = max(1, (BLOCK * 4) // max(1, width))
    for start in range(0, rows.shape[0], step):
        part = rows[start:start + step]
        u = torch.rand(part.shape, generator=gen, device=tau.device)
        keep = u < low if slope == 0 else _della_keep(part.abs(), u, low, slope)
        part.mul_(keep)
    if rows.data_ptr() != tau.data_ptr():
        tau.copy_(rows.reshape(moved.shape).movedim(-1, 1).reshape(tau.shape))
    return tau


def _della_keep(mag: Tensor, u: Tensor, low: float, slope: float, bins: int = 1024) -> Tensor:
    """Whether u < low + slope * rank for each entry (its rank in its row by ascending magnitude, ties by position),
    i.e. whether rank > cut = (u - low) / slope. Entries with u < low are kept and those with
    u >= low + slope (L - 1) dropped whatever their rank; only the others (a fraction 2 epsilon of them) are looked
    up in the rows' histograms."""
    n_rows, width = mag.shape
    flat_u = u.view(-1)
    keep = flat_u < low
    idx = (~keep & (flat_u < low + slope * (width - 1))).nonzero().view(-1)
    if idx.numel() == 0:
        return keep.view(n_rows, width)
    least = mag.amin(dim=1, keepdim=True)
    scale = (bins - 0.5) / (mag.amax(dim=1, keepdim=True) - least).clamp_(min=1e-30)  # finite for a constant row
    b = (mag - least).mul_(scale).to(torch.int32)  # bins 0 .. bins - 1, monotone in the magnitude within a row
    b += (torch.arange(n_rows, dtype=torch.int32, device=mag.device) * bins).unsqueeze(1)
    counts = torch.bincount(b.view(-1), minlength=n_rows * bins)
    upto = counts.cumsum(0)  # the rows' bins are consecutive: a row's start turns these into ranks within it
    before = upto - counts
    cell = b.view(-1)[idx].long()
    rows = idx // width
    row_start = before[rows * bins]
    first = before[cell] - row_start  # the ranks of the entry's bin: first .. last
    last = upto[cell] - row_start - 1
    cuts = (flat_u[idx] - low) / slope
    decided = cuts < first
    unsure = (cuts >= first) & (cuts < last)
    count = int(unsure.sum())
    if count * width > 8 * mag.numel():  # many ties: rank the chunk by a stable sort
        order = torch.sort(mag, dim=1, stable=True).indices
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(width, device=mag.device).expand_as(order))
        keep[idx] = ranks.view(-1)[idx] > cuts
        return keep.view(n_rows, width)
    if count:
        ur, uc, ucut = rows[unsure], idx[unsure] % width, cuts[unsure]
        position = torch.arange(width, device=mag.device)
        exact = torch.empty(count, dtype=torch.bool, device=mag.device)
        step = max(1, BLOCK // width)
        for s in range(0, count, step):
            rr, cc = ur[s:s + step], uc[s:s + step]
            row, m = mag[rr], mag[rr, cc].unsqueeze(1)
            rank = (row < m).sum(1) + ((row == m) & (position < cc.unsqueeze(1))).sum(1)
            exact[s:s + step] = rank > ucut[s:s + step]
        decided[unsure] = exact
    keep[idx] = decided
    return keep.view(n_rows, width)


def _l1(x: Tensor) -> float:
    return sum(float(b.abs().sum(dtype=torch.float64)) for b in _blocks(x))


def _l1_rescale_(masked: Tensor, before: float, dtype: torch.dtype | None, eps: float = 1e-7) -> Tensor:
    """mergekit's L1 rescale: masked * (||tau||_1 / ||masked||_1), skipped when either norm is below ``eps``
    (norms in float64; the ratio rounded to the compute dtype as mergekit's is)."""
    after = _l1(masked)
    if before < eps or after < eps:
        return masked
    masked.mul_(round_scalar(round_scalar(before, dtype) / round_scalar(after, dtype), dtype))
    return round_(masked, dtype)


def _task_vectors_(tensors: list[Tensor], base: Tensor, dtype: torch.dtype | None) -> list[Tensor]:
    for x in tensors:
        round_(x.sub_(base), dtype)
    return tensors


def _combine(deltas: list[Tensor], weights: list[float], cuts: list[RankCut | None], normalize: bool, lam: float,
             out: Tensor, dtype: torch.dtype | None, *, consensus: bool, weighted: bool = False) -> Tensor:
    """``out += lambda * merge(deltas)``, block by block with reused buffers (one fused pass, no full-size
    temporaries). With x_i = w_i tau_i (tau_i trimmed by ``cuts[i]`` when given; ``weighted``: ``deltas`` already
    hold x_i):

    - ``consensus`` (TIES): s = sign(sum_i x_i) (0 counts as +); keep x_i where sign(x_i) = s;
      merged = sum_i kept x_i (/ sum_i kept w_i when ``normalize``; 1 where nothing is kept);
    - otherwise: merged = sum_i x_i (/ sum_i w_i when ``normalize``, unless |sum_i w_i| < 1e-8).

    Each intermediate is rounded to ``dtype`` where mergekit's computation in that dtype rounds (x_i, the sums,
    the quotient, the scaled result)."""
    n = out.numel()
    size = min(n, BLOCK)
    exact = is_exact(dtype)
    scratch = [torch.empty(size, dtype=out.dtype, device=out.device) for _ in range(4)]
    low = None if exact else torch.empty(size, dtype=dtype, device=out.device)  # rounding through a reused buffer
    mag = torch.empty(size, dtype=out.dtype, device=out.device)
    mask = torch.empty(size, dtype=torch.bool, device=out.device)
    flat = [d.view(-1) for d in deltas]
    target = out.view(-1)
    positive_weights = all(w > 0 for w in weights)
    total_w = round_scalar(sum(weights), dtype)

    def rnd(x: Tensor) -> Tensor:
        return x if exact else round_(x, dtype, low)

    for start, end in blocks(target):
        length = end - start
        sign, mixed, div, y = (s[:length] for s in scratch)
        xs = [_weighted(d[start:end], w, cut, mag[:length], mask[:length], weighted, rnd)
              for d, w, cut in zip(flat, weights, cuts)]
        if consensus:
            _agreeing_sum(xs, weights, normalize, positive_weights, (sign, mixed, div, y), rnd)
        else:
            rnd(_sum_into(xs, mixed))
            if normalize:
                mixed.div_(total_w if abs(total_w) >= 1e-8 else 1.0)
        if normalize or lam != 1.0:
            rnd(mixed)
        if lam != 1.0:
            rnd(mixed.mul_(lam))
        target[start:end].add_(mixed)
    return out


def _weighted(x: Tensor, w: float, cut: RankCut | None, mag: Tensor, mask: Tensor, weighted: bool,
              rnd: Callable[[Tensor], Tensor]) -> Tensor:
    """One block of x_i = w_i tau_i, in place: trimmed by ``cut`` (when given), times w_i unless ``weighted``."""
    if cut is not None:
        x.mul_(cut.keep(torch.abs(x, out=mag), mask))
    if not weighted and w != 1.0:
        rnd(x.mul_(w))
    return x


def _sum_into(xs: list[Tensor], out: Tensor) -> Tensor:
    """``out = sum_i xs[i]`` (no temporary)."""
    torch.add(xs[0], xs[1], out=out) if len(xs) > 1 else out.copy_(xs[0])
    for x in xs[2:]:
        out.add_(x)
    return out


def _agreeing_sum(xs: list[Tensor], weights: list[float], normalize: bool, positive_weights: bool,
                  buffers: tuple[Tensor, Tensor, Tensor, Tensor], rnd: Callable[[Tensor], Tensor]) -> Tensor:
    """TIES's disjoint merge of one block into ``buffers[1]``: s = sign(sum_i x_i), sum of the x_i that agree
    with s (/ the agreeing weights' sum when ``normalize``)."""
    sign, mixed, div, y = buffers
    _sum_into(xs, sign)
    # s = +-1; a sum of +-0 terms is -0 only when every term is -0, and then nothing agrees anyway
    torch.copysign(torch.ones_like(sign), sign, out=sign)
    mixed.zero_()
    if normalize:
        div.zero_()
    for x, w in zip(xs, weights):
        torch.mul(x, sign, out=y).clamp_(min=0)  # |x_i| where x_i agrees with s, else 0
        mixed.add_(y)
        if normalize:
            div.add_(torch.sign(y, out=y), alpha=w)  # sum of the agreeing models' weights
    rnd(mixed.mul_(sign))
    if normalize:
        rnd(div)
        if positive_weights:
            div.clamp_(min=1e-30)  # where nothing agrees mixed is 0: 0 / tiny = 0, as 0 / 1
        else:
            div.masked_fill_(div == 0, 1.0)
        mixed.div_(div)
    return mixed


def _task_vector_merge(tensors: list[Tensor], base: Tensor, params: list[Params], g: Params, name: str,
                       dtype: torch.dtype | None, *, sparsify: str | None, consensus: bool) -> Tensor:
    """The generalized task arithmetic every task-vector operator shares: tau_i = theta_i - theta_0 (rounded to
    the compute dtype), sparsified per ``sparsify``, then :func:`_combine` onto the base."""
    weights = [round_scalar(float(p["weight"]), dtype) for p in params]
    deltas = _task_vectors_(tensors, base, dtype)
    rescale = bool(g.get("rescale", False))
    cuts: list[RankCut | None] = [None] * len(deltas)
    for i, (tau, p) in enumerate(zip(deltas, params)):
        density = float(p.get("density", 1.0))
        before = _l1(tau) if (rescale and sparsify in ("magnitude", "outliers", "della") and density < 1) else 0.0
        if sparsify == "magnitude":
            n = tau.numel()
            if density >= 1 or n == 0:
                pass
            elif density <= 0:
                tau.zero_()
            elif rescale:
                trim_(tau, density)
            else:  # trim inside the fused pass below: one pass fewer over the tensor
                cuts[i] = RankCut.at_rank(tau.view(-1), kept_count(density, n))
        elif sparsify == "outliers":
            outlier_trim_(tau, density, float(p["gamma"]))
        elif sparsify == "dare":
            dare_(tau, density, rescale, int(g["seed"]), name, i)
            round_(tau, dtype)
        elif sparsify == "della":
            della_(tau, density, float(p["epsilon"]), int(g["seed"]), name, i)
        if before:
            _l1_rescale_(tau, before, dtype)
    base_copy = base
    _combine(deltas, weights, cuts, bool(g["normalize"]), float(g["lambda"]), base_copy, dtype,
             consensus=consensus)
    return base_copy
