"""Chapter 08: search spaces yield runnable recipes, pruning saves evaluations, the surrogate split does not leak."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
import pytest
import torch

from simmerge_lib.engine import merge_in_memory
from simmerge_lib.labels import DEFAULT_GRID, job_recipe
from simmerge_lib.operators import Candidate, merge_state_dicts
from simmerge_lib.recipe import Recipe
from simmerge_lib.search import (DepthRecipe, LayerwiseSpace, MergeProblem, check_no_leakage, coefficients,
                                 fidelity_schedule, fit_surrogate, group_candidate, group_recipe, group_split, kept,
                                 pareto_mask, run_search, setting_from_grid, surrogate_quality, uniform_recipe)


@pytest.fixture(scope="module")
def problem(tiny_catalogue) -> MergeProblem:
    return MergeProblem(tiny_catalogue, "base0-reverse", "base0-sort")


def _fake_evaluator(model, tokenizer, tasks, n):
    # Deterministic, recipe-dependent "scores" without decoding: keeps the search tests fast.
    head = float(model.lm_head.weight.detach().sum())
    first = float(model.model.layers[0].mlp.down_proj.weight.detach().sum())
    return {t: float(1 / (1 + np.exp(-(head + (i + 1) * first) * 3))) for i, t in enumerate(tasks)}


def _sample(space, n, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        recipe = space.suggest(trial)
        out.append((dict(trial.params), recipe))
        study.tell(trial, 0.0)
    return out


def test_every_layerwise_sample_is_a_valid_recipe_the_engine_merges(problem):
    space = problem.layerwise_space()
    paths = problem.paths()
    seen_methods = set()
    for params, recipe in _sample(space, 12):
        merged = problem.state_dict(recipe)
        assert set(merged) == set(problem.states[problem.base])
        assert all(torch.isfinite(t).all() for t in merged.values())
        for g, group in enumerate(recipe.to_dict(paths)["groups"]):
            engine_recipe = Recipe.from_dict(group["recipe"], source=f"group {g}")  # validates the recipe
            seen_methods.add(engine_recipe.merge_method)
            full = merge_in_memory(engine_recipe)
            for name, tensor in merged.items():
                if recipe.group_of(name) == g:
                    torch.testing.assert_close(tensor, full[name], msg=f"group {g} tensor {name}")
        assert space.encode(params).shape == (len(space.feature_names()),)
    assert len(seen_methods) >= 4  # the random samples exercised most operators


def test_every_depth_sample_builds_a_stack_the_model_loads(problem):
    space = problem.depth_space(extra_layers=1)
    depths = set()
    for params, recipe in _sample(space, 10, seed=1):
        state = problem.state_dict(recipe)
        model, _ = problem.skeleton(recipe.depth)
        model.load_state_dict(state, strict=True)  # every tensor present, shapes right
        depths.add(recipe.depth)
        back = DepthRecipe.from_dict(recipe.to_dict(problem.paths()),
                                     names={v: k for k, v in problem.paths().items()})
        assert back == recipe
        j, sl = 0, recipe.stack[0]
        src = problem.states[sl.model][f"model.layers.{sl.layer}.self_attn.o_proj.weight"]
        torch.testing.assert_close(state[f"model.layers.{j}.self_attn.o_proj.weight"], src * sl.scale)
        torch.testing.assert_close(state[f"model.layers.{j}.input_layernorm.weight"],
                                   problem.states[sl.model][f"model.layers.{sl.layer}.input_layernorm.weight"])
        assert len(space.encode(params)) == len(space.feature_names())
    assert len(depths) >= 2
    deeper = next(r for _, r in _sample(space, 30, seed=2) if r.depth != problem.layer_count)
    scores = problem.scores(deeper, 2)  # the real evaluator decodes with a stack of another depth
    assert set(scores) == set(problem.tasks) and all(0 <= v <= 1 for v in scores.values())


def test_uniform_recipe_reproduces_the_labels_grid(problem):
    space = problem.layerwise_space()
    for method, settings in DEFAULT_GRID.items():
        for setting in settings:
            recipe, _ = uniform_recipe(space, method, setting)
            ours = problem.state_dict(recipe)
            ref = Recipe.from_dict(job_recipe(method, problem.a, problem.b, problem.base, setting, 0))
            specs, base = ref.merge_inputs()
            theirs = merge_state_dicts(method, [problem.states[s.model] for s in specs],
                                       problem.states[base.model] if base and method != "linear" else None,
                                       [dict(s.parameters) for s in specs], ref.parameters, problem.layer_count)
            for name in ours:
                torch.testing.assert_close(ours[name], theirs[name], msg=f"{method} {setting} {name}")
    assert setting_from_grid("slerp", {"t": 0.3}).setting["mix"] == pytest.approx(0.7)


def test_a_group_choice_is_an_operator_candidate():
    """A layer-wise group holds an operators.Candidate (mix, lambda, density); its recipe, task-vector coefficients
    and kept share are functions of it, by hand."""
    ties = group_candidate("ties", mix=0.25, lam=0.8, density=0.4)
    assert isinstance(ties, Candidate) and ties.setting == {"mix": 0.25, "lambda": 0.8, "density": 0.4}
    recipe = group_recipe(ties, "a", "b", "base", seed=3)
    assert recipe["base_model"] == "base" and recipe["parameters"] == {"lambda": 0.8}
    assert [m["parameters"] for m in recipe["models"]] == [{"weight": 0.5, "density": 0.4},
                                                           {"weight": 1.5, "density": 0.4}]
    assert coefficients(ties) == pytest.approx((0.5 * 0.4, 1.5 * 0.4))  # TIES normalizes: weights × lambda / 2
    assert kept(ties) == pytest.approx(0.4)
    dare = group_candidate("dare_linear", mix=0.5, lam=1.2, density=0.3)
    assert group_recipe(dare, "a", "b", "base", seed=3)["parameters"] == {"lambda": 1.2, "seed": 3}
    assert coefficients(dare) == pytest.approx((1.2, 1.2)) and kept(dare) == pytest.approx(0.3)
    slerp = group_candidate("slerp", mix=0.7)
    assert group_recipe(slerp, "a", "b", "base")["parameters"] == {"t": pytest.approx(0.3)}
    assert coefficients(slerp) == pytest.approx((0.7, 0.3)) and kept(slerp) == 1.0


def test_pruned_trials_cost_fewer_evaluations(tiny_catalogue):
    problem = MergeProblem(tiny_catalogue, "base0-reverse", "base0-sort")
    problem.evaluator = _fake_evaluator
    rungs = fidelity_schedule(16, 2)
    assert rungs == [2, 4, 8, 16]
    result = run_search(problem.layerwise_space(), 16, problem=problem, sampler="random", fidelities=rungs,
                        pruner="sha", seed=0)
    trials = result.trials
    pruned, complete = trials[trials.state == "PRUNED"], trials[trials.state == "COMPLETE"]
    assert len(pruned) and len(complete)
    full_cost = sum(rungs) * len(problem.tasks)
    assert (complete.trial_examples <= full_cost).all() and (complete.trial_examples == full_cost).any()
    assert (pruned.trial_examples < full_cost).all()
    assert (pruned.rung < rungs[-1]).all()
    assert trials.cost_examples.iloc[-1] == trials.trial_examples.sum() == problem.examples
    # the trace only counts finished trials
    assert trials.best_so_far.dropna().is_monotonic_increasing


def test_nsga2_gives_a_pareto_front_per_task(tiny_catalogue):
    problem = MergeProblem(tiny_catalogue, "base0-reverse", "base0-sort")
    problem.evaluator = _fake_evaluator
    result = run_search(problem.depth_space(), 8, problem=problem, sampler="nsga2", objectives="tasks",
                        fidelities=(4,), seed=0)
    front = result.pareto()
    assert result.objectives == ["task:reverse", "task:sort"] and 1 <= len(front) <= 8
    values = result.trials[result.objectives].to_numpy()
    for row in front[result.objectives].to_numpy():
        assert not (np.all(values >= row, axis=1) & np.any(values > row, axis=1)).any()


def test_pareto_mask_by_hand():
    v = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.4, 0.4], [1.0, 0.0]])
    assert pareto_mask(v).tolist() == [True, True, True, False, True]


def _synthetic_samples(n=120, seed=0):
    space = LayerwiseSpace("a", "b", "base", layer_count=2)
    rng = np.random.default_rng(seed)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    rows = []
    for i in range(n):
        trial = study.ask()
        recipe = space.suggest(trial)
        params = dict(trial.params)
        q = 0.8 * params["g1_mix"] + 0.2 * (params["g0_op"] == "ties") + rng.normal(0, 0.02)
        rows.append({"params": params, "key": recipe.key(), "quality": q, "task:x": q, "pair": "a|b"})
        study.tell(trial, 0.0)
        if i % 10 == 0:  # the same configuration measured twice: must not straddle the split
            rows.append({**rows[-1], "quality": q + rng.normal(0, 0.02)})
    frame = pd.DataFrame(rows)
    frame["group"] = frame.pair + "#" + frame.key
    return space, frame


def test_surrogate_split_has_no_leakage_and_the_surrogate_ranks():
    space, samples = _synthetic_samples()
    train, test = group_split(samples, 0.25, seed=0)
    check_no_leakage(samples, train, test, space)
    assert not set(samples.group.iloc[train]) & set(samples.group.iloc[test])
    dup_groups = samples.group[samples.group.duplicated()]
    assert len(dup_groups)
    leaky_test = np.flatnonzero(samples.group.isin(dup_groups).to_numpy())[:1]
    leaky_train = np.setdiff1d(np.arange(len(samples)), leaky_test)
    with pytest.raises(ValueError, match="leaks"):
        check_no_leakage(samples, leaky_train, leaky_test, space)
    metrics = surrogate_quality(samples, space, seed=0)
    assert metrics["r2"] > 0.5 and metrics["kendall_tau"] > 0.5


def test_search_on_the_surrogate_beats_random_configurations():
    space, samples = _synthetic_samples()
    surrogate = fit_surrogate(samples, space, n_estimators=50)
    result = run_search(space, 40, surrogate=surrogate, sampler="tpe", seed=0)
    assert result.trials.evaluations.max() == 0  # no real merge
    assert result.best_value > float(np.median(surrogate.predict_quality(list(samples.params))))
    assert result.best_recipe.settings[1].setting["mix"] > 0.5


def test_run_experiment_end_to_end_and_cli_errors(tiny_catalogue, monkeypatch, tmp_path, capsys):
    from simmerge_lib import cli, evaluate, search

    monkeypatch.setattr(evaluate, "resolve_evaluator", lambda spec: _fake_evaluator)
    exp = search.run_experiment(tiny_catalogue, "smoke", pair=("base0-reverse", "base0-sort"), progress=False,
                                real_trials=4, nsga_trials=4, depth_trials=3, samples=6, surrogate_trials=8)
    s = exp.summary
    for key in ("trials", "real_evaluations", "best_found_quality", "simmerge_choice_quality", "best_fixed_quality",
                "surrogate_r2", "surrogate_kendall_tau", "pareto_size"):
        assert key in s
    assert s["surrogate_trials"] == 8 * len(search.COMPARED) and s["pareto_size"] >= 1
    assert s["best_fixed"].startswith("linear") and "no labels" in s["best_fixed_source"]
    # the search is warm-started with the SimMerge choice, so its best can only match or beat it
    assert s["real_best"]["tpe+hyperband"] >= s["simmerge_choice_quality"] - 1e-9
    assert exp.best().quality == exp.leaderboard.quality.max()
    assert cli.main(["search", "--catalogue", str(tmp_path), "--profile", "smoke"]) == 2
    assert "no catalogue.json" in capsys.readouterr().err


def test_pair_study_scores_the_winner_on_examples_the_search_never_saw(tiny_catalogue, monkeypatch):
    """The SimMerge choice comes from a predictor that never trained on the pair's experts or their siblings; the
    search is warm-started with it (in-sample it can only match or beat it); the winner and the baselines are then
    re-scored on the eval examples after the search's, with the real evaluator."""
    from simmerge_lib import evaluate, search
    from simmerge_lib.predictor import synthetic_tables

    monkeypatch.setattr(evaluate, "resolve_evaluator", lambda spec: _fake_evaluator)
    tables = synthetic_tables(n_tasks=3)
    choice = search.heldout_choice(tables, "base0-reverse", "base0-sort", family="ridge")
    assert choice["train_pairs"] >= 2 and choice["choice"][0] in {"linear", "task_arithmetic", "ties"}
    assert search.label_oracle(tables[1], "base0-reverse", "base0-sort")[2] > 0
    exps, table = search.pair_study(tiny_catalogue, "smoke", [("base0-reverse", "base0-sort"), ("base1-sort", "base1-max")],
                                    tables=tables, family="ridge", real_trials=4, nsga_trials=3, depth_trials=3,
                                    samples=6, surrogate_trials=5, n_eval=8, n_min=4)
    assert list(table.pair) == ["base0-reverse|base0-sort", "base1-sort|base1-max"]
    first, second = (e.summary for e in exps)
    assert first["pareto_size"] is not None and second["pareto_size"] is None  # only the first is detailed
    assert "without these experts" in first["simmerge_choice_source"]
    assert (table.best_found >= table.simmerge_choice - 1e-9).all()
    for s in (first, second):
        assert s["heldout_examples"] == [8, 512]
        assert set(s["heldout_quality"]) >= {"best_found", "simmerge_choice", "best_fixed", "label_oracle"}
        assert s["heldout_examples_decoded"] > 0 and s["search_examples"] <= s["real_examples"]
    summary = search.pair_study_summary(table)
    assert summary["pairs"] == 2 and summary["best_found_ge_choice"] == "2/2"


def test_hyperband_search_is_reproducible(tiny_catalogue):
    # Hyperband's brackets hash the study name: a random default name made one seed prune different trials
    runs = []
    for _ in range(2):
        problem = MergeProblem(tiny_catalogue, "base0-reverse", "base0-sort")
        problem.evaluator = _fake_evaluator
        runs.append(run_search(problem.layerwise_space(), 12, problem=problem, sampler="tpe",
                               fidelities=fidelity_schedule(16, 2), pruner="hyperband", seed=0, n_startup=4).trials)
    assert (runs[0].state == "PRUNED").any()
    pd.testing.assert_frame_equal(runs[0].drop(columns="params"), runs[1].drop(columns="params"))
    assert list(runs[0].params) == list(runs[1].params)
