"""Operators against hand-computed examples, parameter resolution (gradients, filters), the in-memory path."""

from __future__ import annotations

import math

import pytest
import torch

from simmerge_lib import operators as ops
from simmerge_lib.operators import OPERATORS, evaluate_setting, merge_state_dicts, resolve


def run(method, tensors, base=None, params=None, glob=None, name="w"):
    op = OPERATORS[method]
    params = params or [{} for _ in tensors]
    return ops.merge_tensor(op, name, [t.clone().float() for t in tensors],
                            None if base is None else base.clone().float(), params, glob or {}, 0.0)


def test_registry_has_the_required_operators_with_formulas():
    for name in ["linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties"]:
        assert name in OPERATORS
        assert "=" in OPERATORS[name].doc  # the formula is in the docstring
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        ops.get_operator("nope")


def test_linear_weighted_mean_and_unnormalized_sum():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    out = run("linear", [a, b], params=[{"weight": 1.0}, {"weight": 3.0}])
    assert torch.allclose(out, torch.tensor([2.5, 3.5]))
    out = run("linear", [a, b], params=[{"weight": 1.0}, {"weight": 3.0}], glob={"normalize": False})
    assert torch.allclose(out, torch.tensor([10.0, 14.0]))


def test_slerp_endpoints_midpoint_and_parallel_fallback():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(run("slerp", [v1], base=v0, glob={"t": 0.0}), v0)
    assert torch.allclose(run("slerp", [v1], base=v0, glob={"t": 1.0}), v1, atol=1e-7)
    mid = run("slerp", [v1], base=v0, glob={"t": 0.5})
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))  # on the circle, unlike lerp
    # 60 degrees apart, t = 0.25 -> the vector at 15 degrees (unit length)
    w = torch.tensor([math.cos(math.pi / 3), math.sin(math.pi / 3)])
    q = run("slerp", [w], base=v0, glob={"t": 0.25})
    assert torch.allclose(q, torch.tensor([math.cos(math.pi / 12), math.sin(math.pi / 12)]), atol=1e-6)
    # parallel vectors: |d| > 0.9995 -> plain lerp of the unnormalized tensors
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])
    assert torch.allclose(run("slerp", [b], base=a, glob={"t": 0.25}), 0.75 * a + 0.25 * b)


def test_task_arithmetic_hand_computed():
    base = torch.tensor([1.0, 1.0])
    e1, e2 = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])
    out = run("task_arithmetic", [e1, e2], base=base, params=[{"weight": 1.0}, {"weight": 0.5}],
              glob={"lambda": 2.0})
    # tau1 = [1, -1], tau2 = [0, 2]; sum w tau = [1, 0]; base + 2 * [1, 0]
    assert torch.allclose(out, torch.tensor([3.0, 1.0]))


TAU1 = torch.tensor([[4.0, -1.0, 0.5, 2.0], [-3.0, 0.2, 1.0, -5.0], [0.1, 6.0, -2.0, 0.3]])
TAU2 = torch.tensor([[-1.0, 3.0, 0.4, 1.0], [2.0, -0.1, -4.0, -6.0], [0.2, -2.0, 5.0, 0.5]])


def test_ties_trim_keeps_top_density_magnitudes():
    trimmed = ops.trim_(TAU1.clone(), 0.5)
    assert torch.equal(trimmed, torch.tensor([[4.0, 0, 0, 2.0], [-3.0, 0, 0, -5.0], [0, 6.0, -2.0, 0]]))
    assert torch.equal(ops.trim_(TAU1.clone(), 1.0), TAU1)
    assert int((ops.trim_(TAU1.clone(), 0.01) != 0).sum()) == 1  # at least one entry survives


def test_ties_elect_and_disjoint_mean_on_3x4():
    base = torch.zeros(3, 4)
    params = [{"weight": 1.0, "density": 0.5}] * 2
    out = run("ties", [base + TAU1, base + TAU2], base=base, params=params, glob={"lambda": 1.0})
    # trimmed: t1 = [[4,0,0,2],[-3,0,0,-5],[0,6,-2,0]], t2 = [[0,3,0,0],[2,0,-4,-6],[0,-2,5,0]]
    # elected sign of the sum: + except row 1 cols 0, 2, 3; agreeing entries averaged, disagreeing ones dropped
    expected = torch.tensor([[4.0, 3.0, 0.0, 2.0], [-3.0, 0.0, -4.0, -5.5], [0.0, 6.0, 5.0, 0.0]])
    assert torch.allclose(out, expected)
    # unequal weights: disjoint weighted mean, sum kept w_i tau_i / sum kept w_i, then lambda
    w = [{"weight": 1.0, "density": 0.5}, {"weight": 3.0, "density": 0.5}]
    out = run("ties", [base + TAU1, base + TAU2], base=base, params=w, glob={"lambda": 0.5})
    assert out[1, 3].item() == pytest.approx(0.5 * (-5.0 - 18.0) / 4.0)
    assert out[0, 1].item() == pytest.approx(0.5 * 9.0 / 3.0)  # only model 2 kept it: w*tau / w


def test_dare_keep_fraction_rescale_and_seed():
    base = torch.zeros(400, 250)
    expert = torch.ones(400, 250)
    p = [{"weight": 1.0, "density": 0.3}]
    out = run("dare_linear", [expert], base=base, params=p, glob={"seed": 7})
    kept = out != 0
    assert kept.float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.3))  # survivors rescaled by 1/(1-p)
    assert out.mean().item() == pytest.approx(1.0, abs=0.03)  # unbiased in expectation
    again = run("dare_linear", [expert], base=base, params=p, glob={"seed": 7})
    other = run("dare_linear", [expert], base=base, params=p, glob={"seed": 8})
    assert torch.equal(out, again) and not torch.equal(out, other)
    no_rescale = run("dare_linear", [expert], base=base, params=p, glob={"seed": 7, "rescale": False})
    assert set(no_rescale.unique().tolist()) == {0.0, 1.0}


def test_dare_ties_combines_drop_and_sign_election():
    base = torch.zeros(1000)
    e1, e2 = torch.ones(1000), -torch.ones(1000) * 0.5
    out = run("dare_ties", [e1, e2], base=base, params=[{"density": 0.5}] * 2, glob={"seed": 1})
    # where both survive: elected + (2 - 1 > 0) -> only e1's rescaled value 2 (not normalized by default)
    assert set(out.unique().tolist()) <= {0.0, 2.0, -1.0}


def test_gradients_and_filters_follow_mergekit():
    assert evaluate_setting([0.0, 1.0], "x", 0.5) == pytest.approx(0.5)
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    assert evaluate_setting([0.2, 0.4, 0.8], "x", 1.0) == pytest.approx(0.8)
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]
    assert evaluate_setting(setting, "model.layers.1.self_attn.q_proj.weight", 1.0) == 0.1
    assert evaluate_setting(setting, "model.layers.1.mlp.up_proj.weight", 1.0) == 1.0
    assert evaluate_setting(setting, "model.norm.weight", 0.0) == 0.5
    assert evaluate_setting([{"filter": "mlp", "value": 1.0}], "lm_head.weight", 0.0) is None
    # precedence: the model's own setting, then the global one, then the default
    got = resolve({"weight": 1.0, "density": 1.0}, [{"weight": 0.3}, {"weight": 0.9, "density": 0.5}], "x", 0.0)
    assert got == {"weight": 0.3, "density": 0.5}
    with pytest.raises(ValueError, match="required"):
        resolve({"t": None}, [{}], "x", 0.0)
    assert ops.layer_t("model.layers.2.mlp.up_proj.weight", 5) == 0.5
    assert ops.layer_t("model.embed_tokens.weight", 5) == 0.0


def _toy_state(seed: int, layers: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(5, 4, generator=gen)}
    for i in range(layers):
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(4, 4, generator=gen)
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(6, 4, generator=gen)
    sd["steps"] = torch.tensor([seed])  # not floating point: copied from the reference
    return sd


def test_merge_state_dicts_honours_layer_gradients_and_filters():
    a, b = _toy_state(0), _toy_state(1)
    before = {k: v.clone() for k, v in a.items()}
    out = merge_state_dicts("linear", [a, b], None, [{"weight": [1.0, 0.0]}, {"weight": [0.0, 1.0]}],
                            {"normalize": True})
    key = "model.layers.{}.mlp.up_proj.weight"
    assert torch.allclose(out[key.format(0)], a[key.format(0)])  # t = 0: all of a
    assert torch.allclose(out[key.format(2)], b[key.format(2)])  # t = 1: all of b
    assert torch.allclose(out[key.format(1)], 0.5 * (a[key.format(1)] + b[key.format(1)]))
    assert torch.allclose(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # outside layers t=0
    assert torch.equal(out["steps"], a["steps"])
    assert all(torch.equal(before[k], a[k]) for k in a)  # inputs untouched
    # a filter: only attention moves towards b
    out = merge_state_dicts("task_arithmetic", [b], a, [{"weight": [{"filter": "self_attn", "value": 1.0},
                                                                    {"value": 0.0}]}])
    q, up = "model.layers.1.self_attn.q_proj.weight", key.format(1)
    assert torch.allclose(out[q], b[q]) and torch.allclose(out[up], a[up])


def test_merge_state_dicts_checks_inputs():
    a, b = _toy_state(0), _toy_state(1)
    with pytest.raises(ValueError, match="needs a base"):
        merge_state_dicts("ties", [a, b], None)
    with pytest.raises(ValueError, match="exactly 1"):
        merge_state_dicts("slerp", [a, b], a, global_parameters={"t": 0.5})
    del b["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing from model 1"):
        merge_state_dicts("linear", [a, b], None)
    out = merge_state_dicts("slerp", [_toy_state(1)], a, global_parameters={"t": 0.0}, out_dtype=torch.bfloat16)
    assert out["model.embed_tokens.weight"].dtype == torch.bfloat16
