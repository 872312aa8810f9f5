"""Label collection (chapter 03): job keys, recipes, resumability, executors and the win / oracle analysis."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from simmerge_lib import labels as L
from simmerge_lib.catalogue import Catalogue

#: Exact match of random tiny models is always 0; a soft score (mean probability of the answer tokens) makes
#: every merge distinguishable, so equality tests between executors can fail.
SOFT_EVALUATOR = textwrap.dedent('''
    import torch
    from simmerge_lib.tasks import get_task
    from simmerge_lib.zoo import encode_batch

    @torch.no_grad()
    def soft_scores(model, tokenizer, tasks, n):
        out = {}
        for t in tasks:
            batch = encode_batch(get_task(t).split("eval", n), tokenizer, answer_only=True)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            per_example = (logp * mask).sum(1) / mask.sum(1)
            out[t] = float(per_example.exp().mean())
        return out
''')
GRID = {"linear": [{"weight": 0.5}], "task_arithmetic": [{"lambda": 1.0}], "ties": [{"density": 0.5}],
        "dare_ties": [{"density": 0.5}]}
VOLATILE = ["seconds", "versions"]


@pytest.fixture(scope="module")
def soft_catalogue(tiny_catalogue, tmp_path_factory, monkeypatch_module):
    """The tiny catalogue (absolute model paths) scored by the soft evaluator, importable by every worker."""
    folder = tmp_path_factory.mktemp("soft")
    (folder / "simmerge_soft_eval.py").write_text(SOFT_EVALUATOR)
    monkeypatch_module.syspath_prepend(str(folder))
    monkeypatch_module.setenv("PYTHONPATH", str(folder))
    tiny = Catalogue.load(tiny_catalogue)
    data = json.loads((tiny_catalogue / "catalogue.json").read_text())
    data["evaluator"] = "simmerge_soft_eval:soft_scores"
    for m in data["models"]:
        m["path"] = str(tiny.path(m["name"]))
    (folder / "catalogue.json").write_text(json.dumps(data))
    return Catalogue.load(folder)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def jobs(soft_catalogue):
    return L.make_jobs(soft_catalogue, GRID, cross_base_sample=1, n_eval=6)


@pytest.fixture(scope="module")
def reference_run(soft_catalogue, jobs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "labels.parquet"
    return out, L.collect_labels(soft_catalogue, jobs, out, workers=1, progress=False)


@pytest.fixture(scope="module")
def reference_table(reference_run):
    return reference_run[1]


def _stable(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=VOLATILE).sort_values(["job_key", "task"]).reset_index(drop=True)


# --- jobs and keys ---------------------------------------------------------------------------------------------------


def test_job_keys_are_stable_and_differ_when_any_field_differs(tiny_catalogue):
    cat = Catalogue.load(tiny_catalogue)
    a, b = "base0-reverse", "base0-sort"
    base = L.make_job(cat, a, b, "ties", {"density": 0.2}, seed=0, n_eval=10)
    assert base.key == L.make_job(Catalogue.load(tiny_catalogue), a, b, "ties", {"density": 0.2}, 0, 10).key
    variants = [
        L.make_job(cat, b, a, "ties", {"density": 0.2}, 0, 10),          # model order
        L.make_job(cat, a, "base0-max", "ties", {"density": 0.2}, 0, 10),  # another model
        L.make_job(cat, a, b, "dare_ties", {"density": 0.2}, 0, 10),     # method
        L.make_job(cat, a, b, "ties", {"density": 0.5}, 0, 10),          # parameters
        L.make_job(cat, a, b, "ties", {"density": 0.2}, 1, 10),          # seed
        L.make_job(cat, a, b, "ties", {"density": 0.2}, 0, 11),          # eval n
        L.make_job(cat, a, b, "ties", {"density": 0.2}, 0, 10, tasks=["reverse", "sort"]),  # evaluated tasks
    ]
    cat.evaluator = "pkg.mod:fn"
    variants.append(L.make_job(cat, a, b, "ties", {"density": 0.2}, 0, 10))  # evaluator
    cat.evaluator, cat.recipe_hash = None, "0123456789abcdef"
    variants.append(L.make_job(cat, a, b, "ties", {"density": 0.2}, 0, 10))  # catalogue recipe
    keys = [base.key] + [v.key for v in variants]
    assert len(set(keys)) == len(keys)


def test_make_jobs_covers_pairs_and_grid(tiny_catalogue):
    cat = Catalogue.load(tiny_catalogue)
    jobs = L.make_jobs(cat, GRID, cross_base_sample=2, seed=3)
    pairs = {(j.a, j.b) for j in jobs}
    assert set(cat.pairs("same_base")) <= pairs
    assert len(pairs - set(cat.pairs("same_base"))) == 2
    assert len(jobs) == len(pairs) * 4 and len({j.key for j in jobs}) == len(jobs)
    assert {j.setting for j in jobs} == {"weight=0.5", "lambda=1", "density=0.5"}
    assert L.make_jobs(cat, GRID, cross_base_sample=2, seed=3) == jobs
    parents_only = L.make_jobs(cat, GRID, cross_base_sample=0, tasks="parents")
    assert all(j.tasks == j.parent_tasks and len(j.tasks) == 2 for j in parents_only)
    with pytest.raises(ValueError, match="unknown parameter"):
        L.make_jobs(cat, {"linear": [{"density": 0.2}]})


def test_jobs_are_order_free(tiny_catalogue):
    """Swapping every pair gives the same jobs, and a setting that favours one expert is refused."""
    cat = Catalogue.load(tiny_catalogue)
    pairs = cat.pairs("same_base") + cat.pairs("cross_base")[:2]
    forward = L.make_jobs(cat, L.DEFAULT_GRID, pairs=pairs)
    swapped = L.make_jobs(cat, L.DEFAULT_GRID, pairs=[(b, a) for a, b in pairs])
    assert [j.key for j in forward] == [j.key for j in swapped]
    for grid in ({"linear": [{"weight": 0.3}]}, {"slerp": [{"t": 0.7}]}):
        with pytest.raises(ValueError, match="not order-free"):
            L.make_jobs(cat, grid, pairs=pairs)


def test_every_grid_candidate_is_symmetric_in_its_experts(tiny_catalogue):
    """merge(a, b) = merge(b, a) for every candidate of the default grid (DARE: with the same mask per expert)."""
    from simmerge_lib.checkpoint import load_state_dict
    from simmerge_lib.operators import merge_state_dicts
    from simmerge_lib.recipe import Recipe

    cat = Catalogue.load(tiny_catalogue)
    states = {m.name: load_state_dict(cat.path(m.name)) for m in cat.models}
    a, b = "base0-reverse", "base0-sort"

    def merged(first, second, method, setting):
        recipe = Recipe.from_dict(L.job_recipe(method, first, second, "base0", setting, seed=3))
        specs, base = recipe.merge_inputs()
        return merge_state_dicts(method, [states[s.model] for s in specs], states[base.model] if base else None,
                                 [dict(s.parameters) for s in specs], recipe.parameters, 2)

    for method, settings in L.DEFAULT_GRID.items():
        if method.startswith("dare"):
            continue  # masks are drawn per position in the recipe; pairs are canonical, so no swap ever happens
        for setting in settings:
            one, other = merged(a, b, method, setting), merged(b, a, method, setting)
            for name in one:
                assert torch.allclose(one[name], other[name], atol=1e-6), (method, setting, name)


def test_recipes_follow_the_documented_conventions(tiny_catalogue):
    cat = Catalogue.load(tiny_catalogue)
    lin = L.make_job(cat, "base0-reverse", "base0-sort", "linear", {"weight": 0.3}).recipe
    assert [m["parameters"]["weight"] for m in lin["models"]] == [0.3, pytest.approx(0.7)]
    slerp = L.make_job(cat, "base0-reverse", "base0-sort", "slerp", {"t": 0.7}).recipe
    assert slerp["base_model"] == "base0-reverse" and slerp["parameters"] == {"t": 0.7}
    cross = L.make_job(cat, "base0-reverse", "base1-sort", "dare_ties", {"density": 0.2}, seed=5)
    assert cross.recipe["base_model"] == "base0" and cross.recipe["parameters"]["seed"] == 5
    assert not (cross.base_a == cross.base_b)
    assert setting_is_short(L.setting_label({"weight": 0.5, "density": 0.2}))


def setting_is_short(label: str) -> bool:
    return label == "density=0.2,weight=0.5"


# --- collection ------------------------------------------------------------------------------------------------------


def test_table_columns_normalization_and_recipe_reproduces_row(soft_catalogue, jobs, reference_run):
    out, table = reference_run
    assert list(table.columns) == L.LABEL_COLUMNS
    assert len(table) == sum(len(j.tasks) for j in jobs) and table.job_key.nunique() == len(jobs)
    assert table.groupby("job_key").parent_task.sum().eq(2).all()
    assert (table.score > 0).all() and table.score.nunique() > len(table) // 2
    assert table.norm_score.notna().all()  # non-parent tasks are normalized by that task's expert on base(a)
    # norm_score = score / the parent's own (reference) score on a parent task
    refs = pd.read_parquet(L.reference_path(out))
    row = table[(table.a == "base0-reverse") & (table.b == "base0-sort") & (table.task == "sort")].iloc[0]
    own = refs[(refs.model == "base0-sort") & (refs.task == "sort")].score.iloc[0]
    assert row.norm_score == pytest.approx(row.score / own)
    # the stored recipe, run through the streaming engine's in-memory path, reproduces the stored score
    from simmerge_lib.engine import merge_in_memory
    from simmerge_lib.evaluate import evaluate_state_dict, load_model, resolve_evaluator
    from simmerge_lib.recipe import Recipe

    row = table[(table.method == "dare_ties") & ~table.same_base].iloc[0]
    recipe = Recipe.from_dict(yaml.safe_load(row.recipe), root=soft_catalogue.root)
    model, tok = load_model(soft_catalogue.path(row.a))
    scores = evaluate_state_dict(model, tok, merge_in_memory(recipe), [row.task], 6,
                                 resolve_evaluator(soft_catalogue.evaluator))
    assert scores.score.iloc[0] == pytest.approx(row.score, abs=1e-6)
    assert json.loads(row.versions)["torch"].startswith("2.")


def test_streaming_engine_path_gives_the_same_scores(soft_catalogue, jobs, reference_table, monkeypatch):
    monkeypatch.setattr(L.run, "IN_MEMORY_LIMIT", 0)  # every checkpoint counts as large: merge to disk, then load
    job = next(j for j in jobs if j.method == "ties" and j.base_a != j.base_b)
    streamed = L.run_job(str(soft_catalogue.root), job)["scores"]
    expected = reference_table[reference_table.job_key == job.key].set_index("task").score
    assert streamed == pytest.approx(expected.to_dict(), abs=1e-6)


def test_resume_after_interruption_equals_uninterrupted_run(soft_catalogue, jobs, reference_table, tmp_path):
    out = tmp_path / "labels.parquet"
    seen = []

    def stop_after_three(job, rows):
        seen.append(job.key)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        L.collect_labels(soft_catalogue, jobs, out, workers=1, progress=False, flush_every=1000,
                         callback=stop_after_three)
    assert set(pd.read_parquet(out).job_key) == set(seen)  # the interrupted run kept every finished row
    seen.clear()
    resumed = L.collect_labels(soft_catalogue, jobs, out, workers=1, progress=False,
                               callback=lambda job, rows: seen.append(job.key))
    assert len(seen) == len(jobs) - 3
    pd.testing.assert_frame_equal(_stable(resumed), _stable(reference_table))
    seen.clear()
    again = L.collect_labels(soft_catalogue, jobs, out, workers=1, progress=False,
                             callback=lambda job, rows: seen.append(job.key))
    assert seen == [] and len(again) == len(resumed)


def test_process_pool_gives_identical_rows(soft_catalogue, jobs, reference_table, tmp_path):
    pooled = L.collect_labels(soft_catalogue, jobs[:8], tmp_path / "pool.parquet", workers=2, progress=False)
    expected = reference_table[reference_table.job_key.isin({j.key for j in jobs[:8]})]
    pd.testing.assert_frame_equal(_stable(pooled), _stable(expected))


def test_ray_executor_gives_identical_rows(soft_catalogue, jobs, reference_table, tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install ray)")
    # The workers find the soft evaluator through PYTHONPATH, set by the soft_catalogue fixture.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = L.collect_labels(soft_catalogue, jobs[:4], tmp_path / "ray.parquet", executor="ray",
                                  progress=False)
    finally:
        ray.shutdown()
    expected = reference_table[reference_table.job_key.isin({j.key for j in jobs[:4]})]
    pd.testing.assert_frame_equal(_stable(remote), _stable(expected))


def test_cli_runs_and_reports(soft_catalogue, tmp_path, capsys):
    from simmerge_lib.cli import main

    out = tmp_path / "cli.parquet"
    assert main(["labels", str(soft_catalogue.root), "--out", str(out), "--profile", "smoke", "--n", "2",
                 "--workers", "1", "--cross-base-sample", "0", "--tasks", "parents"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["jobs"] == 6 * 6 and summary["rows"] == 6 * 6 * 2
    assert set(summary["win_share"]) == {*map(L.family, L.SMOKE_GRID), "tie"}
    assert main(["labels", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no catalogue file" in capsys.readouterr().err


# --- analysis --------------------------------------------------------------------------------------------------------


def _quality(rows):
    frame = pd.DataFrame(rows, columns=["a", "b", "method", "setting", "quality"])
    frame["same_base"], frame["tasks"], frame["job_key"] = True, "x,y", range(len(frame))
    frame["base_a"] = frame["base_b"] = "base0"
    return frame


def test_merge_quality_is_the_mean_over_parent_tasks():
    labels = pd.DataFrame({"job_key": ["k"] * 3, "a": "e1", "b": "e2", "base_a": "b0", "base_b": "b0",
                           "same_base": True, "method": "ties", "setting": "density=0.2", "seed": 0,
                           "task": ["x", "y", "z"], "parent_task": [True, True, False],
                           "score": [0.5, 0.9, 0.1], "norm_score": [0.5, 1.0, 0.2], "seconds": 1.0})
    q = L.merge_quality(labels)
    assert len(q) == 1 and q.quality.iloc[0] == pytest.approx(0.75) and q.tasks.iloc[0] == "x,y"


def test_wins_need_a_margin_and_ties_are_counted_apart():
    q = _quality([
        ("p", "q", "linear", "weight=0.3", 0.80), ("p", "q", "linear", "weight=0.7", 0.90),
        ("p", "q", "ties", "density=0.2", 0.70),                      # linear wins by 0.2
        ("r", "s", "linear", "weight=0.3", 0.60), ("r", "s", "ties", "density=0.2", 0.605),  # within tol: tie
        ("u", "v", "linear", "weight=0.3", 0.40), ("u", "v", "ties", "density=0.2", 0.50),   # ties wins
        ("w", "z", "linear", "weight=0.3", 0.30), ("w", "z", "ties", "density=0.2", 0.90),   # ties wins
    ])
    shares = L.win_shares(q, tol=0.01).set_index("method")
    assert shares.loc[["linear", "ties", "tie"], "wins"].tolist() == [1, 2, 1]
    assert shares.share.sum() == pytest.approx(1.0)
    assert shares.loc["ties", "share_decided"] == pytest.approx(2 / 3)
    assert L.max_win_share(shares.reset_index()) == pytest.approx(0.5)
    assert L.win_shares(q, tol=0.25).set_index("method").loc["tie", "wins"] == 3  # only the 0.6 margin survives


def test_oracle_and_best_fixed():
    q = _quality([
        ("p", "q", "linear", "weight=0.5", 0.9), ("p", "q", "ties", "density=0.2", 0.5),
        ("r", "s", "linear", "weight=0.5", 0.4), ("r", "s", "ties", "density=0.2", 0.6),
        ("u", "v", "linear", "weight=0.5", 0.7), ("u", "v", "ties", "density=0.2", 0.7),
    ])
    assert L.best_fixed(q) == ("linear", "weight=0.5")  # mean 0.667 vs 0.6
    table = L.oracle_vs_fixed(q)
    assert table.gap.tolist() == pytest.approx([0.0, 0.2, 0.0])
    assert table.oracle_method.tolist()[:2] == ["linear", "ties"]
    assert np.isfinite(table.fixed).all()


def test_family_wins_and_best_fixed_do_not_depend_on_pair_order():
    q = _quality([
        ("p", "q", "linear", "weight=0.5", 0.9), ("p", "q", "slerp", "t=0.5", 0.92), ("p", "q", "ties", "density=0.2", 0.5),
        ("r", "s", "linear", "weight=0.5", 0.4), ("r", "s", "slerp", "t=0.5", 0.4), ("r", "s", "ties", "density=0.2", 0.6),
    ])
    shares = L.win_shares(q, tol=0.01, level="family").set_index("method")
    assert shares.loc[["linear/SLERP", "TIES/DARE", "tie"], "wins"].tolist() == [1, 1, 0]
    swapped = q.rename(columns={"a": "b", "b": "a"})
    assert L.best_fixed(swapped) == L.best_fixed(q)
    assert L.oracle_vs_fixed(swapped).gap.sum() == pytest.approx(L.oracle_vs_fixed(q).gap.sum())


def test_split_half_gain_chooses_on_one_half_and_scores_on_the_other():
    # Pair p: linear is better on both halves; pair r: ties looks better on the even half only (noise).
    q = _quality([("p", "q", "linear", "weight=0.5", 0.0), ("p", "q", "ties", "density=0.2", 0.0),
                  ("r", "s", "linear", "weight=0.5", 0.0), ("r", "s", "ties", "density=0.2", 0.0)])
    q["quality_even"] = [0.9, 0.5, 0.5, 0.8]
    q["quality_odd"] = [0.9, 0.5, 0.6, 0.5]
    # even -> odd: fixed = linear (mean 0.70 vs 0.65); per pair p linear, r ties; on odd: p 0, r 0.5 - 0.6 -> -0.05
    # odd -> even: fixed = linear (0.75 vs 0.50); per pair p linear, r linear -> gain 0
    assert L.split_half_gain(q) == pytest.approx(-0.025)
    q["quality_odd"] = [0.9, 0.5, 0.5, 0.8]  # the same ranking on both halves: choosing per pair is worth 0.15
    assert L.split_half_gain(q) == pytest.approx(0.15)


def test_keep_parent_scores_each_expert_alone_like_a_merge():
    labels = pd.DataFrame({"a": "e1", "b": "e2", "same_base": True, "task": ["x", "y"], "parent_task": True,
                           "n_eval": 10, "score": [0.5, 0.4], "norm_score": [0.5 / 0.8, 0.4 / 0.5]})
    reference = pd.DataFrame({"model": ["e1", "e1", "e2", "e2"], "task": ["x", "y", "x", "y"], "n_eval": 10,
                              "score": [0.8, 0.25, 0.4, 0.5]})
    keep = L.keep_parent(labels, reference).iloc[0]
    assert keep.keep_a == pytest.approx((1.0 + 0.5) / 2) and keep.keep_b == pytest.approx((0.5 + 1.0) / 2)
    reference.loc[1, "score"] = 0.4
    keep = L.keep_parent(labels, reference).iloc[0]
    assert keep.kept == "e1" and keep.keep_parent == pytest.approx((1.0 + 0.8) / 2)
