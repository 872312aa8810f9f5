"""Recipes in mergekit's YAML schema: parsing, validation (unsupported keys are errors), round trip."""

from __future__ import annotations

import pytest

from simmerge_lib.recipe import Recipe, RecipeError

TIES = """
merge_method: ties
base_model: zoo/base
models:
  - model: zoo/base
  - model: zoo/a
    parameters: {weight: 0.5, density: [0.2, 0.8]}
  - model: /abs/b
    parameters:
      weight: [{filter: mlp, value: 0.7}, {value: 0.3}]
parameters: {lambda: 0.9, normalize: true}
dtype: bfloat16
"""


def test_parse_resolves_paths_relative_to_the_recipe_file(tmp_path):
    path = tmp_path / "sub" / "r.yml"
    path.parent.mkdir()
    path.write_text(TIES)
    recipe = Recipe.from_yaml(path)
    assert recipe.merge_method == "ties" and recipe.dtype == "bfloat16"
    inputs, base = recipe.merge_inputs()
    assert [m.model for m in inputs] == ["zoo/a", "/abs/b"] and base.model == "zoo/base"
    assert recipe.resolve_path("zoo/a") == tmp_path / "sub" / "zoo" / "a"
    assert str(recipe.resolve_path("/abs/b")) == "/abs/b"
    assert recipe.tokenizer_folder() == tmp_path / "sub" / "zoo" / "base"
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again.to_dict() == recipe.to_dict()
    assert str(recipe.with_paths_resolved().models[1].model).startswith(str(tmp_path))


@pytest.mark.parametrize("text, message", [
    ("merge_method: linear\nmodels: [{model: a}]\nmodules: {}\n", "not supported by simmerge"),
    ("merge_method: linear\nmodels: [{model: a}]\nfoo: 1\n", "unknown key"),
    ("merge_method: magic\nmodels: [{model: a}]\n", "unknown merge method 'magic'"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n", "global parameter 't'"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: b, parameters: {t: 0.5}}]\nparameters: {t: 0.5}\n",
     "a global parameter for slerp"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: b}, {model: c}]\nparameters: {t: 0.5}\n", "exactly 1"),
    ("merge_method: ties\nmodels: [{model: b}]\n", "needs a base_model"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: {oops: 1}}}]\n", "filter, value"),
    ("merge_method: linear\nmodels: [{model: a}]\nparameters: {t: 0.5}\n", "not used by linear"),
    ("merge_method: linear\nmodels: [{model: a}]\ndtype: int4\n", "dtype 'int4'"),
    ("merge_method: linear\nmodels: [{model: a}]\ntokenizer: {source: union}\n", "union"),
    ("merge_method: linear\nmodels: [a\n", "not valid YAML"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message) as info:
        Recipe.from_yaml(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_linear_with_unlisted_base_averages_it_like_mergekit():
    recipe = Recipe.from_dict({"merge_method": "linear", "base_model": "c", "models": ["a", {"model": "b"}],
                               "parameters": {"weight": 1.0}})
    inputs, base = recipe.merge_inputs()
    assert [m.model for m in inputs] == ["a", "b", "c"] and base is None
