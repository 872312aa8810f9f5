from __future__ import annotations

import json

import pytest

from simmerge_lib.catalogue import Catalogue, pair_key
from simmerge_lib.paths import map_model_names
from simmerge_lib.checkpoint import CheckpointError, load_state_dict, weight_files


def test_tiny_catalogue_loads(tiny_catalogue):
    cat = Catalogue.load(tiny_catalogue)
    assert [b.name for b in cat.bases()] == ["base0", "base1"]
    assert len(cat.experts()) == 6
    assert cat.base_of("base1-sort").name == "base1"
    same = cat.pairs("same_base")
    cross = cat.pairs("cross_base")
    assert len(same) == 2 * 3 and all(cat.entry(a).base == cat.entry(b).base for a, b in same)
    assert len(cross) == 3 * 3 - 3  # distinct tasks only
    assert len(cat.pairs("all", ordered=True)) == 2 * (len(same) + len(cross))
    assert cat.path("base0").is_dir()


def test_catalogue_rejects_unknown_base(tmp_path):
    (tmp_path / "catalogue.json").write_text(json.dumps({"tasks": ["reverse"], "models": [
        {"name": "e", "path": "e", "role": "expert", "base": "nope", "tasks": ["reverse"]}]}))
    with pytest.raises(ValueError, match="catalogue.json: expert 'e' names base 'nope'"):
        Catalogue.load(tmp_path)


def test_missing_catalogue_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="catalogue.json"):
        Catalogue.load(tmp_path)


def test_index_outside_folder_is_refused(tiny_catalogue, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        weight_files(folder)


def test_state_dict_roundtrip(tiny_catalogue):
    sd = load_state_dict(tiny_catalogue / "base0")
    assert "model.embed_tokens.weight" in sd


def test_model_names_map_to_paths_in_every_recipe_form(tiny_catalogue):
    """base_model, models (mappings or bare names), slice sources and tokenizer_source are mapped; mergekit's
    tokenizer keywords are not, and a model named like a keyword is still a model."""
    recipe = {"merge_method": "ties", "base_model": "base", "tokenizer_source": "union",
              "models": [{"model": "a", "parameters": {"weight": 1.0}}, "b"],
              "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]}
    out = map_model_names(recipe, str.upper)
    assert out["base_model"] == "BASE" and out["tokenizer_source"] == "union"
    assert out["models"] == [{"model": "A", "parameters": {"weight": 1.0}}, "B"]
    assert out["slices"] == [{"sources": [{"model": "A", "layer_range": [0, 1]}]}]
    assert recipe["base_model"] == "base"  # the input is not changed
    assert map_model_names({"tokenizer_source": "a"}, str.upper) == {"tokenizer_source": "A"}
    cat = Catalogue.load(tiny_catalogue)
    job = {"merge_method": "linear", "base_model": "base0", "models": [{"model": "base0-reverse"}]}
    assert cat.with_paths(job)["models"][0]["model"] == cat.entry("base0-reverse").path
    assert cat.with_paths(job, absolute=True)["base_model"] == str(cat.path("base0"))
    assert pair_key("a", "b") == "a|b"
