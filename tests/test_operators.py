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


# --- the registry ---------------------------------------------------------------------------------------------------
NEW = ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "nuslerp", "passthrough"]


def test_registry_entries_carry_what_labels_search_and_bandit_need():
    for name in NEW:
        assert "=" in OPERATORS[name].doc, name
    for op in OPERATORS.values():
        assert set(op.traits) <= set(ops.TRAITS)
        assert op.base in ("required", "optional", "ignored")
        for p in op.params:
            assert p.range is None or p.range[0] < p.range[1]
            if not p.required and p.default is not None:
                assert isinstance(p.default, p.kind), (op.name, p.name)
    grid = ops.default_grid()
    assert "passthrough" not in grid and set(grid) >= {"linear", "slerp", "ties", "model_stock", "della"}
    assert grid["ties"] == [{"density": 0.2}, {"density": 0.5}]
    grid["ties"].append({"density": 0.9})  # a copy: the registry is unchanged
    assert ops.default_grid(["ties"]) == {"ties": [{"density": 0.2}, {"density": 0.5}]}
    assert ops.param_range("ties", "lambda") == (0.3, 1.5)
    assert OPERATORS["ties"].model_params == {"weight": 1.0, "density": 1.0}
    assert OPERATORS["slerp"].global_params == {"t": None}  # required


def test_one_function_and_its_registration_add_an_operator():
    @ops.operator("halfway_test", base="required", params=[ops.Param("alpha", float, 0.5, range=(0.0, 1.0))],
                  traits=("task_vector",), grid=[{"alpha": 0.5}])
    def halfway(tensors, base, params, g, name, dtype=None):
        """theta = theta_0 + alpha * mean_i tau_i."""
        mean = sum(x - base for x in tensors) / len(tensors)
        return base + g["alpha"] * mean

    try:
        from simmerge_lib.recipe import Recipe

        recipe = Recipe.from_dict({"merge_method": "halfway_test", "base_model": "b", "models": ["x", "y"],
                                   "parameters": {"alpha": [0.0, 1.0]}})
        assert recipe.operator().name == "halfway_test" and ops.default_grid()["halfway_test"] == [{"alpha": 0.5}]
        out = merge_state_dicts("halfway_test", [{"w": torch.ones(2)}, {"w": 3 * torch.ones(2)}],
                                {"w": torch.zeros(2)}, global_parameters={"alpha": 0.5})
        assert torch.equal(out["w"], torch.ones(2))
        with pytest.raises(ValueError, match="already registered"):
            ops.operator("halfway_test", base="required")(halfway)
    finally:
        del OPERATORS["halfway_test"]


def test_default_grids_are_order_free():
    """Swapping the two models of a pair never changes a result at any default setting (the random operators
    draw other masks, so only their settings are checked for symmetry)."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=gen)
    a, b = base + torch.randn(6, 5, generator=gen), base + torch.randn(6, 5, generator=gen)
    for name, settings in ops.default_grid().items():
        op = OPERATORS[name]
        for setting in settings:
            per_model = {k: v for k, v in setting.items() if k in op.model_params}
            glob = {k: v for k, v in setting.items() if k in op.global_params}
            if "seed" in op.global_params:
                continue
            if name == "slerp":  # the base is one of the pair: t <-> 1 - t
                ab = run(name, [b], base=a, glob=glob)
                ba = run(name, [a], base=b, glob={"t": 1 - glob["t"]})
            else:
                use_base = base if op.accepts_base and name != "nuslerp" else None
                ab = run(name, [a, b], base=use_base, params=[per_model, per_model], glob=glob)
                ba = run(name, [b, a], base=use_base, params=[per_model, per_model], glob=glob)
            torch.testing.assert_close(ab, ba, rtol=1e-6, atol=1e-6, msg=f"{name} {setting}")


# --- new operators, hand-computed -------------------------------------------------------------------------------------
def test_breadcrumbs_drops_outliers_and_the_smallest():
    tau = torch.tensor([0.1, -5.0, 2.0, -0.3, 4.0, 0.2, -1.0, 3.0, 0.05, 6.0])
    # density 0.6 keeps 6 of 10; gamma 0.1 drops the largest (6); n_bot = 10 - 6 - 1 = 3 smallest dropped
    out = run("breadcrumbs", [tau], base=torch.zeros(10), params=[{"weight": 1.0, "density": 0.6, "gamma": 0.1}])
    assert torch.equal(out, torch.tensor([0.0, -5.0, 2.0, -0.3, 4.0, 0.0, -1.0, 3.0, 0.0, 0.0]))
    # gamma larger than what density leaves: fewer outliers are dropped (here 1, not 5), density is kept
    kept = ops.outlier_trim_(tau.clone(), 0.9, 0.5)
    assert int((kept != 0).sum()) == 9 and kept[9] == 0  # only the largest went
    # breadcrumbs_ties: the trimmed vectors then go through TIES's election (not normalized by default)
    t1, t2 = torch.tensor([1.0, -4.0, 2.0, 8.0]), torch.tensor([-3.0, 1.0, 2.5, 0.5])
    p = [{"weight": 1.0, "density": 0.5, "gamma": 0.25}] * 2
    # n_bot = 4 - 2 - 1 = 1: each keeps ascending magnitude ranks 1 and 2 -> t1 [0, -4, 2, 0], t2 [0, 1, 2.5, 0]
    out = run("breadcrumbs_ties", [t1, t2], base=torch.zeros(4), params=p)
    # sums [0, -3, 4.5, 0] -> elected - at 1, + elsewhere; agreeing entries summed: [0, -4, 2 + 2.5, 0]
    assert torch.equal(out, torch.tensor([0.0, -4.0, 4.5, 0.0]))


def test_model_stock_interpolates_by_the_task_vectors_cosine():
    base = torch.tensor([1.0, 1.0])
    e1 = base + torch.tensor([1.0, 0.0])
    e2 = base + torch.tensor([math.cos(math.pi / 3), math.sin(math.pi / 3)])  # 60 degrees: cos = 0.5
    out = run("model_stock", [e1, e2], base=base)
    t = 2 * 0.5 / (1 + 0.5)  # N cos / (1 + (N - 1) cos)
    expected = t * (e1 + e2) / 2 + (1 - t) * base
    assert torch.allclose(out, expected, atol=1e-6)
    # orthogonal task vectors: t = 0, the base; opposite (cos = -1): singular for N = 2, the base
    assert torch.allclose(run("model_stock", [base + torch.tensor([1.0, 0]), base + torch.tensor([0, 1.0])],
                              base=base), base)
    assert torch.allclose(run("model_stock", [base + 1, base - 1], base=base), base)
    # filter-wise: one ratio per row
    rows = run("model_stock", [torch.tensor([[2.0, 0.0], [1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]])],
               base=torch.zeros(2, 2), glob={"filter_wise": True})
    assert torch.allclose(rows, torch.tensor([[2.0, 0.0], [0.0, 0.0]]))  # row 0 agrees (t = 1), row 1 (t = 0)


def test_nuslerp_with_and_without_a_base():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = run("nuslerp", [v0, v1], params=[{"weight": 1.0}, {"weight": 3.0}])  # t = 3 / 4
    assert torch.allclose(mid, torch.tensor([math.cos(3 * math.pi / 8), math.sin(3 * math.pi / 8)]), atol=1e-6)
    base = torch.tensor([2.0, -1.0])
    out = run("nuslerp", [base + v0, base + v1], base=base, params=[{"weight": 1.0}, {"weight": 1.0}])
    assert torch.allclose(out, base + torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)
    # per row: each row interpolated on its own circle; colinear rows fall back to lerp
    a, b = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    rows = run("nuslerp", [a, b], params=[{"weight": 1.0}, {"weight": 1.0}], glob={"nuslerp_flatten": False})
    assert torch.allclose(rows, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)], [1.5, 1.5]]), atol=1e-6)


def test_passthrough_copies_or_scales_one_model():
    x = torch.tensor([1.0, -2.0])
    assert torch.equal(run("passthrough", [x], params=[{}]), x)
    assert torch.equal(run("passthrough", [x], params=[{"scale": 0.5}]), torch.tensor([0.5, -1.0]))


def test_della_keeps_larger_entries_more_often_at_the_mean_density():
    # every row holds magnitudes 1..5 in a shuffled order: rank r = magnitude - 1
    gen = torch.Generator().manual_seed(0)
    rows = torch.stack([torch.randperm(5, generator=gen).float() + 1 for _ in range(40000)])
    pruned = ops.della_(rows.clone(), 0.5, 0.15, seed=1, name="w", index=0)
    rate = [float((pruned[rows == m] != 0).float().mean()) for m in range(1, 6)]
    expected = [0.35 + 0.3 * r / 4 for r in range(5)]  # density - eps + 2 eps r / (L - 1)
    assert rate == pytest.approx(expected, abs=0.01)
    assert torch.equal(pruned[pruned != 0], rows[pruned != 0])  # kept entries unchanged before rescaling
    again = ops.della_(rows.clone(), 0.5, 0.15, seed=1, name="w", index=0)
    assert torch.equal(pruned, again)
    # della (merge): the L1 rescale gives back each task vector's L1 norm
    base = torch.zeros_like(rows)
    out = run("della_linear", [rows], base=base, params=[{"weight": 1.0, "density": 0.5, "epsilon": 0.15}],
              glob={"seed": 3})
    assert float(out.abs().sum()) == pytest.approx(float(rows.abs().sum()), rel=1e-5)
    with pytest.raises(ValueError, match=r"density 0.1 \+- epsilon 0.15"):
        ops.della_(rows.clone(), 0.1, 0.15, seed=1, name="w", index=0)


def test_compute_dtype_rounds_where_mergekit_does():
    base = torch.tensor([1.0, 1.0, 1.0])
    e = torch.tensor([1.0 + 2 ** -12, 1.0 - 3 * 2 ** -11, 1.5])  # tau under float16's resolution at 1.0
    f32 = run("task_arithmetic", [e], base=base)
    half = ops.merge_tensor(OPERATORS["task_arithmetic"], "w", [e.half().float()], base.half().float(), [{}], {},
                            0.0, dtype=torch.float16)
    assert f32[0] != 1.0 and half[0] == 1.0  # the float16 input rounded 1 + 2^-12 to 1
    assert torch.equal(half, e.half().float())


# --- parity with mergekit, tensor by tensor ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mergekit_method():
    pytest.importorskip("mergekit", reason="mergekit not installed (pip install -e '.[dev]')")
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    def apply(method, tensors, base, per_model, glob, dtype, name="model.layers.0.mlp.up_proj.weight"):
        ids = [f"m{i}" for i in range(len(tensors))]
        group_tensors, base_index = list(tensors), None
        if base is not None:
            group_tensors, ids, base_index = [base, *group_tensors], ["base", *ids], 0
        group = TensorGroup.from_tensors([t.to(dtype) for t in group_tensors], ids=ids, base_index=base_index,
                                         name=name)
        params = dict(glob)
        for key in per_model[0]:
            params[key] = {f"m{i}": p[key] for i, p in enumerate(per_model)}
        (out,) = merge_methods.get(method)([group], parameters=params)
        return out

    return apply


def ours(method, tensors, base, per_model, glob, dtype):
    work = ops.work_dtype(dtype)
    copies = [t.to(dtype).to(work, copy=True) for t in tensors]
    b = base.to(dtype).to(work, copy=True) if base is not None else None
    out = ops.merge_tensor(OPERATORS[method], "model.layers.0.mlp.up_proj.weight", copies, b, per_model, glob, 0.0,
                           dtype=dtype)
    return out.to(dtype)


def _boundary_ties(method, tensors, base, per_model, dtype):
    """Entries whose task-vector magnitude equals a trimming boundary shared by several entries: there mergekit's
    unstable argsort keeps an arbitrary subset of the tie, the kit the first ones by position."""
    from simmerge_lib.kernels import kth_largest_abs

    tied = torch.zeros(base.shape, dtype=torch.bool)
    for x, p in zip(tensors, per_model):
        d = (x.to(dtype) - base.to(dtype)).float()
        n, density = d.numel(), p.get("density", 1.0)
        if density >= 1:
            continue
        ranks = [max(1, int(density * n))]
        if method.startswith("breadcrumbs"):
            target, top = int(density * n), int(p["gamma"] * n)
            bottom = max(0, n - target - top)
            ranks = [n - bottom, n - bottom - target]
        for r in ranks:
            if 1 <= r <= n:
                v, _, equal = kth_largest_abs(d, r)
                if equal > 1:
                    tied |= d.abs() == v
    return tied


GEN = torch.Generator().manual_seed(0)
SHAPE = (48, 80)
PBASE = torch.randn(SHAPE, generator=GEN) * 0.02
PE = [PBASE + torch.randn(SHAPE, generator=GEN) * 0.003 for _ in range(3)]
DETERMINISTIC = [
    ("linear", PE[:3], None, [{"weight": 1.0}, {"weight": 0.3}, {"weight": 0.5}], {}),
    ("slerp", PE[:1], PBASE, [{}], {"t": 0.3}),
    ("nuslerp", PE[:2], PBASE, [{"weight": 0.3}, {"weight": 0.6}], {}),
    ("nuslerp", PE[:2], None, [{"weight": 0.3}, {"weight": 0.6}], {"nuslerp_flatten": False}),
    ("nuslerp", PE[:2], PBASE, [{"weight": 1.0}, {"weight": 1.0}],
     {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("task_arithmetic", PE[:2], PBASE, [{"weight": 0.7}, {"weight": 0.5}], {"lambda": 0.8, "normalize": True}),
    ("ties", PE, PBASE, [{"weight": 0.7, "density": 0.3}, {"weight": 0.5, "density": 0.6},
                         {"weight": 1.0, "density": 0.5}], {"lambda": 0.9, "int8_mask": True}),
    ("ties", PE[:2], PBASE, [{"weight": 0.3, "density": 0.3}, {"weight": 0.5, "density": 0.6}],
     {"normalize": False, "rescale": True}),
    ("breadcrumbs", PE[:2], PBASE, [{"weight": 0.7, "density": 0.5, "gamma": 0.05},
                                    {"weight": 0.5, "density": 0.8, "gamma": 0.01}], {"rescale": True}),
    ("breadcrumbs_ties", PE[:2], PBASE, [{"weight": 0.7, "density": 0.5, "gamma": 0.05},
                                         {"weight": 0.5, "density": 0.8, "gamma": 0.01}], {"normalize": True}),
    ("model_stock", PE, PBASE, [{}, {}, {}], {}),
    ("model_stock", PE[:2], PBASE, [{}, {}], {"filter_wise": True}),
    ("passthrough", PE[:1], None, [{"scale": 0.5}], {}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", DETERMINISTIC, ids=lambda c: c[0])
def test_equals_mergekit_in_every_compute_dtype(mergekit_method, case, dtype):
    method, tensors, base, per_model, glob = case
    got = ours(method, tensors, base, per_model, glob, dtype).float()
    want = mergekit_method(method, tensors, base, per_model, glob, dtype).float()
    # float32: float32 rounding; float16 / bfloat16: one unit in the last place of the compute dtype
    rtol, atol = {torch.float32: (1e-5, 1e-8), torch.float16: (1e-3, 1e-6), torch.bfloat16: (8e-3, 1e-5)}[dtype]
    if method in ("nuslerp", "model_stock") and dtype != torch.float32:
        # mergekit rounds every intermediate of these two to the compute dtype; the kit computes them in float32
        # from rounded inputs and rounds the result: within a few units in the last place of the tensor's scale
        atol = 4 * torch.finfo(dtype).eps * float(want.abs().max())
    close = torch.isclose(got, want, rtol=rtol, atol=atol)
    if base is not None and method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        tied = _boundary_ties(method, tensors, base, per_model, dtype)
        assert not (~close & ~tied).any(), f"{method}: differs from mergekit away from trimming ties"
        assert int((~close).sum()) <= int(tied.sum())
    else:
        assert close.all(), f"{method}: max difference {float((got - want).abs().max())}"


def test_random_operators_match_mergekit_in_distribution(mergekit_method):
    """DARE and DELLA draw random masks (the kit from an explicit seed, mergekit from torch's global generator):
    they agree in distribution: the keep rate per magnitude rank and, with rescaling, the preserved mass."""
    torch.manual_seed(0)
    base = torch.zeros(400, 500)
    tau = torch.randn(400, 500, generator=torch.Generator().manual_seed(2))
    kept = {}
    for method, glob in [("dare_linear", {"rescale": False}), ("della_linear", {"rescale": False})]:
        per = [{"weight": 1.0, "density": 0.4, **({"epsilon": 0.2} if method.startswith("della") else {})}]
        got = ours(method, [tau], base, per, {**glob, "seed": 5}, torch.float32)
        want = mergekit_method(method, [tau], base, per, glob, torch.float32)
        ranks = tau.abs().argsort(dim=1).argsort(dim=1)  # per-row magnitude rank
        for label, out in (("ours", got), ("mergekit", want)):
            kept[(method, label)] = [float((out != 0)[(ranks >= q * 100) & (ranks < (q + 1) * 100)].float().mean())
                                     for q in range(5)]
            assert torch.equal(out[out != 0], tau[out != 0])  # survivors unchanged without rescaling
        assert kept[(method, "ours")] == pytest.approx(kept[(method, "mergekit")], abs=0.01), method
    assert kept[("dare_linear", "ours")] == pytest.approx([0.4] * 5, abs=0.01)  # DARE ignores magnitude
    assert kept[("della_linear", "ours")] == pytest.approx([0.24, 0.32, 0.40, 0.48, 0.56], abs=0.01)
    # with rescaling: DARE (1/density in the kit, L1 matching in mergekit) keeps the L1 mass in expectation,
    # DELLA (L1 matching in both) exactly
    for method, per in [("dare_ties", {"density": 0.4}), ("della", {"density": 0.4, "epsilon": 0.2})]:
        p = [{"weight": 1.0, **per}]
        got = ours(method, [tau], base, p, {"seed": 5}, torch.float32)
        want = mergekit_method(method, [tau], base, p, {}, torch.float32)
        assert float(got.abs().sum()) == pytest.approx(float(want.abs().sum()), rel=0.01), method


def test_della_ranks_ties_by_position_and_handles_constant_rows():
    # a constant row: ranks are positions, so keep rates rise along the row
    rows = torch.ones(20000, 5)
    pruned = ops.della_(rows.clone(), 0.5, 0.15, seed=2, name="w", index=0)
    rate = (pruned != 0).float().mean(0).tolist()
    assert rate == pytest.approx([0.35 + 0.3 * r / 4 for r in range(5)], abs=0.015)
    zeros = ops.della_(torch.zeros(7, 3), 0.5, 0.15, seed=2, name="w", index=0)  # nothing to keep
    assert not zeros.any()
    # many distinct values per row (the histogram decides most entries): the rate still follows the rank
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(400, 2000, generator=gen)
    kept = ops.della_(wide.clone(), 0.4, 0.2, seed=1, name="w", index=0) != 0
    ranks = wide.abs().argsort(dim=1).argsort(dim=1)
    by_fifth = [float(kept[(ranks >= q * 400) & (ranks < (q + 1) * 400)].float().mean()) for q in range(5)]
    assert by_fifth == pytest.approx([0.2 + 0.4 * (q * 400 + 199.5) / 1999 for q in range(5)], abs=0.01)


def test_the_bandit_reads_traits_from_the_registry():
    from simmerge_lib import bandit

    assert bandit.TRAIT_NAMES == ops.TRAITS
    for name, op in OPERATORS.items():
        assert bandit.operator_traits(name) == op.traits
    assert bandit.operator_traits("not_an_operator") == ()
