"""Multi-way planner (chapter 05): plan enumeration, search, chained scoring, multi-document recipes."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from simmerge_lib.catalogue import Catalogue
from simmerge_lib.checkpoint import load_state_dict
from simmerge_lib.planner import (OpChoice, Plan, Planner, PredictorScorer, _Merges, beam_search, count_plans,
                                  enumerate_plans, exhaustive_search, is_multi_document, plan, plan_documents,
                                  read_documents, write_plan_recipe)

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
    assert result.method == "exhaustive" and result.space == count_plans(3, 2, 3)
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
