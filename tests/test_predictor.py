"""The predictor (chapter 04): joins, leak-free splits, metrics against hand-computed values, persistence, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from simmerge_lib import predictor as P
from simmerge_lib.catalogue import Catalogue


@pytest.fixture(scope="module")
def synth() -> pd.DataFrame:
    features, labels = P.synthetic_tables(n_experts=6, seed=0)
    return P.training_table(features, labels)


# --- the training table ----------------------------------------------------------------------------------------
def test_training_table_joins_parent_tasks_only(synth):
    features, labels = P.synthetic_tables(n_experts=6, seed=0)
    parents = labels[labels.parent_task]
    assert len(synth) == len(parents)  # one row per pair × candidate × parent task, nothing duplicated
    assert set(synth.columns) >= {"pair", "task", "method", "setting", "norm_score", *P.PARAM_COLUMNS}
    row = synth.iloc[0]
    f = features[(features.a == row.a) & (features.b == row.b) & (features.task == row.task)].iloc[0]
    assert row.st_tv_cos == f.st_tv_cos  # the ordered (a, b) row of the features, as the labels order the pair
    assert set(synth[synth.method == "linear"].p_weight) == {0.3, 0.5, 0.7}
    assert (synth[synth.method == "ties"].p_weight == 0).all()


def test_training_table_refuses_labels_without_features():
    features, labels = P.synthetic_tables(n_experts=3, seed=1)
    with pytest.raises(ValueError, match="no features row"):
        P.training_table(features.iloc[1:], labels)
    with pytest.raises(ValueError, match="missing column"):
        P.training_table(features.drop(columns="task"), labels)


# --- splits never leak -----------------------------------------------------------------------------------------
def test_leave_one_task_out_holds_the_task_out(synth):
    splits = P.leave_one_task_out(synth)
    assert [s.held_out[0] for s in splits] == sorted(synth.task.unique())
    for s in splits:
        P.check_split(synth, s)
        train = synth[synth.pair.isin(s.train)]
        test = synth[synth.pair.isin(s.test)]
        assert s.held_out[0] not in set(train.task)
        assert test.groupby("pair").task.agg(lambda t: s.held_out[0] in set(t)).all()
        assert not set(train.pair) & set(test.pair)
        assert set(s.train) | set(s.test) == set(synth.pair)


def test_expert_splits_hold_the_experts_out(synth):
    experts = sorted(set(synth.a) | set(synth.b))
    loeo = P.leave_one_expert_out(synth)
    assert len(loeo) == len(experts)
    for s in loeo + P.expert_folds(synth, k=3, seed=0):
        P.check_split(synth, s)
        train = synth[synth.pair.isin(s.train)]
        assert not set(s.held_out) & (set(train.a) | set(train.b))
        assert all(set(p.split("|")) & set(s.held_out) for p in s.test)
    tested = {p for s in loeo for p in s.test}
    assert tested == set(synth.pair)  # every pair is held out at least once


def test_check_split_catches_leaks(synth):
    good = P.leave_one_expert_out(synth)[0]
    leaky = P.Split("leak", "expert", good.held_out, good.train + good.test[:1], good.test)
    with pytest.raises(AssertionError):
        P.check_split(synth, leaky)
    a, b = good.test[0].split("|")
    flipped = P.Split("flip", "expert", ("nobody",), (f"{b}|{a}",), good.test)
    with pytest.raises(AssertionError, match="both train and test"):
        P.check_split(synth, flipped)
    task = P.leave_one_task_out(synth)[0]
    with pytest.raises(AssertionError):
        P.check_split(synth, P.Split("t", "task", task.held_out, task.train + task.test[:1], task.test[1:]))


# --- metrics equal hand-computed values -----------------------------------------------------------------------
def hand_records() -> pd.DataFrame:
    return pd.DataFrame({
        "pair": ["p1", "p2", "p3", "p4"],
        "chosen": [0.9, 0.5, 0.7, 0.6],
        "oracle": [0.9, 0.8, 0.7, 0.6],
        "fixed": [0.6, 0.5, 0.705, 0.6],
        "fixed_linear": [0.6, 0.5, 0.705, 0.6],
        "fixed_ties": [0.9, 0.8, 0.5, 0.58],
        "spearman": [1.0, 0.5, np.nan, 0.0],
    })


def test_selection_metrics_hand_computed():
    m = P.selection_metrics(hand_records(), tol=0.01)
    assert m["quality_simmerge"] == pytest.approx(2.7 / 4)
    assert m["quality_best_fixed"] == pytest.approx(2.405 / 4)
    assert m["quality_oracle"] == pytest.approx(3.0 / 4)
    assert m["selection_accuracy"] == pytest.approx(3 / 4)  # p2 misses the oracle by 0.3
    assert m["mean_regret"] == pytest.approx(0.3 / 4)
    assert m["gap_closure"] == pytest.approx((2.7 - 2.405) / (3.0 - 2.405))
    # vs linear: p1 wins (0.9 > 0.61); p3 (0.7 vs 0.705) and p2, p4 are ties within tol
    assert m["win_rate_vs_linear"] == pytest.approx(1 / 4)
    assert m["loss_rate_vs_linear"] == 0.0
    # vs ties: p3 wins, p4 (0.6 vs 0.58) wins, p2 loses (0.5 vs 0.8)
    assert m["win_rate_vs_ties"] == pytest.approx(2 / 4)
    assert m["loss_rate_vs_ties"] == pytest.approx(1 / 4)
    assert m["spearman"] == pytest.approx(0.5)


def test_bootstrap_ci_brackets_the_estimate_and_is_seeded():
    records = pd.concat([hand_records()] * 3, ignore_index=True)
    records["pair"] = [f"p{i}" for i in range(len(records))]
    ci = P.bootstrap_ci(records, n_boot=200, seed=3)
    m = P.selection_metrics(records)
    for key in ("quality_simmerge", "mean_regret", "gap_closure"):
        lo, hi = ci[key]
        assert lo <= m[key] <= hi and lo < hi
    assert ci == P.bootstrap_ci(records, n_boot=200, seed=3)


def test_bootstrap_resamples_pairs_not_records():
    # the same pair tested twice (two splits) is one unit: every draw keeps both records or neither
    records = pd.DataFrame({"pair": ["p", "p", "q"], "chosen": [1.0, 0.0, 0.5], "oracle": [1.0, 1.0, 0.5],
                            "fixed": [0.5, 0.5, 0.5], "spearman": [np.nan] * 3})
    ci = P.bootstrap_ci(records, n_boot=100, seed=0)
    assert set(np.round(ci["mean_regret"], 6)) <= {0.0, 1 / 3, 0.5}


# --- the predictor learns the planted rule, on held-out experts ------------------------------------------------
def test_predictor_recovers_the_planted_rule_on_heldout_experts(synth):
    splits = P.expert_folds(synth, k=3, seed=0)
    records, cand = P.evaluate(synth, splits, "forest", progress=False)
    m = P.selection_metrics(records)
    assert m["gap_closure"] > 0.6 and m["quality_simmerge"] > m["quality_best_fixed"]
    assert m["spearman"] > 0.5
    assert set(records.pair) == {p for s in splits for p in s.test}
    assert cand.groupby(["split", "pair"]).size().eq(4).all()  # every candidate scored for every test pair


def test_fixed_choice_comes_from_training_pairs_only(synth):
    # make linear weight=0.3 far better on the held-out expert's pairs only: the best fixed must not notice
    split = P.leave_one_expert_out(synth)[0]
    table = synth.copy()
    boost = table.pair.isin(split.test) & (table.setting == "weight=0.3")
    table.loc[boost, "norm_score"] += 5.0
    records, _ = P.evaluate_split(table, split, "ridge")
    assert set(records.fixed_setting) == {"density=0.2"}  # TIES is the best on the training pairs
    assert (records.oracle_setting == "weight=0.3").all()


# --- persistence -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["ridge", "mlp"])
def test_save_load_predicts_identically(synth, tmp_path, family):
    model = P.fit_predictor(synth, family, metadata={"catalogue": "synthetic"})
    path = P.save_predictor(model, tmp_path / "p.skops")
    again = P.load_predictor(path)
    pd.testing.assert_frame_equal(model.rank(synth), again.rank(synth))
    assert (model.classify(synth) == again.classify(synth)).all()
    assert again.feature_names == model.feature_names and again.family == family and again.symmetric
    assert again.metadata["catalogue"] == "synthetic" and "sklearn" in again.metadata["versions"]
    pd.testing.assert_frame_equal(again.candidates, model.candidates, check_dtype=False)


def test_load_refuses_untrusted_types(synth, tmp_path):
    import argparse

    import skops.io as sio

    model = P.fit_predictor(synth, "ridge", classifier=False)
    P.save_predictor(model, tmp_path / "p.skops")
    state = sio.load(tmp_path / "p.skops", trusted=sio.get_untrusted_types(file=tmp_path / "p.skops"))
    state["classifier"] = argparse.Namespace(payload="x")
    sio.dump(state, tmp_path / "bad.skops")
    with pytest.raises(ValueError, match="untrusted type.*argparse.Namespace"):
        P.load_predictor(tmp_path / "bad.skops")
    (tmp_path / "junk.skops").write_text("not a zip")
    with pytest.raises(ValueError, match="not a skops predictor"):
        P.load_predictor(tmp_path / "junk.skops")
    with pytest.raises(FileNotFoundError):
        P.load_predictor(tmp_path / "missing.skops")


def test_rank_orders_candidates_and_respects_pair_order(synth):
    model = P.fit_predictor(synth, "ridge", classifier=False)
    rows = synth[synth.pair == synth.pair.iloc[0]]
    ranked = model.rank(rows)
    assert list(ranked["rank"]) == [1, 2, 3, 4]
    assert ranked.predicted.is_monotonic_decreasing
    with pytest.raises(ValueError, match="input column"):
        model.rank(rows.drop(columns="st_tv_cos"))


def test_owner_share_is_the_task_experts_share_of_the_merge():
    rows = pd.DataFrame({"parameters": ['{"weight": 0.3}', '{"weight": 0.3}', '{"t": 0.3}', '{"density": 0.5}',
                                        '{"weight": 0.8}'],
                         "p_weight": [0.3, 0.3, 0.0, 0.0, 0.8], "p_t": [0.0, 0.0, 0.3, 0.0, 0.0],
                         "task_of_a": [1.0, 0.0, 0.0, 1.0, np.nan]})
    # a's task at weight 0.3: 0.3; b's task: 0.7; SLERP t=0.3 leaves a 0.7, so b's task gets 0.3; TIES: 0.5
    np.testing.assert_allclose(P.owner_share(rows), [0.3, 0.7, 0.3, 0.5, np.nan])


def test_symmetric_rank_averages_both_orders_of_the_pair(synth):
    """q̂(a, b, c) = ½ [ŷ(a, b, c) + ŷ(b, a, mirror(c))]: (a, b) at weight w is (b, a) at weight 1 - w."""
    import dataclasses

    model = P.fit_predictor(synth, "ridge", classifier=False)
    one_sided = dataclasses.replace(model, symmetric=False)
    features, _ = P.synthetic_tables(n_experts=6, seed=0)
    both = P.with_mirror(features)
    a, b = synth.a.iloc[0], synth.b.iloc[0]
    rows, flip = (both[(both.a == x) & (both.b == y)] for x, y in ((a, b), (b, a)))
    assert len(flip) and (rows[P.MIRROR_PREFIX + "st_tv_cos"].to_numpy() == flip.st_tv_cos.to_numpy()).all()
    ours = model.rank(rows).set_index(["method", "setting"]).predicted
    own = one_sided.rank(rows).set_index(["method", "setting"]).predicted
    other = one_sided.rank(flip).set_index(["method", "setting"]).predicted
    mirror = {"weight=0.3": "weight=0.7", "weight=0.7": "weight=0.3"}
    assert not np.allclose(own.to_numpy(), ours.to_numpy())
    for (method, setting), value in ours.items():
        assert value == pytest.approx((own[(method, setting)] + other[(method, mirror.get(setting, setting))]) / 2)
    # without the other order's features the ranking is one-sided
    lonely = P.with_mirror(features[~((features.a == b) & (features.b == a))])
    pair_rows = lonely[(lonely.a == a) & (lonely.b == b)]
    assert pair_rows[P.MIRROR_PREFIX + "st_tv_cos"].isna().all()
    pd.testing.assert_series_equal(model.rank(pair_rows).predicted, one_sided.rank(pair_rows).predicted)


# --- the command -------------------------------------------------------------------------------------------------
def test_recommend_prints_ranking_and_a_valid_recipe(tiny_catalogue, tmp_path, capsys):
    from simmerge_lib import cli
    from simmerge_lib.features import FEATURE_COLUMNS, ProbeCache, compute_features
    from simmerge_lib.recipe import Recipe

    cat = Catalogue.load(tiny_catalogue)
    pairs = cat.pairs("same_base")[:3]
    feats = compute_features(cat, n_probes=4, pairs=pairs, progress=False, cache=ProbeCache(disk_dir=None))
    rows = []
    for a, b in pairs:
        f = feats[(feats.a == a) & (feats.b == b)]
        for t in f.task:
            cos = float(f.st_tv_cos.iloc[0])
            for method, setting, params, q in (("linear", "weight=0.5", {"weight": 0.5}, 0.5 + cos),
                                               ("slerp", "t=0.3", {"t": 0.3}, 0.6 - cos)):
                rows.append({"a": a, "b": b, "same_base": True, "method": method, "setting": setting,
                             "parameters": json.dumps(params), "task": t, "parent_task": True, "norm_score": q})
    table = P.training_table(feats, pd.DataFrame(rows))
    assert set(P.feature_columns(table)) == set(FEATURE_COLUMNS)
    path = P.save_predictor(P.fit_predictor(table, "ridge", classifier=False), tmp_path / "p.skops")
    out_file = tmp_path / "r.yaml"
    code = cli.main(["recommend", "base0-sort", "base0-reverse", "--catalogue", str(tiny_catalogue), "--predictor",
                     str(path), "--n-probes", "4", "--out", str(out_file)])
    text = capsys.readouterr().out
    assert code == 0
    assert "linear" in text and "slerp" in text and "merge_method" in text
    recipe = Recipe.from_dict(yaml.safe_load(out_file.read_text()))
    assert recipe.merge_method in {"linear", "slerp"}
    assert str(cat.path("base0-sort")) == recipe.models[0].model  # the first expert named comes first
    assert cli.main(["recommend", "base0-sort", "base0", "--catalogue", str(tiny_catalogue), "--predictor",
                     str(path)]) == 2


def test_margin_hedges_towards_the_best_fixed_candidate(synth):
    model = P.fit_predictor(synth, "ridge", classifier=False, margin=10.0)
    assert model.fixed == ("ties", "density=0.2")  # the best mean quality on these pairs
    chosen = model.select(synth)
    assert set(zip(chosen.method, chosen.setting)) == {model.fixed}
    records, _ = P.evaluate_split(synth, P.leave_one_expert_out(synth)[0], "ridge", margin=10.0)
    assert (records.chosen == records.fixed).all()


def test_with_margin_matches_a_refit_with_that_margin(synth):
    split = P.leave_one_expert_out(synth)[3]
    records, cand = P.evaluate(synth, [split], "ridge", progress=False)
    hedged, _ = P.evaluate(synth, [split], "ridge", progress=False, margin=0.1)
    again = P.with_margin(records, cand, 0.1)
    assert (again.chosen_setting != records.chosen_setting).any()  # the margin changes a choice here
    pd.testing.assert_frame_equal(again[["pair", "chosen_method", "chosen_setting", "chosen"]],
                                  hedged[["pair", "chosen_method", "chosen_setting", "chosen"]])
    assert (P.with_margin(records, cand, 0.0).chosen == records.chosen).all()


def test_nested_evaluation_chooses_inside_each_split(synth):
    """With one family and one margin there is nothing to choose: nested = plain held-out evaluation. With several,
    every split records its own choice, made from its training pairs."""
    plain = P.heldout_evaluation(synth, "expert", "ridge", n_boot=0, progress=False)
    nested = P.nested_evaluation(synth, "expert", families=("ridge",), margins=(0.0,), n_boot=0, progress=False)
    pd.testing.assert_frame_equal(plain["records"], nested["records"])
    both = P.nested_evaluation(synth, "expert", families=("ridge", "forest"), margins=(0.0, 0.05), k=2, n_boot=0,
                               progress=False)
    assert len(both["choices"]) == len(P.leave_one_expert_out(synth)) == both["records"].split.nunique()
    assert set(both["choices"].family) <= {"ridge", "forest"} and set(both["choices"].margin) <= {0.0, 0.05}
    assert np.isfinite(both["metrics"]["gap_closure"])


def test_noise_gap_grows_with_candidates_and_shrinks_with_examples():
    def labels(n_cand: int, n_eval: int) -> pd.DataFrame:
        rows = [{"a": "x", "b": "y", "method": "m", "setting": f"s{c}", "task": t, "parent_task": True,
                 "score": 0.5, "norm_score": 0.5 / 0.8, "n_eval": n_eval} for c in range(n_cand) for t in "tu"]
        return pd.DataFrame(rows)

    one = P.noise_gap(labels(1, 50))
    few, many = P.noise_gap(labels(2, 50), n_sim=4000), P.noise_gap(labels(15, 50))
    precise = P.noise_gap(labels(15, 5000))
    assert np.isnan(one) and 0 < few < many and precise < many / 5
    # two candidates, each a mean of 2 tasks: E[max(q0, q1) - q0] = sd(q0 - q1) / sqrt(2 pi), sd(q) = sqrt(.25/50/2)/.8
    assert few == pytest.approx(np.sqrt(2 * 0.25 / 100) / 0.8 / np.sqrt(2 * np.pi), rel=0.15)


def test_permutation_importance_finds_the_planted_feature(synth):
    model = P.fit_predictor(synth, "forest", classifier=False)
    imp = P.permutation_importance_table(model, synth, n_repeats=2, seed=0)
    assert list(imp.feature[:1]) != ["st_sign_conflict"]  # pure noise in the synthetic table
    assert imp.set_index("feature").importance[["st_tv_cos", "fn_js_mean"]].max() > 0.005
    assert set(imp.feature) == set(model.feature_names)
