"""Chapter 06: contextual bandits over merge operators (replay on synthetic tables, live on the tiny catalogue)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from simmerge_lib import bandit as B


@pytest.fixture(scope="module")
def linear_setup():
    data = B.synthetic_problem(n_pairs=200, n_features=5, n_arms=4, noise=0.01, seed=0)
    scenario = B.Scenario(horizon=600, history=tuple(range(10)))
    return B.prepare_replay(data, scenario, n_components=5, predictor=False)


@pytest.fixture(scope="module")
def table_setup():
    features, labels = B.synthetic_tables(seed=0)
    data = B.replay_data(features, labels)
    scenario = B.make_scenario(data, horizon=300, seed=0)
    return B.prepare_replay(data, scenario, n_components=4)


def _halves(run: pd.DataFrame) -> tuple[float, float]:
    half = len(run) // 2
    return float(run.regret[:half].sum()), float(run.regret[half:].sum())


@pytest.mark.parametrize("name", ["linucb", "hybrid", "thompson"])
def test_regret_is_sublinear_and_beats_random(linear_setup, name):
    run = B.run_replay(B.make_policy(name, linear_setup, seed=0), linear_setup, seed=0)
    random = B.run_replay(B.make_policy("random", linear_setup, seed=0), linear_setup, seed=0)
    first, second = _halves(run)
    assert second < 0.5 * first, (first, second)  # it learns: later requests cost less
    assert run.regret.sum() < 0.25 * random.regret.sum()
    # a fixed arm cannot follow the context: the learner beats the best one
    fixed = B.run_replay(B.make_policy("best_fixed", linear_setup), linear_setup, seed=0)
    assert run.regret.sum() < fixed.regret.sum()


def test_adding_an_arm_keeps_earlier_statistics():
    rng = np.random.default_rng(0)
    old = [B.Arm("linear", "weight=0.5", (("weight", 0.5),)), B.Arm("ties", "density=0.2", (("density", 0.2),))]
    new = B.Arm("dare_ties", "density=0.2", (("density", 0.2),))
    for policy in (B.LinUCB(4, lam=2.0), B.LinearThompson(4, lam=2.0), B.HybridLinUCB(4, lam=2.0)):
        for arm in old:
            policy.add_arm(arm)
        for _ in range(30):
            x = np.r_[1.0, rng.normal(size=3)]
            arm = policy.select(x, old)
            policy.update(arm, x, float(rng.uniform()))
        if isinstance(policy, B.HybridLinUCB):
            before = {k: (policy.A[k].copy(), policy.b[k].copy(), policy.B[k].copy()) for k in policy.A}
            shared = (policy.A0.copy(), policy.b0.copy())
        else:
            before = {k: (m.A.copy(), m.b.copy()) for k, m in policy.models.items()}
        policy.add_arm(new)
        if isinstance(policy, B.HybridLinUCB):
            after = {k: (policy.A[k], policy.b[k], policy.B[k]) for k in before}
            np.testing.assert_array_equal(policy.A0, shared[0])
            np.testing.assert_array_equal(policy.b0, shared[1])
            np.testing.assert_array_equal(policy.A[new.key], 2.0 * np.eye(4))
        else:
            after = {k: (policy.models[k].A, policy.models[k].b) for k in before}
            np.testing.assert_array_equal(policy.models[new.key].A, 2.0 * np.eye(4))
            np.testing.assert_array_equal(policy.models[new.key].b, 0.0)
        assert sum(m[0].trace() for m in before.values()) > 2 * 2.0 * 4  # the old arms did learn
        for k in before:
            for x, y in zip(before[k], after[k], strict=True):
                np.testing.assert_array_equal(x, y)
        # the new arm can be chosen and updated next to the old ones
        policy.update(new, np.ones(4), 1.0)
        assert policy.select(np.ones(4), [*old, new]) in [*old, new]


def _joint_ridge(policy: B.HybridLinUCB, history, arms, lam):
    """Brute force: ridge on the stacked design [z, x ⊗ e_k] (what hybrid LinUCB maintains incrementally)."""
    d, k = policy.dim, policy.k

    def design(x, arm):
        row = np.zeros(k + d * len(arms))
        row[:k] = policy.shared(x, arm)
        j = arms.index(arm)
        row[k + j * d:k + (j + 1) * d] = x
        return row

    M = lam * np.eye(k + d * len(arms))
    v = np.zeros(k + d * len(arms))
    for x, arm, r in history:
        row = design(x, arm)
        M += np.outer(row, row)
        v += r * row
    w = np.linalg.solve(M, v)
    return design, w, np.linalg.inv(M)


def test_hybrid_linucb_matches_joint_ridge():
    rng = np.random.default_rng(1)
    arms = [B.Arm("linear", "weight=0.3", (("weight", 0.3),)), B.Arm("ties", "density=0.5", (("density", 0.5),)),
            B.Arm("slerp", "t=0.5", (("t", 0.5),))]
    lam, alpha = 1.5, 0.7
    policy = B.HybridLinUCB(4, alpha=alpha, lam=lam)
    for arm in arms:
        policy.add_arm(arm)
    history = []
    for _ in range(25):
        x = np.r_[1.0, rng.normal(size=3)]
        arm = arms[rng.integers(len(arms))]
        r = float(rng.normal())
        policy.update(arm, x, r)
        history.append((x, arm, r))
    design, w, M_inv = _joint_ridge(policy, history, arms, lam)
    x = np.r_[1.0, rng.normal(size=3)]
    expected = [design(x, a) @ w + alpha * np.sqrt(design(x, a) @ M_inv @ design(x, a)) for a in arms]
    np.testing.assert_allclose(policy.scores(x, arms, -1), expected, rtol=1e-6, atol=1e-8)


def test_linucb_matches_ridge():
    rng = np.random.default_rng(2)
    arm = B.Arm("linear", "default")
    policy = B.LinUCB(3, alpha=0.5, lam=0.5, offset=0.2)
    X = rng.normal(size=(20, 3))
    r = rng.normal(size=20)
    for x, y in zip(X, r, strict=True):
        policy.update(arm, x, y)
    A = 0.5 * np.eye(3) + X.T @ X
    theta = np.linalg.solve(A, X.T @ (r - 0.2))
    x = rng.normal(size=3)
    expected = theta @ x + 0.5 * np.sqrt(x @ np.linalg.solve(A, x))
    np.testing.assert_allclose(policy.scores(x, [arm], -1), [expected], rtol=1e-8)


def test_replay_is_reproducible(table_setup):
    runs = [B.run_replay(B.make_policy("thompson", table_setup, seed=3), table_setup, seed=3, noise=0.01)
            for _ in range(2)]
    pd.testing.assert_frame_equal(runs[0], runs[1])
    other = B.run_replay(B.make_policy("thompson", table_setup, seed=4), table_setup, seed=4, noise=0.01)
    assert not np.array_equal(other.pair.to_numpy(), runs[0].pair.to_numpy())
    # every policy of one seed sees the same requests
    fixed = B.run_replay(B.make_policy("best_fixed", table_setup), table_setup, seed=3)
    np.testing.assert_array_equal(fixed.pair.to_numpy(), runs[0].pair.to_numpy())


def test_events_control_what_is_requested_and_offered(table_setup):
    data, scenario = table_setup.data, table_setup.scenario
    assert [ev.kind for ev in scenario.events] == ["operator", "task", "experts"]
    op = scenario.events[0]
    new_keys = {data.arms[k].key for k in op.arms}
    enter = scenario.enter_time(len(data.pairs))
    for name in ("linucb", "hybrid", "random", "predictor"):
        run = B.run_replay(B.make_policy(name, table_setup, seed=0), table_setup, seed=0)
        assert not run[run.t < op.time].arm.isin(new_keys).any()
        assert (run.t >= enter[run.pair]).all()  # no pair before it exists
        assert not run.pair.isin(scenario.history).any()  # history pairs are never requested
        assert (run.regret >= -1e-12).all()
        assert (run[run.t < op.time].n_arms == len(data.arms) - len(op.arms)).all()
        if name == "predictor":  # frozen: it cannot choose an operator it was never trained on
            assert not run.arm.isin(new_keys).any()
        if name == "random":
            assert run[run.t >= op.time].arm.isin(new_keys).any()
    # the task and expert events bring their pairs into the stream
    for ev in scenario.events[1:]:
        assert enter[list(ev.pairs)].min() >= ev.time
        assert run[(run.t >= ev.time) & (run.t < ev.time + scenario.window)].pair.isin(ev.pairs).mean() > 0.3


def test_replay_many_and_summary(table_setup):
    runs = B.replay_many(table_setup, seeds=range(2), warm_start=["linucb"])
    assert set(runs.policy) == {"linucb", "hybrid", "thompson", "predictor", "best_fixed", "random", "linucb_warm"}
    summary = B.summarize_runs(runs, table_setup.scenario)
    rec = summary["policies"]["linucb"]
    for key in ("cumulative_regret", "operator_before", "operator_after", "task_after", "experts_after"):
        assert set(rec[key]) == {"mean", "std"}
    end = runs[runs.t == runs.t.max()].groupby("policy").cum_regret.mean()
    assert end["linucb"] < end["random"] and end["hybrid"] < end["random"]
    assert rec["cumulative_regret"]["mean"] == pytest.approx(end["linucb"], abs=1e-3)


def test_replay_data_checks_its_tables():
    features, labels = B.synthetic_tables(seed=0)
    data = B.replay_data(features, labels)
    assert data.quality.shape == (len(data.pairs), len(data.arms)) and np.isfinite(data.quality).all()
    assert data.tasks == ["reverse", "sort", "max", "min"]
    a, b = data.pairs.a[0], data.pairs.b[0]
    with pytest.raises(ValueError, match="no row for pair"):
        B.replay_data(features[~((features.a == a) & (features.b == b))], labels)
    with pytest.raises(ValueError, match="not among"):
        B.make_scenario(data, new_operator="breadcrumbs")


def test_arm_descriptor_shares_traits():
    ties = B.arm_descriptor(B.Arm("ties", "density=0.2", (("density", 0.2),)))
    dare = B.arm_descriptor(B.Arm("dare_ties", "density=0.2", (("density", 0.2),)))
    linear = B.arm_descriptor(B.Arm("linear", "weight=0.5", (("weight", 0.5),)))
    names = list(B.DESCRIPTOR_NAMES)
    assert ties[names.index("sign_elect")] == dare[names.index("sign_elect")] == 1.0
    assert linear[names.index("p_weight")] == 0.0 and ties[names.index("p_density")] == pytest.approx(-0.8)
    assert linear[names.index("task_vector")] == 0.0


def test_live_mode_on_tiny_catalogue(tiny_catalogue):
    from simmerge_lib.catalogue import Catalogue
    from simmerge_lib.labels import make_job, run_job

    catalogue = Catalogue.load(tiny_catalogue)
    requests = [("base0-reverse", "base0-sort"), ("base0-sort", "base0-max"), ("base1-reverse", "base1-max"),
                ("base0-reverse", "base0-sort")]
    X, tasks = B.live_contexts(catalogue, requests, n_probes=4, n_components=2)
    assert X.shape == (4, 1 + 2 + len(tasks)) and np.isfinite(X).all()
    arms = [B.Arm("linear", "weight=0.5", (("weight", 0.5),))]
    late = B.Arm("task_arithmetic", "lambda=1", (("lambda", 1.0),))
    env = B.LiveEnvironment(catalogue, n_eval=3)
    policy = B.LinUCB(X.shape[1])
    run = B.run_live(policy, env, requests, X, arms, new_arms={1: [late]}, oracle=True)
    assert list(run.arm[:1]) == [arms[0].key]
    assert run.reward.between(0, 10).all() and (run.regret >= 0).all()
    assert policy.models[arms[0].key].n + policy.models[late.key].n == len(requests)
    # the reward is the real merge's score, as the labels' job function measures it
    a, b = requests[0]
    job = make_job(catalogue, a, b, "linear", {"weight": 0.5}, 0, 3, env.parent_tasks(a, b))
    scores = run_job(str(catalogue.root.resolve()), job)["scores"]
    refs = [env.refs[(e, t)] for t in job.parent_tasks for e in (a, b) if t in catalogue.entry(e).tasks]
    expected = np.mean([scores[t] / r if r > 0 else scores[t] for t, r in zip(job.parent_tasks, refs, strict=True)])
    assert env.quality(a, b, arms[0]) == pytest.approx(expected)
    assert env.merges == len(env.cache)  # each (pair, arm) merged once


def test_warm_start_adds_weighted_pre_stream_observations(table_setup):
    obs = B.warm_observations(table_setup, "history")
    initial = [k for k, t in enumerate(table_setup.scenario.arm_time(len(table_setup.data.arms))) if t == 0]
    assert len(obs) == len(table_setup.scenario.history) * len(initial)
    assert len(B.warm_observations(table_setup, "predictor")) > len(obs)  # the predictor scores unmerged pairs too
    policy = B.make_policy("linucb", table_setup, lam=1.0)
    run = B.run_replay(policy, table_setup, seed=0, warm_start="history", warm_weight=0.25)
    key = table_setup.data.keys[initial[0]]
    X = table_setup.X
    seen = [p for p, k, _ in obs if k == initial[0]]
    streamed = run[run.arm == key].pair.to_numpy()
    expected = np.eye(X.shape[1]) + 0.25 * X[seen].T @ X[seen] + X[streamed].T @ X[streamed]
    np.testing.assert_allclose(policy.models[key].A, expected, rtol=1e-10)
    with pytest.raises(ValueError, match="warm-start source"):
        B.warm_observations(table_setup, "oracle")


def test_bandit_command(tmp_path, monkeypatch, capsys):
    import json

    from simmerge_lib.cli import main
    from simmerge_lib.features import features_path
    from simmerge_lib.labels import LABEL_COLUMNS, labels_path

    monkeypatch.setenv("SIMMERGE_BUILD", str(tmp_path))
    assert main(["bandit", "--profile", "synthetic"]) == 2
    assert "no features table" in capsys.readouterr().err
    features, labels = B.synthetic_tables(seed=0)
    assert set(LABEL_COLUMNS) <= set(labels.columns)
    features.to_parquet(features_path("synthetic"))
    labels.to_parquet(labels_path("synthetic"))
    assert main(["bandit", "--profile", "synthetic", "--seeds", "2", "--horizon", "200"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["seeds"] == 2 and set(out["policies"]) >= {"linucb", "hybrid", "thompson", "best_fixed", "random"}


def _runs(curves: dict[str, list[float]]) -> pd.DataFrame:
    """A one-seed runs frame from per-request regrets."""
    frames = [pd.DataFrame({"policy": p, "seed": 0, "t": np.arange(len(r)), "regret": r, "reward": 1 - np.asarray(r),
                            "cum_regret": np.cumsum(r)}) for p, r in curves.items()]
    return pd.concat(frames, ignore_index=True)


def test_crossing_time_is_where_a_learner_passes_the_fixed_arm_for_good():
    runs = _runs({"best_fixed": [0.5] * 10,
                  "learner": [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # cumulative 3 from t = 2: below 0.5 (t + 1) from t = 6
                  "late": [0, 0, 0, 2, 0, 0, 0, 0, 0, 0],  # below, level at t = 3 (2 = 2), below again from t = 4
                  "behind": [0, 0, 0, 0, 0, 0, 0, 0, 0, 6]})  # ahead all along, behind at the end
    assert B.crossing_time(runs, "learner") == 6
    assert B.crossing_time(runs, "late") == 4  # the first stretch below does not count
    assert B.crossing_time(runs, "behind") is None
    summary = B.summarize_runs(runs, B.Scenario(horizon=10))
    assert summary["policies"]["learner"]["crossing_best_fixed"] == 6
    assert "crossing_best_fixed" not in summary["policies"]["best_fixed"]
    # the last quarter of 10 requests: t = 7, 8, 9
    assert summary["policies"]["behind"]["last_quarter_regret"]["mean"] == pytest.approx(2.0)
    assert summary["policies"]["learner"]["last_quarter_regret"]["mean"] == 0.0


def test_scenario_for_keeps_every_event_the_table_allows():
    features, labels = B.synthetic_tables(seed=0)
    data = B.replay_data(features, labels)
    full = B.scenario_for(data, horizon=400, seed=0)
    assert [ev.kind for ev in full.events] == ["operator", "task", "experts"]
    assert full == B.make_scenario(data, 400, new_task="auto", new_experts=2, seed=0)
    # three tasks, one expert each, one base: withholding a task and two experts leaves no pair at the start
    small_f, small_l = B.synthetic_tables(n_bases=1, tasks=("reverse", "sort", "max"), experts_per_task=1,
                                          cross_base_pairs=0, seed=0)
    small = B.replay_data(small_f, small_l)
    with pytest.raises(ValueError, match="available before the events"):
        B.make_scenario(small, 200, new_experts=2)
    kept = B.scenario_for(small, horizon=200, seed=0)
    assert "operator" in [ev.kind for ev in kept.events] and "experts" not in [ev.kind for ev in kept.events]
    assert (kept.enter_time(len(small.pairs)) == 0).sum() >= 3
    with pytest.raises(ValueError, match="not among"):
        B.scenario_for(data, new_operator="breadcrumbs")


def test_registry_labels_are_collected_once(tiny_catalogue, tmp_path):
    from simmerge_lib.catalogue import Catalogue

    catalogue = Catalogue.load(tiny_catalogue)
    labels = pd.DataFrame({"a": ["base0-reverse", "base0-sort"], "b": ["base0-sort", "base0-reverse"],
                           "n_eval": 3, "seed": 0})
    out = tmp_path / "registry.parquet"
    first = B.registry_labels(catalogue, labels, ["della"], out=out)
    assert set(first.method) == {"della"} and (first.n_eval == 3).all()
    assert {(a, b) for a, b in zip(first.a, first.b)} == {("base0-reverse", "base0-sort")}  # one row set per pair
    assert set(first.task) == {"reverse", "sort"}
    stamp = out.stat().st_mtime_ns
    again = B.registry_labels(catalogue, labels, ["della"], out=out)
    pd.testing.assert_frame_equal(first.reset_index(drop=True), again.reset_index(drop=True))
    assert out.stat().st_mtime_ns == stamp  # nothing merged, nothing written
