from __future__ import annotations

import random

import pytest

from simmerge_lib.tasks import ALPHABET, SPLIT_SIZES, TASKS, exact_match, get_task, max_sequence_length
from simmerge_lib.tokenizer import build_tokenizer


def test_at_least_eight_tasks_with_distinct_tags():
    assert len(TASKS) >= 8
    assert len({t.tag for t in TASKS.values()}) == len(TASKS)


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_deterministic_disjoint_and_nested(name):
    task = get_task(name)
    assert task.split("eval", 20) == task.split("eval", 20)
    assert task.split("eval", 10) == task.split("eval", 20)[:10]
    sets = {s: {ex.input for ex in task.split(s)} for s in SPLIT_SIZES}
    assert sum(map(len, sets.values())) == len(set().union(*sets.values()))
    train = task.train_stream(seed=3)
    drawn = [next(train).input for _ in range(300)]
    assert not set(drawn) & set().union(*sets.values())
    again = task.train_stream(seed=3)
    assert [next(again).input for _ in range(50)] == drawn[:50]


@pytest.mark.parametrize("name", list(TASKS))
def test_examples_fit_alphabet_and_length(name):
    task = get_task(name)
    for ex in task.split("eval") + task.split("probe"):
        assert ex.prompt == f"{task.tag}{ex.input}="
        assert set(ex.prompt + ex.answer) <= set(ALPHABET)
        assert 1 + len(ex.prompt) + len(ex.answer) + 1 <= max_sequence_length()
        assert task.solve(ex.input) == ex.answer


@pytest.mark.parametrize(("name", "text", "answer"), [
    ("reverse", "abc", "cba"), ("sort", "cab", "abc"), ("rotate", "abcd", "bcda"), ("double", "ab", "aabb"),
    ("dedup", "abcab", "abc"), ("shift", "aj", "ba"), ("max", "3917", "9"), ("min", "3917", "1"),
])
def test_solvers_hand_checked(name, text, answer):
    assert get_task(name).solve(text) == answer


def test_format_answers_share_the_alphabet_but_not_the_skill():
    rng = random.Random(0)
    task = get_task("sort")
    exs = task.split("eval", 200)
    fakes = [task.format_answer(rng, ex.input) for ex in exs]
    assert all(sorted(f) == sorted(ex.answer) for f, ex in zip(fakes, exs))
    assert exact_match(fakes, [ex.answer for ex in exs]) < 0.5


@pytest.mark.parametrize("name", list(TASKS))
def test_training_stream_covers_every_input_length(name):
    # A length whose few inputs are all taken by the fixed splits would never be trained on, yet be evaluated.
    task = get_task(name)
    stream = task.train_stream(seed=0)
    train_lengths = {len(next(stream).input) for _ in range(2000)}
    assert {len(ex.input) for ex in task.split("eval")} <= train_lengths


def test_exact_match():
    assert exact_match(["12", " 7", "x"], ["12", "7", "y"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        exact_match(["1"], [])


def test_split_errors():
    with pytest.raises(ValueError, match="unknown split"):
        get_task("max").split("test")
    with pytest.raises(ValueError, match="holds"):
        get_task("max").split("probe", 10_000)
    with pytest.raises(KeyError, match="unknown task"):
        get_task("nope")


@pytest.mark.parametrize("name", list(TASKS))
def test_tokenizer_round_trip(name, tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for ex in get_task(name).split("eval", 30):
        text = ex.prompt + ex.answer
        ids = loaded(text)["input_ids"]
        assert ids[0] == loaded.bos_token_id and len(ids) == len(text) + 1
        assert loaded.decode(ids, skip_special_tokens=True) == text
        assert ids == tok(text)["input_ids"]


def test_tokenizer_pads_left_and_maps_unknowns():
    tok = build_tokenizer()
    batch = tok(["Rab=", "Rabcd="], padding=True)
    assert batch["input_ids"][0][:2] == [tok.pad_token_id] * 2
    assert tok("Z")["input_ids"][1] == tok.unk_token_id
