"""Multi-way planner (chapter 05): plan enumeration, search, chained scoring, multi-document recipes."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from simmerge_lib.catalogue import Catalogue
from simmerge_lib.checkpoint import load_state_dict
from simmerge_lib.documents import is_multi_document, read_documents
from simmerge_lib.operators import Candidate as OpChoice
from simmerge_lib.planner import Merges as _Merges
from simmerge_lib.planner import (Plan, Planner, PredictorScorer, beam_search, count_plans, enumerate_plans,
                                  exhaustive_search, plan, plan_documents, write_plan_recipe)

@pytest.fixture(autouse=True)
def _one_torch_thread():
    # tiny models: threads only add contention on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TASKS = {"e1": ["reverse"], "e2": ["sort"], "e3": ["max"], "e4": ["reverse"]}
OPS = [OpChoice.make("linear", {"weight": 0.5}), OpChoice.make("ties", {"density": 0.5}),
       OpChoice.make("slerp", {"t": 0.3})]


class HashScorer:
    """A deterministic, order-sensitive fake predictor: yhat in [0.3, 1.1) from a hash of (prefix, expert, op, t)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prefix, expert, ops):
        self.calls += 1
        tasks = {t for e in (*prefix.order, expert) for t in TASKS[e]}
        out = {}
        for op in ops:
            out[op] = {t: 0.3 + 0.8 * (zlib.crc32(f"{prefix.key()}{expert}{op.label}{t}".encode()) % 1000) / 1000
                       for t in tasks}
        return out


@pytest.mark.parametrize("n, n_ops, k", [(3, 2, None), (4, 3, None), (4, 2, 2), (5, 3, 3), (2, 6, None)])
def test_enumeration_count(n, n_ops, k):
    experts = [f"e{i}" for i in range(n)]
    ops = [OpChoice.make("linear", {"weight": 0.1 * (i + 1)}) for i in range(n_ops)]
    plans = list(enumerate_plans(experts, ops, k))
    kk = n if k is None else k
    assert len(plans) == count_plans(n, n_ops, k) == math.comb(n, kk) * math.factorial(kk) * n_ops ** (kk - 1)
    assert len({(p.order, p.ops) for p in plans}) == len(plans)  # all distinct
    assert all(len(p.order) == kk and len(set(p.order)) == kk for p in plans)


def test_plan_needs_one_op_per_step():
    with pytest.raises(ValueError, match="needs 2 operators"):
        Plan(("a", "b", "c"), (OPS[0],))


def test_chained_prediction():
    """qhat of a carried task multiplies by the step's yhat; a task of the new expert takes the step's yhat."""
    lin = OPS[0]

    def scorer(prefix, expert, ops):
        return {op: {"reverse": 0.8, "sort": 0.9, "max": 0.5} for op in ops}

    planner = Planner(scorer, {e: TASKS[e] for e in ("e1", "e2", "e3")}, ["reverse", "sort", "max"], [lin])
    p = planner.score(Plan(("e1", "e2", "e3"), (lin, lin)))
    q = dict(p.task_predicted)
    assert q["reverse"] == pytest.approx(0.8 * 0.8)  # carried twice
    assert q["sort"] == pytest.approx(0.9 * 0.9)  # joined at step 1, carried at step 2
    assert q["max"] == pytest.approx(0.5)
    assert p.predicted == pytest.approx((0.64 + 0.81 + 0.5) / 3)
    first = planner.score(Plan(("e1",)))
    assert first.predicted == pytest.approx(1 / 3)  # uncovered target tasks count as 0


def test_beam_with_full_width_equals_exhaustive():
    scorer = HashScorer()
    planner = Planner(scorer, TASKS, ["reverse", "sort", "max"], OPS)
    for k in (2, 3):
        space = count_plans(len(TASKS), len(OPS), k)
        exhaustive = exhaustive_search(planner, k, top=3)
        beam = beam_search(planner, k, width=space, top=3)
        assert [(p.order, p.ops) for p in beam] == [(p.order, p.ops) for p in exhaustive]
        assert beam[0].predicted == exhaustive[0].predicted
        every = [planner.score(p).predicted for p in enumerate_plans(list(TASKS), OPS, k)]
        assert exhaustive[0].predicted == max(every)
        narrow = beam_search(planner, k, width=1)[0]
        assert narrow.predicted <= exhaustive[0].predicted
    # memoized: one scorer call per distinct (prefix, next expert), whatever the number of plans scored
    prefixes = sum(count_plans(4, 3, j) for j in (1, 2))
    assert scorer.calls == planner.step_calls <= prefixes * 3


def test_documents_reference_earlier_steps(tiny_catalogue, tmp_path):
    cat = Catalogue.load(tiny_catalogue)
    p = Plan(("base0-sort", "base0-reverse", "base0-max"), (OPS[2], OPS[1]))
    docs = plan_documents(p, cat)
    assert [d["name"] for d in docs] == ["step1", "step2"]
    assert docs[1]["models"][0]["model"] == "@step1"
    assert docs[0]["base_model"] == str(cat.path("base0-sort").resolve())  # SLERP runs from the running model
    bad = tmp_path / "bad.yml"
    bad.write_text("name: s1\nmerge_method: linear\nmodels: ['@s2', x]\n---\nname: s2\nmerge_method: linear\n"
                   "models: [a, b]\n")
    assert is_multi_document(bad)
    with pytest.raises(ValueError, match="bad.yml: document 1 names @s2, which is not an earlier document"):
        read_documents(bad)


@pytest.mark.parametrize("ops", [(OPS[2], OPS[1]), (OpChoice.make("linear", {"weight": 0.7}),
                                                    OpChoice.make("task_arithmetic", {"lambda": 1.0}))])
def test_recipe_executes_and_reproduces_plan(tiny_catalogue, tmp_path, ops):
    from simmerge_lib.cli import main

    cat = Catalogue.load(tiny_catalogue)
    p = Plan(("base0-sort", "base0-reverse", "base0-max"), ops)
    recipe = write_plan_recipe(p, cat, tmp_path / "plan.yml")
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), str(out), "--quiet"]) == 0
    assert not (tmp_path / ".merged.steps").exists()  # intermediates cleaned up
    on_disk = load_state_dict(out)
    in_memory = _Merges(cat).state(p)
    assert set(on_disk) == set(in_memory)
    for name, t in in_memory.items():
        assert torch.equal(on_disk[name], t), name
    experts = {n: load_state_dict(cat.path(n)) for n in p.order}
    assert any(not torch.equal(in_memory[k], experts["base0-max"][k]) for k in in_memory)


def test_predictor_scorer_plans_on_running_model(tiny_catalogue, tmp_path, capsys):
    from simmerge_lib.cli import main
    from simmerge_lib.predictor import fit_predictor, save_predictor, synthetic_tables, training_table

    feats, labels, reference = synthetic_tables(n_tasks=3)
    predictor = fit_predictor(training_table(feats, labels, reference), family="ridge", classifier=False)
    cat = Catalogue.load(tiny_catalogue)
    from simmerge_lib.planner import predictor_ops

    ops = predictor_ops(predictor, ["linear", "ties"])
    scorer = PredictorScorer(predictor, cat, n_probes=4)
    result = plan(cat, ["reverse", "sort", "max"], 3, scorer, ops, base="base1")
    # both operators are order-free: a first step and its swapped twin are one plan
    assert result.method == "exhaustive" and result.space == count_plans(3, 2, 3) // 2
    assert math.isfinite(result.plan.predicted) and set(result.plan.order) == {"base1-reverse", "base1-sort",
                                                                                 "base1-max"}
    # step 2 measured the running merged model (an in-memory prefix) against the third expert
    assert any(" -linear" in str(f.a.iloc[0]) for f in scorer.feature_rows)
    # owner-oriented rows: the running model against the expert on the tasks it carries, and the other way round
    step = next(f for f in scorer.feature_rows if " -linear" in str(f.a.iloc[0]))
    running = str(step.a.iloc[0])
    for row in step.itertuples():
        carried = any(row.task in n.tasks for n in cat.models if n.name in running)
        assert (row.owner == running) == carried and row.task_of_a == 1.0
    assert scorer.merges.merges > 0
    # the command: prints the plan and writes a recipe that `simmerge merge` executes
    path = save_predictor(predictor, tmp_path / "p.skops")
    recipe = tmp_path / "plan.yml"
    assert main(["plan", str(tiny_catalogue), "--tasks", "reverse,sort", "--k", "2", "--predictor", str(path),
                 "--ops", "linear,ties", "--n-probes", "4", "--out", str(recipe), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "predicted" in printed and str(recipe) in printed
    assert main(["merge", str(recipe), str(tmp_path / "m"), "--quiet"]) == 0
    assert (tmp_path / "m" / "config.json").is_file()


def test_distinct_tasks_and_swapped_twins_shrink_the_space():
    """Siblings (e1, e4: both reverse) never share a plan; a first step under an order-free operator and its swapped
    twin are searched once; the counted space is the enumerated one, and full-width beam still equals exhaustive."""
    scorer = HashScorer()
    planner = Planner(scorer, TASKS, ["reverse", "sort", "max"], OPS, distinct_tasks=True, order_free=True)
    for k in (1, 2, 3):
        plans = [p for p in enumerate_plans(list(TASKS), OPS, k) if planner.valid(p)]
        assert planner.space(k) == len(plans)
        assert not any({"e1", "e4"} <= set(p.order) for p in plans)
        twins = {(p.order[1], p.order[0], *p.order[2:], *p.ops) for p in plans if k > 1 and p.ops[0] != OPS[2]}
        assert not twins & {(*p.order, *p.ops) for p in plans}  # the swapped twin of an order-free step is absent
        assert k == 1 or any(p.ops[0] == OPS[2] for p in plans)  # SLERP t=0.3 depends on the order: both kept
        if k > 1:
            exhaustive = exhaustive_search(planner, k, top=3)
            beam = beam_search(planner, k, width=planner.space(k), top=3)
            assert [(p.order, p.ops) for p in beam] == [(p.order, p.ops) for p in exhaustive]
    assert planner.space(4) == 0  # four experts of distinct tasks do not exist here


class KeepScorer:
    """Every step keeps ``level`` of each task; a merged model keeps ``keep`` of a task it has no expert of."""

    def __init__(self, level: float, keep: float) -> None:
        self.level, self.keep_level = level, keep
        self.batches = 0

    def __call__(self, prefix, expert, ops):
        return self.batch([(prefix, expert)], ops)[0]

    def batch(self, requests, ops):
        self.batches += 1
        return [{op: {t: self.level for e in (*p.order, x) for t in TASKS[e]} for op in ops} for p, x in requests]

    def keep(self, requests):
        return [{t: self.keep_level for t in tasks} for _, tasks in requests]


def _fake_catalogue(tmp_path):
    from simmerge_lib.catalogue import ModelEntry

    models = [ModelEntry("b", "b", "base")] + [ModelEntry(e, e, "expert", "b", ts) for e, ts in TASKS.items()]
    return Catalogue(root=tmp_path, name="fake", tasks=["reverse", "sort", "max"], models=models)


@pytest.mark.parametrize("level, keep, kept", [(0.95, 0.5, 3), (0.4, 0.6, 1)])
def test_a_plan_may_leave_experts_out(tmp_path, level, keep, kept):
    """With min_k < k the planner compares plans of every size, forecasting the tasks a smaller plan leaves
    uncovered (the scorer's keep); merging that loses more than it adds is not chosen."""
    cat, scorer = _fake_catalogue(tmp_path), KeepScorer(level, keep)
    result = plan(cat, ["reverse", "sort", "max"], 3, scorer, OPS[:2], min_k=1, exhaustive_limit=0, beam_width=2)
    assert result.method == "beam" and result.plan.k == kept
    assert set(result.extra["by_size"]) == {1, 2, 3}
    single = result.extra["by_size"][1]
    assert single.predicted == pytest.approx((1 + 2 * keep) / 3)  # its own task, and the forecast of the others
    assert result.extra["by_size"][3].predicted == pytest.approx((level ** 2 + level ** 2 + level) / 3)
    assert scorer.batches == 2  # one batched prediction per depth
    assert not any({"e1", "e4"} <= set(p.order) for p in result.ranked)
    exact = plan(cat, ["reverse", "sort", "max"], 3, KeepScorer(level, keep), OPS[:2])  # min_k = k: exactly k
    assert exact.plan.k == 3


def test_predictor_scorer_batches_and_reads_the_features_table(tiny_catalogue):
    """A batch of steps predicts what one call per step predicts; steps between two experts read the catalogue's
    features table (the same rows, not recomputed); a step and its swapped twin share their rows."""
    from simmerge_lib.features import ProbeCache, compute_features
    from simmerge_lib.planner import predictor_ops
    from simmerge_lib.predictor import fit_predictor, synthetic_tables, training_table

    feats, labels, reference = synthetic_tables(n_tasks=3)
    predictor = fit_predictor(training_table(feats, labels, reference), family="ridge", classifier=False)
    cat = Catalogue.load(tiny_catalogue)
    a, b, c = "base1-reverse", "base1-sort", "base1-max"
    table = compute_features(cat, n_probes=4, pairs=[(a, b), (b, a), (a, c), (c, a)], progress=False,
                             cache=ProbeCache(disk_dir=None))
    ops = predictor_ops(predictor)
    steps = [(Plan((a,)), b), (Plan((b,)), a), (Plan((a, b), (ops[0],)), c)]
    reader = PredictorScorer(predictor, cat, n_probes=4, table=table)
    batched = reader.batch(steps, ops)
    computed = PredictorScorer(predictor, cat, n_probes=4)
    for (prefix, expert), got in zip(steps, batched):
        want = computed(prefix, expert, ops)
        for op in ops:
            assert set(got[op]) == set(want[op])
            for t in want[op]:
                assert got[op][t] == pytest.approx(want[op][t], abs=1e-6), (prefix, expert, op, t)
    assert batched[0] == batched[1]
    assert reader.computed_rows == 3  # only the step from the merged model: its two carried tasks and max
    keep = reader.keep([(Plan((a,)), ["max"]), (Plan((a, b), (ops[0],)), ["max"])])
    assert reader.computed_rows == 4  # the single expert's forecast is read from the table
    assert [set(k) for k in keep] == [{"max"}, {"max"}] and all(math.isfinite(k["max"]) for k in keep)
    twin = reader.with_predictor(predictor)
    assert twin.batch(steps[2:], ops)[0] == batched[2] and twin.computed_rows == 0  # features are shared


def test_study_summary_judges_the_planner_against_every_baseline():
    from simmerge_lib.planner import BASELINE_NAMES, study_summary

    def row(planner, oracle=None, **baselines):
        out = {"planner_quality": planner, "predicted_quality": planner + 0.1, "chosen_k": 2,
               "full_plan_quality": planner - 0.01, "oracle_quality": oracle,
               "oracle_scope": None if oracle is None else "every plan"}
        return {**out, **{key: baselines.get(key) for key in BASELINE_NAMES}}

    study = {2: row(0.90, oracle=0.93, all_at_once_linear=0.88, best_single_quality=0.85),
             3: row(0.80, all_at_once_linear=0.70, random_order_quality=0.60, best_single_quality=0.81),
             4: {"skipped": "too few tasks"}}
    summary = study_summary(study).set_index("k")
    assert list(summary.index) == [2, 3]  # skipped sizes are left out
    assert bool(summary.beats_every_baseline[2]) and summary.best_baseline[2] == "all-at-once linear"
    assert summary.gap_to_oracle[2] == pytest.approx(0.03) and summary.margin[2] == pytest.approx(0.02)
    # the planner loses to keeping the best single expert at k = 3, whatever the other baselines did
    assert not bool(summary.beats_every_baseline[3]) and summary.best_baseline[3] == "best single expert"
    assert summary.margin[3] == pytest.approx(-0.01) and math.isnan(summary.gap_to_oracle[3])  # no oracle
    assert bool(study_summary(study, tol=0.02).set_index("k").beats_every_baseline[3])


def test_task_halves_split_the_catalogue_tasks(tiny_catalogue):
    from simmerge_lib.planner import task_halves

    first, second = task_halves(Catalogue.load(tiny_catalogue))
    assert first == ["reverse"] and second == ["sort"]  # three tasks: one each, the odd one left out


def test_oracle_plans_are_counted_before_they_are_enumerated(tiny_catalogue):
    from simmerge_lib.planner import oracle_plans

    cat = Catalogue.load(tiny_catalogue)
    ops = OPS[:2]
    every = oracle_plans(cat, cat.tasks, ops, 3, "base0")
    # 3 single experts, 3 pairs x 2 operators (order-free: one order each), one triple: 3!/2 orders x 2^2 operators
    assert len(every) == 3 + 3 * 2 + 3 * 4 == len({(p.order, p.ops) for p in every})
    assert oracle_plans(cat, cat.tasks, ops, 3, "base0", limit=len(every)) == every
    assert oracle_plans(cat, cat.tasks, ops, 3, "base0", limit=len(every) - 1) is None
    subset = ["base0-reverse", "base0-sort", "base0-max"]
    assert len(oracle_plans(cat, cat.tasks, ops, 3, "base0", subset=subset, limit=12)) == 12
    assert oracle_plans(cat, cat.tasks, ops, 3, "base0", subset=subset, limit=11) is None
