"""The predictor (chapter 04): owner-oriented rows, leak-free splits, metrics and the cluster bootstrap against
hand-computed values, the ablation, abstaining, persistence and the CLI."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from simmerge_lib import predictor as P


@pytest.fixture(scope="module")
def tables():
    return P.synthetic_tables(seed=0)


@pytest.fixture(scope="module")
def synth(tables) -> pd.DataFrame:
    return P.training_table(*tables)


# --- the training table ----------------------------------------------------------------------------------------
def test_rows_are_owner_oriented_and_carry_every_target(tables, synth):
    features, labels, _ = tables
    assert len(synth) == labels.groupby(["a", "b", "task"]).ngroups  # one row per pair × parent task
    assert set(P.candidates_of(synth)) == set(labels.method + "|" + labels.setting)
    for row in synth.sample(10, random_state=0).itertuples():
        assert row.owner in (row.a, row.b) and row.other in (row.a, row.b) and row.owner != row.other
        assert row.task in row.owner  # the owner is the expert of the row's task
        f = features[(features.a == row.owner) & (features.b == row.other) & (features.task == row.task)].iloc[0]
        assert row.fn_b_base_kl == f.fn_b_base_kl  # the features row read from the owner's side
    assert (synth.keep_other == 0.5).all()  # the other expert alone, normalized by the owner's own score


def test_training_table_refuses_labels_without_features(tables):
    features, labels, reference = tables
    with pytest.raises(ValueError, match="no owner-oriented features row"):
        P.training_table(features[features.task_of_a == 0], labels, reference)
    with pytest.raises(ValueError, match="missing column"):
        P.training_table(features.drop(columns="task_of_a"), labels)


# --- splits never leak -----------------------------------------------------------------------------------------
def test_leave_one_task_out_never_trains_on_the_task(synth):
    splits = P.leave_one_task_out(synth)
    assert [s.held_out[0] for s in splits] == sorted(synth.task.unique())
    for s in splits:
        P.check_split(synth, s)
        train, test = synth[synth.pair.isin(s.train)], synth[synth.pair.isin(s.test)]
        assert s.held_out[0] not in set(train.task)
        assert not {e for e in set(train.a) | set(train.b) if s.held_out[0] in e}  # nor any expert of it
        assert test.groupby("pair").task.agg(lambda t: s.held_out[0] in set(t)).all()
        assert set(s.train) | set(s.test) == set(synth.pair)


def test_leave_one_expert_out_removes_the_siblings_from_training(synth):
    splits = P.leave_one_expert_out(synth)
    assert len(splits) == len(set(synth.owner))
    for s in splits:
        P.check_split(synth, s)
        expert = s.name.removeprefix("expert=")
        sibling = expert[:-2] if expert.endswith("-2") else expert + "-2"  # the same task on the same base
        assert set(s.held_out) == {expert, sibling}
        train = synth[synth.pair.isin(s.train)]
        assert not (train.a.isin(s.held_out) | train.b.isin(s.held_out)).any()
        assert all(expert in p.split("|") for p in s.test)


def test_check_split_catches_leaks(synth):
    split = P.leave_one_expert_out(synth)[0]
    leaky = P.Split(split.name, split.kind, split.held_out, split.train + split.test[:1], split.test[1:])
    with pytest.raises(AssertionError):
        P.check_split(synth, leaky)
    sibling = next(p for p in synth.pair.unique() if split.held_out[1] in p.split("|") and p not in split.test)
    with pytest.raises(AssertionError, match="sibling"):
        P.check_split(synth, P.Split(split.name, split.kind, split.held_out, split.train + (sibling,), split.test))
    task = P.leave_one_task_out(synth)[0]
    with pytest.raises(AssertionError):
        P.check_split(synth, P.Split(task.name, task.kind, task.held_out, task.train + task.test[:1], task.test[1:]))


# --- metrics and the cluster bootstrap ---------------------------------------------------------------------------
def test_gap_closure_hand_computed():
    records = pd.DataFrame({"simmerge": [0.8, 0.6], "best_fixed": [0.7, 0.6], "oracle": [0.9, 0.7]})
    assert P.gap_closure(records) == pytest.approx((0.7 - 0.65) / (0.8 - 0.65))


def test_cluster_bootstrap_resamples_whole_groups():
    """Two held-out groups: a resample is {A, A}, {A, B}, {B, A} or {B, B}, so the 95% interval spans exactly the
    two groups' own gap closures."""
    records = pd.DataFrame({"split": ["A", "A", "B"], "simmerge": [0.9, 0.8, 0.6], "best_fixed": [0.8, 0.7, 0.6],
                            "oracle": [0.9, 0.9, 0.8]})
    group_a = (0.85 - 0.75) / (0.9 - 0.75)
    group_b = 0.0
    lo, hi = P.cluster_bootstrap_ci(records, n_boot=2000, seed=0)
    assert (lo, hi) == (pytest.approx(group_b), pytest.approx(group_a))
    assert P.cluster_bootstrap_ci(records, n_boot=2000, seed=0) == (lo, hi)  # seeded


# --- the model ---------------------------------------------------------------------------------------------------
def test_predictor_recovers_the_planted_rule_on_unseen_tasks_and_experts(synth):
    for scheme in ("task", "expert"):
        result = P.nested_evaluation(synth, scheme, n_boot=200, progress=False, workers=1)
        m = result["metrics"]
        assert m["gap_closure_simmerge"] > 0.8, scheme
        assert result["ci"]["simmerge"][0] > 0.5, scheme
        assert m["gap_closure_task_pair_lookup"] < 0.5 and m["gap_closure_ablation"] < 0.5, scheme
        assert set(result["choices"].family) <= {"ridge", "forest"}
        assert m["spearman"] > 0.6


def test_nested_evaluation_is_cached_by_content(synth, tmp_path, monkeypatch):
    monkeypatch.setenv("SIMMERGE_BUILD", str(tmp_path))
    first = P.nested_evaluation(synth, "task", n_boot=50, progress=False, workers=1, cache=True)
    assert len(list((tmp_path / "predictor" / "nested").iterdir())) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("computed again although the cache holds this table's result")

    monkeypatch.setattr(P.nested, "_nested_evaluation", refuse)
    again = P.nested_evaluation(synth, "task", n_boot=50, progress=False, workers=1, cache=True)
    pd.testing.assert_frame_equal(first["records"], again["records"])
    assert again["metrics"] == pytest.approx(first["metrics"], nan_ok=True) and again["ci"] == first["ci"]
    column = P.feature_columns(synth)[0]
    changed = synth.assign(**{column: synth[column] + 1.0})  # another table: another key
    with pytest.raises(AssertionError, match="computed again"):
        P.nested_evaluation(changed, "task", n_boot=50, progress=False, workers=1, cache=True)
    with pytest.raises(AssertionError, match="computed again"):  # another argument: another key
        P.nested_evaluation(synth, "task", n_boot=51, progress=False, workers=1, cache=True)


def test_best_fixed_comes_from_the_training_pairs_only(synth):
    split = P.leave_one_task_out(synth)[0]
    records, _ = P.evaluate_split(synth, split, "ridge")
    train = synth[synth.pair.isin(split.train)]
    assert (records.fixed_candidate == P.pair_quality(train).mean().idxmax()).all()


def test_the_ablated_predictor_receives_constant_signals(synth):
    signals = P.similarity_columns(synth)
    ablated = P.fit_predictor(synth, "forest", ablate=signals, task_conditioned=True, classifier=False)
    assert set(ablated.constant) == set(signals) and ablated.task_conditioned
    shuffled = synth.copy()
    shuffled[signals] = shuffled[signals].sample(frac=1, random_state=1).to_numpy()
    pd.testing.assert_frame_equal(ablated.predict_rows(synth), ablated.predict_rows(shuffled))
    full = P.fit_predictor(synth, "forest", classifier=False)
    assert not full.predict_rows(synth).equals(full.predict_rows(shuffled))


def test_the_choice_adds_the_classifiers_vote_to_the_predicted_quality(synth):
    model = P.fit_predictor(synth, "forest")
    ranked = model.rank(synth).set_index(["pair", "candidate"])
    votes = model.vote(synth).stack()
    expected = ranked.predicted + model.vote_weight * (votes.reindex(ranked.index) - 1 / len(model.candidates))
    pd.testing.assert_series_equal(ranked.score, expected, check_names=False)
    assert model.vote_weight > 0
    assert (model.classify(synth) == model.vote(synth).idxmax(axis=1)).all()


def test_margin_hedges_towards_the_best_fixed_candidate(synth):
    plain = P.fit_predictor(synth, "ridge", classifier=False)
    hedged = P.fit_predictor(synth, "ridge", margin=1.0, classifier=False)
    assert (hedged.rank(synth).query("rank == 1").candidate == hedged.fixed).all()
    assert (plain.rank(synth).query("rank == 1").candidate != plain.fixed).any()


def test_recommend_abstains_when_no_candidate_beats_keeping_a_parent(synth):
    """A hand-made world where the other expert alone keeps 0.95 of each task but every merge keeps 0.6."""
    table = synth.copy()
    for c in P.candidates_of(table):
        table[f"y__{c}"] = 0.6
    table["keep_other"] = 0.95
    advice = P.fit_predictor(table, "ridge", classifier=False).recommend(table)
    assert advice.abstain.all()
    assert (advice.keep_predicted > advice.predicted).all() and (advice.margin_over_parent < 0).all()
    assert not P.fit_predictor(synth, "ridge", classifier=False).recommend(synth).abstain.any()


@pytest.mark.parametrize("family", ["ridge", "forest"])
def test_save_load_predicts_identically(synth, tmp_path, family):
    model = P.fit_predictor(synth, family, margin=0.01, metadata={"catalogue": "synthetic"})
    path = P.save_predictor(model, tmp_path / "p.skops")
    loaded = P.load_predictor(path)
    pd.testing.assert_frame_equal(loaded.rank(synth), model.rank(synth))
    assert loaded.fixed == model.fixed and loaded.metadata["catalogue"] == "synthetic"
    assert "sklearn" in loaded.metadata["versions"]


def test_load_refuses_untrusted_and_foreign_files(synth, tmp_path, monkeypatch):
    path = P.save_predictor(P.fit_predictor(synth, "ridge", classifier=False), tmp_path / "p.skops")
    monkeypatch.setattr(P.store, "TRUSTED_TYPES", [])
    if __import__("skops.io", fromlist=["io"]).get_untrusted_types(file=path):
        with pytest.raises(ValueError, match="untrusted"):
            P.load_predictor(path)
    (tmp_path / "junk.skops").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a skops predictor"):
        P.load_predictor(tmp_path / "junk.skops")
    with pytest.raises(FileNotFoundError, match="chapter 04"):
        P.load_predictor(tmp_path / "missing.skops")


def test_transfer_applies_the_predictor_unchanged(tables, synth):
    model = P.fit_predictor(synth, "forest", classifier=False)
    other = P.training_table(*P.synthetic_tables(seed=5))
    records, candidates = P.transfer_records(model, synth, other)
    assert len(records) == other.pair.nunique() and records.split.eq("transfer").all()
    assert P.gap_closure(records) > 0.5 and len(candidates) == len(records) * len(model.candidates)


# --- the command -------------------------------------------------------------------------------------------------
def test_recommend_prints_a_ranking_and_a_valid_recipe(tiny_catalogue, tmp_path, capsys):
    """On the tiny catalogue (random experts): features computed on the spot, both orders, owner-oriented."""
    from simmerge_lib.catalogue import Catalogue
    from simmerge_lib.cli import main
    from simmerge_lib.features import compute_features
    from simmerge_lib.labels import DEFAULT_GRID

    catalogue = Catalogue.load(tiny_catalogue)
    feats = compute_features(catalogue, n_probes=4, pairs=catalogue.pairs("same_base", ordered=True),
                             progress=False)
    rows = []
    for pair in catalogue.pairs("same_base"):
        for method, settings in DEFAULT_GRID.items():
            for setting in settings:
                label = ",".join(f"{k}={v:g}" for k, v in setting.items())
                for task in (catalogue.entry(pair[0]).tasks[0], catalogue.entry(pair[1]).tasks[0]):
                    rows.append({"a": pair[0], "b": pair[1], "task": task, "method": method, "setting": label,
                                 "parameters": "{}", "parent_task": True, "same_base": True, "norm_score": 0.5,
                                 "base_a": "base0", "base_b": "base0", "score": 0.5, "n_eval": 4})
    labels = pd.DataFrame(rows)
    labels.loc[labels.method == "ties", "norm_score"] = 0.8  # TIES is best everywhere
    model = P.fit_predictor(P.training_table(feats, labels), "ridge", classifier=False)
    path = P.save_predictor(model, tmp_path / "p.skops")
    out = tmp_path / "recipe.yml"
    assert main(["recommend", "base0-sort", "base0-reverse", "--catalogue", str(tiny_catalogue),
                 "--predictor", str(path), "--n-probes", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "keeping" in printed and "ties" in printed.splitlines()[2]
    recipe = yaml.safe_load(out.read_text())
    assert recipe["merge_method"] == "ties" and [m["model"].split("/")[-1] for m in recipe["models"]] == \
        ["base0-reverse", "base0-sort"]  # catalogue order, whatever order the pair was asked in
    assert main(["recommend", "base0-sort", "base0", "--catalogue", str(tiny_catalogue), "--predictor",
                 str(path)]) == 2
    assert "is a base" in capsys.readouterr().err
