from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_llama

from simmerge_lib import features as F
from simmerge_lib import kernels
from simmerge_lib.catalogue import Catalogue
from simmerge_lib.checkpoint import load_state_dict

PAIRS = [("base0-reverse", "base0-sort"), ("base0-sort", "base0-reverse"), ("base0-reverse", "base1-max")]


# --- functional primitives on synthetic tensors --------------------------------------------------------------
def test_cka_is_one_on_itself_and_invariant_to_rotation_and_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    y = torch.randn(64, 24, generator=gen)  # another width: CKA must still be defined
    assert F.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert F.linear_cka(x, 3.7 * (x.double() @ q)) == pytest.approx(1.0, abs=1e-10)
    assert F.linear_cka(x, y) == pytest.approx(F.linear_cka(-0.2 * (x.double() @ q), y), abs=1e-10)
    assert F.linear_cka(x, y) == pytest.approx(F.linear_cka(y, x), abs=1e-12)
    assert 0.0 < F.linear_cka(x, y) < 0.8
    # the n x n kernel form (used for wide layers) agrees with the feature form
    wide = torch.randn(8, 40, generator=gen)
    assert F.linear_cka(wide, 2 * wide) == pytest.approx(1.0, abs=1e-12)


def test_kl_is_zero_on_itself_and_never_negative():
    gen = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(3 * torch.randn(200, 46, generator=gen), -1)
    logq = torch.log_softmax(3 * torch.randn(200, 46, generator=gen), -1)
    assert abs(F.kl_rows(logp, logp)).max() < 1e-12
    assert (F.kl_rows(logp, logq) > 0).all() and (F.kl_rows(logq, logp) > 0).all()
    js = F.js_rows(logp, logq)
    assert abs(F.js_rows(logp, logp)).max() < 1e-12 and ((js > 0) & (js <= 1)).all()


# --- structural features ------------------------------------------------------------------------------------
def _expert(base: dict[str, torch.Tensor], tau: dict[str, torch.Tensor], sign: float) -> dict[str, torch.Tensor]:
    return {k: base[k] + sign * tau[k] for k in base}


def _outputs(logprobs, last):
    n = len(last)
    return F.ProbeOutputs(torch.tensor(logprobs, dtype=torch.float32).log(), [], [], torch.arange(n),
                          torch.tensor(last))


def test_answer_features_read_the_last_position_relative_to_the_bases():
    """Hand-computed on two probes of two positions each, V = 2: only the last positions count."""
    last = [False, True, False, True]
    base = _outputs([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]], last)
    a = _outputs([[0.9, 0.1], [0.8, 0.2], [0.9, 0.1], [0.8, 0.2]], last)
    b = _outputs([[0.1, 0.9], [0.2, 0.8], [0.1, 0.9], [0.4, 0.6]], last)
    feats = F.answer_features(a, b, base, base)
    kl = lambda p, q: sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # noqa: E731
    assert feats["fn_kl_answer"] == pytest.approx((kl([0.8, 0.2], [0.2, 0.8]) + kl([0.8, 0.2], [0.4, 0.6])) / 2, 1e-5)
    assert feats["fn_top1_answer"] == pytest.approx(0.0)  # a answers token 0 on both probes, b token 1
    assert feats["fn_a_base_kl"] == pytest.approx(kl([0.8, 0.2], [0.5, 0.5]), 1e-5)
    assert feats["fn_b_base_kl"] == pytest.approx((kl([0.2, 0.8], [0.5, 0.5]) + kl([0.4, 0.6], [0.5, 0.5])) / 2, 1e-5)
    assert feats["fn_base_entropy"] == pytest.approx(1.0, 1e-6)  # uniform base: maximal uncertainty
    move_a = np.log([0.8 / 0.5, 0.2 / 0.5] * 2)
    move_b = np.log([0.2 / 0.5, 0.8 / 0.5, 0.4 / 0.5, 0.6 / 0.5])
    assert feats["fn_delta_cos"] == pytest.approx(move_a @ move_b / np.linalg.norm(move_a) / np.linalg.norm(move_b), 1e-5)
    assert feats["fn_delta_cos"] < -0.5  # the two experts push this task's answers opposite ways
    without = F.answer_features(a, b)
    assert math.isnan(without["fn_a_base_kl"]) and without["fn_kl_answer"] == feats["fn_kl_answer"]


def test_task_vector_cosine_and_sign_conflict_of_tau_and_minus_tau():
    model, _ = tiny_llama(seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(2)
    tau = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    ref_base = F.ModelRef.memory(state_dict=base, name="base")
    a = F.ModelRef.memory(state_dict=_expert(base, tau, 1.0), name="a")
    same = F.structural_features(a, F.ModelRef.memory(state_dict=_expert(base, tau, 1.0)), ref_base, ref_base)
    opposite = F.structural_features(a, F.ModelRef.memory(state_dict=_expert(base, tau, -1.0)), ref_base, ref_base)
    assert same["st_tv_cos"] == pytest.approx(1.0) and same["st_sign_conflict"] == 0.0
    assert same["st_tv_dist"] == pytest.approx(0.0, abs=1e-6) and same["st_topk_jaccard"] == 1.0
    assert opposite["st_tv_cos"] == pytest.approx(-1.0) and opposite["st_sign_conflict"] == 1.0
    assert opposite["st_support_overlap"] == 1.0
    assert opposite["st_tv_dist"] == pytest.approx(1.0) and opposite["st_ties_conflict"] == 1.0
    for group in ("attn", "mlp", "embed", "early", "late"):
        assert opposite[f"st_tv_cos_{group}"] == pytest.approx(-1.0)
    # scale-free: doubling one task vector changes the norm ratio only
    double = F.structural_features(a, F.ModelRef.memory(state_dict=_expert(base, tau, 2.0)), ref_base, ref_base)
    assert double["st_tv_cos"] == pytest.approx(1.0) and double["st_tv_norm_ratio"] == pytest.approx(0.5)


def test_streamed_structural_features_equal_in_memory(tiny_catalogue):
    cat = Catalogue.load(tiny_catalogue)
    names = ["base0-reverse", "base1-max", "base0", "base1"]
    streamed = F.structural_features(*(cat.path(n) for n in names))
    states = {n: load_state_dict(cat.path(n)) for n in names}
    in_memory = F.structural_features(*(F.ModelRef.memory(state_dict=states[n], name=n) for n in names))
    assert streamed == pytest.approx(in_memory, nan_ok=True, rel=1e-12)
    # and both equal a direct computation on the concatenated task vectors
    ta = torch.cat([(states["base0-reverse"][k] - states["base0"][k]).flatten() for k in states["base0"]]).double()
    tb = torch.cat([(states["base1-max"][k] - states["base1"][k]).flatten() for k in states["base0"]]).double()
    # products are taken in float32 (memory: one tensor), so agreement is to float32 rounding
    assert streamed["st_tv_cos"] == pytest.approx(float(ta @ tb / (ta.norm() * tb.norm())), abs=1e-7)
    assert streamed["st_tv_dist"] == pytest.approx(float((ta - tb).norm() / (ta.norm() + tb.norm())), rel=1e-6)
    both = (ta != 0) & (tb != 0)
    assert streamed["st_sign_conflict"] == pytest.approx(float((both & (ta.sign() != tb.sign())).sum() / both.sum()))
    assert streamed["st_base_cos"] < 1.0 and F.swap_structural(streamed)["st_tv_norm_ratio"] == pytest.approx(
        F.structural_features(*(cat.path(n) for n in ["base1-max", "base0-reverse", "base1", "base0"]))[
            "st_tv_norm_ratio"])


def test_in_memory_model_gives_the_same_pair_features_as_its_folder(tiny_catalogue):
    cat = Catalogue.load(tiny_catalogue)
    model, _ = tiny_llama(seed=0)
    model.load_state_dict(load_state_dict(cat.path("base0-reverse")))
    folder = F.pair_features(cat.path("base0-reverse"), cat.path("base0-sort"), cat.path("base0"), cat.path("base0"),
                             "reverse", n_probes=4)
    memory = F.pair_features(model, cat.path("base0-sort"), cat.path("base0"), cat.path("base0"), "reverse",
                             n_probes=4)
    # the same numbers up to float summation order (a state dict lists its tensors in another order than a file)
    pd.testing.assert_frame_equal(folder.drop(columns=["a", "task_of_a"]), memory.drop(columns=["a", "task_of_a"]),
                                  rtol=1e-10)
    # which parent owns the task comes from the model cards: the in-memory model has none
    assert folder.loc[0, "task_of_a"] == 1.0 and np.isnan(memory.loc[0, "task_of_a"])
    assert F.task_owner(["sort"], ["reverse"], "reverse") == 0.0 and F.task_owner(["a"], ["a"], "a") == 0.5
    assert folder.loc[0, "same_base"] == 1
    assert folder.loc[0, "fn_kl_mean"] > 0 and folder.loc[0, "fn_cka_mean"] < 1


def _sharded_folder(folder, shards):
    """A checkpoint folder with an index and one safetensors file per dict in ``shards``."""
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_pread_reader_gives_the_tensors_safetensors_gives(tmp_path, monkeypatch):
    import os

    from safetensors import safe_open

    from simmerge_lib.checkpoint import CheckpointError, weight_files

    gen = torch.Generator().manual_seed(3)
    tensors = {
        "w.bf16": torch.randn(37, 53, generator=gen).to(torch.bfloat16),
        "w.f16": torch.randn(41, 7, generator=gen).to(torch.float16),
        "w.f32": torch.randn(5, 3, 2, generator=gen),
        "w.f64": torch.randn(11, generator=gen, dtype=torch.float64),
        "w.i64": torch.arange(-6, 6).reshape(3, 4),
        "w.scalar": torch.tensor(2.5, dtype=torch.bfloat16),
        "w.empty": torch.zeros(0, 4, dtype=torch.float16),
    }
    folder = _sharded_folder(tmp_path / "ck", [dict(list(tensors.items())[:3]), dict(list(tensors.items())[3:])])
    monkeypatch.setattr(F.refs, "_CHUNK", 17)  # float32 conversion slice by slice, slices not dividing the tensors
    fds_before = len(os.listdir("/proc/self/fd"))
    files = weight_files(folder)
    with F.ModelRef.folder(folder).tensors() as reader:
        assert reader.names() == list(files) and reader.owns_tensors
        for name, path in files.items():
            with safe_open(str(path), framework="pt") as fh:
                expected = fh.get_tensor(name)
            stored = reader.get_stored(name)
            assert stored.dtype == expected.dtype and torch.equal(stored, expected), name
            assert reader.shape(name) == tuple(expected.shape)
            got = reader.get(name)
            assert got.dtype == torch.float32 and torch.equal(got, expected.to(torch.float32)), name
        assert len(os.listdir("/proc/self/fd")) == fds_before + 2  # each shard opened once, kept open
    assert len(os.listdir("/proc/self/fd")) == fds_before  # and closed on exit

    # damaged shards: a CheckpointError naming the file, not a crash or a silent zero
    second = folder / "model-00002-of-00002.safetensors"
    data = second.read_bytes()
    second.write_bytes(data[:-8])  # truncated: the last tensor's bytes are cut
    with F.ModelRef.folder(folder).tensors() as reader:
        assert torch.equal(reader.get_stored("w.bf16"), tensors["w.bf16"])  # the intact shard still reads
        with pytest.raises(CheckpointError, match=f"{second}.*truncated"):
            reader.get("w.i64")
    second.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match=f"{second}.*corrupt safetensors header"):
        F.structural_features(folder, folder, folder, folder)
    second.write_bytes(data[:4])
    with F.ModelRef.folder(folder).tensors() as reader, pytest.raises(CheckpointError, match=str(second)):
        reader.shape("w.f64")


# --- the table ------------------------------------------------------------------------------------------------
def test_feature_rows_are_identical_across_runs(tiny_catalogue):
    cat = Catalogue.load(tiny_catalogue)
    caches = [F.ProbeCache(disk_dir=None), F.ProbeCache(disk_dir=None)]
    runs = [F.compute_features(cat, n_probes=4, pairs=PAIRS, progress=False, cache=c) for c in caches]
    pd.testing.assert_frame_equal(runs[0], runs[1])
    df = runs[0]
    assert list(df.columns) == F.ID_COLUMNS + F.FEATURE_COLUMNS and set(F.FEATURE_DOCS) == set(F.FEATURE_COLUMNS)
    assert len(df) == 2 + 2 + 2  # one row per ordered pair × task of a or b
    # one pass per model and task, not per pair: the 3 experts on 7 (model, task)s, their 2 bases on 5
    assert caches[0].forward_passes == 7 + 5 and caches[0].model_loads == 3 + 2
    fwd = df[(df.a == "base0-reverse") & (df.b == "base0-sort")].set_index("task")
    back = df[(df.a == "base0-sort") & (df.b == "base0-reverse")].set_index("task")
    assert fwd["fn_js_mean"].equals(back["fn_js_mean"]) and not fwd["fn_kl_mean"].equals(back["fn_kl_mean"])
    assert fwd["st_tv_norm_ratio"].iloc[0] == pytest.approx(1 / back["st_tv_norm_ratio"].iloc[0])
    assert df.set_index(["a", "b"])["same_base"].to_dict() == {
        ("base0-reverse", "base0-sort"): 1, ("base0-sort", "base0-reverse"): 1, ("base0-reverse", "base1-max"): 0}
    assert not df[F.FUNCTIONAL_COLUMNS + ["st_tv_cos", "st_sign_conflict", "st_base_cos"]].isna().any().any()
    assert math.isclose(df.loc[df.same_base == 1, "st_base_cos"].iloc[0], 1.0)


def test_disk_cache_and_command(tiny_catalogue, tmp_path, capsys):
    from simmerge_lib.cli import main

    cat = Catalogue.load(tiny_catalogue)
    first = F.compute_features(cat, n_probes=4, pairs=PAIRS[:1], progress=False, cache=F.ProbeCache(tmp_path / "c"))
    again = F.ProbeCache(tmp_path / "c")
    pd.testing.assert_frame_equal(first, F.compute_features(cat, n_probes=4, pairs=PAIRS[:1], progress=False,
                                                            cache=again))
    assert again.forward_passes == 0
    out = tmp_path / "f.parquet"
    assert main(["features", str(tiny_catalogue), "--out", str(out), "--n-probes", "2", "--pairs", "cross_base",
                 "--no-cache"]) == 0
    cross = cat.pairs("cross_base", ordered=True, distinct_tasks=False)
    assert len(pd.read_parquet(out)) == sum(len({*cat.entry(a).tasks, *cat.entry(b).tasks}) for a, b in cross)
    assert main(["features", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no catalogue file" in capsys.readouterr().err


def test_load_or_compute_reuses_the_saved_table(tiny_catalogue, tmp_path, monkeypatch):
    monkeypatch.setenv("SIMMERGE_BUILD", str(tmp_path))
    cat = Catalogue.load(tiny_catalogue)
    table = F.load_or_compute(cat, "smoke", n_probes=2, progress=False)
    assert F.features_path("smoke") == tmp_path / "features" / "smoke.parquet" and F.features_path("smoke").is_file()
    monkeypatch.setattr(F.table, "compute_features", lambda *a, **k: pytest.fail("recomputed a cached table"))
    pd.testing.assert_frame_equal(table, F.load_or_compute(cat, "smoke", n_probes=2))
    sim = F.similarity_matrix(table, "fn_cka_mean")
    assert (sim.to_numpy() == sim.to_numpy().T).all() and (sim.to_numpy().diagonal() == 1).all()
    assert list(sim.index) == sorted(m.name for m in cat.experts())


def test_chunked_tensor_statistics_equal_whole_tensor_ones(monkeypatch):
    # Huge tensors are accumulated slice by slice; slicing must not change any count or sum.
    gen = torch.Generator().manual_seed(0)
    ta, tb = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    ta[::7] = 0.0
    whole = F._tensor_acc(ta, tb, 0.2)
    monkeypatch.setattr(F.structural, "_CHUNK", 13)
    sliced = F._tensor_acc(ta, tb, 0.2)
    for field in ("both_nz", "either_nz", "conflict", "inter", "union", "kept_conflict", "tensors"):
        assert getattr(sliced, field) == getattr(whole, field)
    for field in ("dot", "na", "nb", "diff"):
        assert getattr(sliced, field) == pytest.approx(getattr(whole, field), rel=1e-9)
    keep_a = ta.abs() >= torch.topk(ta.abs(), 200).values.min()
    keep_b = tb.abs() >= torch.topk(tb.abs(), 200).values.min()
    assert whole.inter == int((keep_a & keep_b).sum()) and whole.union == int((keep_a | keep_b).sum())
    assert whole.conflict == int(((ta * tb) < 0).sum())


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0, 1e-4])
def test_radix_selected_ties_threshold_equals_topk(monkeypatch, density):
    gen = torch.Generator().manual_seed(1)
    tau = torch.randn(5000, generator=gen) * torch.logspace(-30, 30, 5000)  # every exponent range, both signs
    tau[::3] = 0.0
    tau[10:20] = 0.5  # ties at the threshold
    tau[20:23] = torch.tensor([float("inf"), -float("inf"), 1e-44])  # infinities and a subnormal
    exact = F._ties_threshold(tau, density)  # topk path
    monkeypatch.setattr(kernels, "RADIX_MIN", 97)  # forces the sliced radix-select path
    assert F._ties_threshold(tau, density) == exact
    for same in (torch.zeros(5000), torch.full((5000,), -0.25)):  # one bucket holds everything
        assert F._ties_threshold(same, density) == float(same.abs()[0])
