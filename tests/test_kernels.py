"""Kernels shared by operators and features: exact radix selection, exact-k rank bands, rounding to a dtype."""

from __future__ import annotations

import pytest
import torch

from simmerge_lib import kernels as K


def _hard_tensor(n: int = 5000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    tau = torch.randn(n, generator=gen) * torch.logspace(-30, 30, n)  # every exponent range, both signs
    tau[::3] = 0.0
    tau[10:20] = 0.5  # ties
    tau[20:23] = torch.tensor([float("inf"), -float("inf"), 1e-44])  # infinities and a subnormal
    return tau


@pytest.mark.parametrize("k", [1, 2, 7, 100, 1667, 3333, 4999, 5000])
def test_radix_select_equals_kthvalue_with_counts(monkeypatch, k):
    tau = _hard_tensor()
    exact = K.kth_largest_abs(tau, k)  # kthvalue path
    monkeypatch.setattr(K, "RADIX_MIN", 0)
    monkeypatch.setattr(K, "RADIX_SLICE", 97)  # several slices
    assert K.kth_largest_abs(tau, k) == exact
    v, above, equal = exact
    mag = tau.abs()
    assert above == int((mag > v).sum()) and equal == int((mag == v).sum()) and above < k <= above + equal


def test_ties_threshold_is_the_features_definition():
    tau = _hard_tensor()
    for density in (0.2, 0.5, 1.0, 1e-4):
        k = max(1, -(-int(density * 1e6) * tau.numel() // int(1e6)))  # ceil(density * n)
        assert K.ties_threshold(tau, density) == float(torch.topk(tau.abs(), min(k, 5000)).values.min())
    for same in (torch.zeros(5000), torch.full((5000,), -0.25)):
        assert K.ties_threshold(same, 0.3) == float(same.abs()[0])


@pytest.mark.parametrize("radix", [False, True])
def test_rank_band_keeps_exactly_its_ranks_ties_by_position(monkeypatch, radix):
    if radix:
        monkeypatch.setattr(K, "RADIX_MIN", 0)
        monkeypatch.setattr(K, "BLOCK", 3)  # ties spread over blocks
    x = torch.tensor([1.0, -3.0, 2.0, 2.0, -2.0, 0.5, 2.0, 4.0])
    # descending by magnitude, ties by position: 4 (7), -3 (1), 2 (2), 2 (3), -2 (4), 2 (6), 1 (0), 0.5 (5)
    top4 = K.keep_rank_band_(x.clone(), 0, 4)
    assert torch.equal(top4, torch.tensor([0.0, -3.0, 2.0, 2.0, 0.0, 0.0, 0.0, 4.0]))
    band = K.keep_rank_band_(x.clone(), 1, 5)  # drop the largest, keep the next four
    assert torch.equal(band, torch.tensor([0.0, -3.0, 2.0, 2.0, -2.0, 0.0, 0.0, 0.0]))
    assert int((K.keep_rank_band_(x.clone(), 0, 5) != 0).sum()) == 5
    assert torch.equal(K.keep_rank_band_(x.clone(), 0, 8), x)
    assert not K.keep_rank_band_(x.clone(), 3, 3).any()


def test_round_to_a_compute_dtype():
    x = torch.tensor([0.1, 1 / 3, 1000.7, -2.5e-8])
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(K.round_(x.clone(), dtype), x.to(dtype).float())
    assert torch.equal(K.round_(x.clone(), torch.float32), x)
    assert K.round_scalar(0.3, torch.float16) == 0.300048828125 and K.round_scalar(0.3, None) == 0.3
