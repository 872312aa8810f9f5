"""Recipes in mergekit's YAML schema: parsing, validation (unsupported keys are errors), round trip."""

from __future__ import annotations

import pytest
import torch
import yaml

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


# --- slices, refused keys, dtype semantics ------------------------------------------------------------------------
FRANKEN = """
slices:
  - sources:
      - {model: a, layer_range: [0, 3]}
  - sources:
      - {model: b, layer_range: [1, 4], parameters: {scale: 0.5}}
merge_method: passthrough
dtype: float16
"""

GRADIENT_SLERP = """
slices:
  - sources:
      - {model: a, layer_range: [0, 4]}
      - {model: b, layer_range: [0, 4]}
    parameters:
      t: [{filter: self_attn, value: [0, 1]}, {value: 0.5}]
merge_method: slerp
base_model: a
dtype: bfloat16
out_dtype: float32
"""


def test_slices_parse_round_trip_and_expose_each_slice():
    recipe = Recipe.from_yaml(FRANKEN)
    assert recipe.slices is not None and recipe.models == []
    first, second = recipe.slice_inputs()
    assert [m.model for m in first.inputs] == ["a"] and first.base is None and first.length == 3
    assert second.inputs[0].layer_range == (1, 4) and second.inputs[0].parameters == {"scale": 0.5}
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again.to_dict() == recipe.to_dict() and again.slices[1].sources[0].layer_range == (1, 4)
    slerp = Recipe.from_yaml(GRADIENT_SLERP)
    (only,) = slerp.slice_inputs()
    assert only.base.model == "a" and [m.model for m in only.inputs] == ["b"]
    assert only.parameters["t"][0]["filter"] == "self_attn"
    assert slerp.compute_dtype() == torch.bfloat16 and slerp.output_dtype() == torch.float32
    assert slerp.model_names() == ["a", "b"]


def test_dtype_is_the_compute_dtype_and_out_dtype_the_output():
    plain = Recipe.from_dict({"merge_method": "linear", "models": ["a", "b"]})
    assert plain.compute_dtype() is None and plain.output_dtype() is None  # inputs' own dtype, as mergekit
    half = Recipe.from_dict({"merge_method": "linear", "models": ["a", "b"], "dtype": "float16"})
    assert half.compute_dtype() == torch.float16 and half.output_dtype() == torch.float16
    mixed = Recipe.from_dict({"merge_method": "linear", "models": ["a", "b"], "dtype": "float32",
                              "out_dtype": "bf16"})
    assert mixed.compute_dtype() == torch.float32 and mixed.output_dtype() == torch.bfloat16


@pytest.mark.parametrize("key", ["normalize", "rescale", "lambda", "int8_mask"])
def test_task_vector_keys_are_accepted(key):
    value = 0.5 if key == "lambda" else True
    recipe = Recipe.from_dict({"merge_method": "ties", "base_model": "base", "models": ["a", "b"],
                               "parameters": {key: value}})
    assert recipe.parameters == {key: value}


@pytest.mark.parametrize("recipe, fragments", [
    # refused top-level mergekit keys name the nearest supported form
    ({"modules": {}}, ["'modules' is not supported", "slices"]),
    ({"tokenizer": {"source": "base"}}, ["'tokenizer' is not supported", "tokenizer_source"]),
    ({"chat_template": "chatml"}, ["'chat_template' is not supported", "tokenizer_source"]),
    ({"tokenizer_sorce": "base"}, ["unknown key 'tokenizer_sorce'", "did you mean 'tokenizer_source'"]),
    # keys inside models, slices and sources
    ({"models": [{"model": "a", "weight": 1}]}, ["models[0]", "unknown key 'weight'", "parameters"]),
    ({"models": None, "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}], "residual_weight": 0.5}]},
     ["slices[0]", "'residual_weight' is not supported"]),
    ({"models": None, "slices": [{"sources": [{"model": "a", "layer_range": [0, 2], "weight": 1}]}]},
     ["slices[0].sources[0]", "unknown key 'weight'"]),
    ({"models": None, "slices": [{"sources": [{"model": "a"}]}]}, ["layer_range must be [start, end)"]),
    ({"models": None, "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                              {"model": "b", "layer_range": [0, 3]}]}]},
     ["same number of layers"]),
    ({"models": None, "slices": [{"sources": [{"model": "a", "layer_range": [2, 2]}]}]}, ["0 <= start < end"]),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]}, ["exactly one of 'models' and 'slices'"]),
    # parameters: misspelt, wrong scope, a mergekit method SimMerge lacks, DELLA's limits
    ({"parameters": {"wieght": 1}}, ["'wieght' is not used by linear", "did you mean 'weight'"]),
    ({"merge_method": "sce"}, ["unknown merge method 'sce'", "mergekit method SimMerge does not implement"]),
    ({"merge_method": "della", "base_model": "a", "models": ["a", "b", "c"],
      "parameters": {"density": 0.1, "epsilon": 0.2}}, ["density +- epsilon"]),
    ({"merge_method": "slerp", "base_model": "z", "models": None,
      "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]}],
      "parameters": {"t": 0.5}}, ["slices[0]", "needs a base_model", "add base_model 'z' to its sources"]),
    ({"merge_method": "passthrough", "models": ["a", "b"]}, ["exactly 1 model"]),
])
def test_refused_keys_are_one_line_errors_naming_the_key(tmp_path, recipe, fragments):
    data = {"merge_method": "linear", "models": ["a", "b"], **recipe}
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "refused.yml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_slices_with_a_base_per_slice_and_an_empty_slices_list():
    recipe = Recipe.from_dict({"merge_method": "ties", "slices": [
        {"sources": [{"model": "b1", "layer_range": [0, 2]}, {"model": "x", "layer_range": [0, 2]}],
         "base_model": "b1"},
        {"sources": [{"model": "b2", "layer_range": [2, 4]}, {"model": "y", "layer_range": [1, 3]}],
         "base_model": "b2", "parameters": {"density": 0.5}}]})
    first, second = recipe.slice_inputs()
    assert first.base.model == "b1" and second.base.model == "b2" and second.parameters == {"density": 0.5}
    assert recipe.model_names() == ["b1", "x", "b2", "y"]
    # mergekit reads an empty `slices` beside `models` as absent
    assert Recipe.from_dict({"merge_method": "linear", "models": ["a"], "slices": []}).slices is None


def test_slerp_with_an_unlisted_base_takes_it_as_the_base_like_mergekit():
    recipe = Recipe.from_dict({"merge_method": "slerp", "base_model": "a", "models": ["b"], "parameters": {"t": 0.3}})
    inputs, base = recipe.merge_inputs()
    assert [m.model for m in inputs] == ["b"] and base.model == "a" and recipe.reference_model() == "a"
