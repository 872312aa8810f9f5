from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from simmerge_lib.catalogue import Catalogue
from simmerge_lib.evaluate import (answer_accuracy, evaluate_checkpoint, evaluate_model, greedy_answers,
                                   resolve_evaluator, task_examples)
from simmerge_lib.tasks import get_task
from simmerge_lib.zoo import (BaseRecipe, ExpertStyle, ModelSize, ZooRecipe, build_catalogue, encode_batch,
                              recipe_for_profile, task_vector_stats, trainable_filter, transfer_recipe)

MICRO_STYLES = (ExpertStyle("fast", "all", lr=3e-3, replay=0.5, max_steps=40),
                ExpertStyle("mlp-kl", "mlp", lr=3e-3, replay=0.5, replay_target="base", max_steps=20))
MICRO = ZooRecipe(name="micro", size=ModelSize(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64),
                  tasks=("max", "reverse"), n_bases=2, styles=MICRO_STYLES,
                  base=BaseRecipe(batch_size=16, chunk=20, anneal_steps=10, max_steps=20, dev_n=8),
                  experts=(("max", "fast"), ("reverse", "mlp-kl")), batch_size=16, chunk=20, eval_n=8)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return build_catalogue("micro", root=root, recipe=MICRO, progress=False)


def test_build_writes_loadable_checkpoints(micro):
    assert [m.name for m in micro.bases()] == ["base0", "base1"]
    assert [m.name for m in micro.experts("base1")] == ["base1-max", "base1-reverse"]
    folder = micro.path("base0-max")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "llama" and model.config.hidden_size == 32
    assert greedy_answers(model.eval(), tok, ["M123="], max_new_tokens=3)[0] != "<unk>"
    card = json.loads((folder / "simmerge_card.json").read_text())
    assert card["base"] == "base0" and card["tasks"] == ["max"] and set(card["scores"]) == {"max", "reverse"}
    assert card["recipe"]["style"] == "fast" and card["recipe"]["steps_trained"] == 40
    assert set(card["char_scores"]) == {"max", "reverse"}
    reloaded = Catalogue.load(micro.root)
    assert reloaded.recipe_hash == MICRO.digest()
    assert reloaded.entry("base1-reverse").scores == micro.entry("base1-reverse").scores


def test_bases_differ_and_experts_move_only_what_they_train(micro):
    from simmerge_lib.checkpoint import load_state_dict

    b0, b1 = (load_state_dict(micro.path(n)) for n in ("base0", "base1"))
    assert not torch.equal(b0["model.embed_tokens.weight"], b1["model.embed_tokens.weight"])
    expert = load_state_dict(micro.path("base0-reverse"))  # style "mlp-kl": MLP only
    moved = {k for k in b0 if not torch.equal(b0[k], expert[k])}
    assert moved and all(".mlp." in k for k in moved)


def test_cache_is_reused_and_recipe_change_rebuilds(micro):
    weights = micro.path("base0") / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = build_catalogue("micro", root=micro.root, recipe=MICRO, progress=False)
    assert weights.stat().st_mtime_ns == mtime and again.recipe_hash == micro.recipe_hash
    changed = dataclasses.replace(MICRO, base=dataclasses.replace(MICRO.base, max_steps=21))
    assert changed.digest() != MICRO.digest()


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return value[:-1] if value else ("x",)
    raise TypeError(type(value))


def test_recipe_hash_changes_when_any_field_does():
    """Every field of the recipe, its base recipe, its model size and its expert styles keys the cache."""
    digests = {MICRO.digest()}
    variants = []
    for field in dataclasses.fields(MICRO):
        value = getattr(MICRO, field.name)
        if dataclasses.is_dataclass(value):
            variants += [dataclasses.replace(MICRO, **{field.name: dataclasses.replace(
                value, **{f.name: _changed(getattr(value, f.name))})}) for f in dataclasses.fields(value)]
        elif field.name == "styles":
            style = value[0]
            variants += [dataclasses.replace(MICRO, styles=(dataclasses.replace(
                style, **{f.name: _changed(getattr(style, f.name))}), *value[1:])) for f in dataclasses.fields(style)]
        else:
            variants.append(dataclasses.replace(MICRO, **{field.name: _changed(value)}))
    for variant in variants:
        digests.add(variant.digest())
    assert len(digests) == len(variants) + 1


def test_interrupted_build_resumes(tmp_path):
    recipe = dataclasses.replace(MICRO, n_bases=1, experts=MICRO.experts[:1])
    first = build_catalogue("micro", root=tmp_path, recipe=recipe, progress=False)
    (tmp_path / "catalogue.json").unlink()  # as if killed before the catalogue file was written
    weights = first.path("base0-max") / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    build_catalogue("micro", root=tmp_path, recipe=recipe, progress=False)
    assert weights.stat().st_mtime_ns == mtime


def test_parallel_build_trains_the_same_checkpoints(micro, tmp_path):
    """workers=2 trains in separate processes: same models, cards and tasks as the serial build, and it resumes."""
    recipe = dataclasses.replace(MICRO, n_bases=2)
    par = build_catalogue("micro", root=tmp_path, recipe=recipe, progress=False, workers=2)
    assert [m.name for m in par.models] == [m.name for m in micro.models]
    for m in par.models:
        assert m.base == micro.entry(m.name).base and m.tasks == micro.entry(m.name).tasks
        assert m.recipe.get("style") == micro.entry(m.name).recipe.get("style")
        assert m.scores == micro.entry(m.name).scores  # one torch thread per worker: the same checkpoints
    (tmp_path / "catalogue.json").unlink()
    weights = par.path("base1-reverse") / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    build_catalogue("micro", root=tmp_path, recipe=recipe, progress=False, workers=2)
    assert weights.stat().st_mtime_ns == mtime


def test_lone_base_trains_in_the_parent_on_every_thread(micro, tmp_path):
    """Fewer bases than workers: the base trains in this process (all its threads), the experts in workers (one
    thread each); the checkpoints are bitwise those of the serial build, because the weights do not depend on the
    thread count."""
    from simmerge_lib.checkpoint import load_state_dict
    from simmerge_lib.tokenizer import build_tokenizer
    from simmerge_lib.zoo import train_base

    threads = torch.get_num_threads()
    try:
        weights = []
        for n in (1, 2):
            torch.set_num_threads(n)
            weights.append(train_base(MICRO, 0, build_tokenizer())[0].state_dict())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    recipe = dataclasses.replace(MICRO, n_bases=1)
    lone = build_catalogue("micro", root=tmp_path, recipe=recipe, progress=False, workers=2)
    for name in ("base0", "base0-max", "base0-reverse"):
        got, want = load_state_dict(lone.path(name)), load_state_dict(micro.path(name))
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_trainable_filters():
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight",
             "model.embed_tokens.weight"]
    assert [n for n in names if trainable_filter("mlp", 2)(n)] == names[:1]
    assert [n for n in names if trainable_filter("attn", 2)(n)] == names[1:2]
    assert [n for n in names if trainable_filter("upper", 2)(n)] == names[1:3]
    assert [n for n in names if trainable_filter("lower", 2)(n)] == [names[0], names[3]]
    with pytest.raises(ValueError):
        trainable_filter("heads", 2)


def test_teacher_forced_exact_match_equals_greedy_decoding(micro):
    """The one-pass score is the exact match of greedy decoding, example by example (see evaluate.py)."""
    for name in ("base0", "base0-max", "base1-reverse"):
        model = AutoModelForCausalLM.from_pretrained(micro.path(name)).eval()
        tok = AutoTokenizer.from_pretrained(micro.path(name))
        examples = task_examples(["max", "reverse"], 64)
        exact, chars = answer_accuracy(model, tok, examples)
        longest = max(len(ex.answer) for ex in examples)
        decoded = greedy_answers(model, tok, [ex.prompt for ex in examples], longest + 1)
        assert exact.tolist() == [d == ex.answer for d, ex in zip(decoded, examples)]
        assert ((chars >= 0) & (chars <= 1)).all() and (chars[exact] == 1).all()


def test_encode_batch_masks_prompt():
    from simmerge_lib.tokenizer import build_tokenizer

    tok = build_tokenizer()
    ex = get_task("max").example("12")
    batch = encode_batch([ex, get_task("max").example("1020")], tok, answer_only=True)
    labelled = [i for i in batch["labels"][0].tolist() if i != -100]
    assert tok.decode(labelled) == "2<eos>"
    assert batch["attention_mask"][0].sum() == len("M12=2") + 2


def test_profiles_and_evaluator(micro):
    for profile in ("smoke", "default", "full", "transfer"):
        recipe = recipe_for_profile(profile)
        # the transfer catalogue needs same-base pairs only (the predictor never trains on cross-base ones)
        assert recipe.n_bases >= (1 if profile == "transfer" else 2) and len(recipe.experts) >= len(recipe.tasks)
        assert all(recipe.style(style).name == style for _, style in recipe.experts)
    assert len(recipe_for_profile("default").tasks) >= 8
    for profile in ("smoke", "default"):
        big, small = transfer_recipe(profile).size, recipe_for_profile(profile).size
        assert big.parameters(48) >= 4 * small.parameters(48)
        assert transfer_recipe(profile).seed != recipe_for_profile(profile).seed
    with pytest.raises(ValueError, match="unknown profile"):
        recipe_for_profile("huge")
    frame = evaluate_checkpoint(micro.path("base0-max"), ["max", "reverse"], n=8)
    assert list(frame.columns) == ["checkpoint", "task", "score", "n"] and frame.score.between(0, 1).all()
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve_evaluator("no_such_module:fn")


def test_custom_evaluator(micro):
    model = AutoModelForCausalLM.from_pretrained(micro.path("base0"))
    tok = AutoTokenizer.from_pretrained(micro.path("base0"))
    frame = evaluate_model(model, tok, ["x", "y"], n=3, evaluator=lambda m, t, tasks, n: {k: 0.5 for k in tasks})
    pd.testing.assert_series_equal(frame.score, pd.Series([0.5, 0.5], name="score"))


def test_task_vector_stats(micro):
    norms, cos = task_vector_stats(micro)
    assert (norms.tv_norm > 0).all()
    assert cos.loc["base0-max", "base0-max"] == pytest.approx(1.0, abs=1e-5)
    assert pd.isna(cos.loc["base0-max", "base1-max"])


def test_cli_zoo_and_eval(micro, capsys):
    from simmerge_lib.cli import main

    assert main(["eval", str(micro.path("base1-max")), "--tasks", "max", "--n", "4"]) == 0
    assert "max" in capsys.readouterr().out
    assert main(["eval", str(micro.root / "missing")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
