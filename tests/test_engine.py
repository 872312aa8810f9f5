"""The streaming engine: equals the in-memory path and mergekit, writes a loadable sharded folder atomically,
resumes, and refuses every kind of bad input with a one-line error that names the file."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import perturbed, tiny_llama
from simmerge_lib import cli, engine
from simmerge_lib.checkpoint import CheckpointError, load_state_dict, save_pretrained_atomic
from simmerge_lib.recipe import Recipe

RECIPES = {
    "linear": {"merge_method": "linear", "models": [{"model": "e0", "parameters": {"weight": 0.3}},
                                                     {"model": "e1", "parameters": {"weight": [0.2, 1.0]}}]},
    "slerp": {"merge_method": "slerp", "base_model": "base", "models": [{"model": "base"}, {"model": "e0"}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": 0.4}]}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base",
                        "models": [{"model": "e0", "parameters": {"weight": 0.7}},
                                   {"model": "e1", "parameters": {"weight": 0.5}}], "parameters": {"lambda": 0.8}},
    "ties": {"merge_method": "ties", "base_model": "base",
             "models": [{"model": "e0", "parameters": {"weight": 0.7, "density": 0.3}},
                        {"model": "e1", "parameters": {"weight": 0.5, "density": [0.2, 0.6]}}],
             "parameters": {"lambda": 0.9}},
    "dare_ties": {"merge_method": "dare_ties", "base_model": "base",
                  "models": [{"model": "e0", "parameters": {"weight": 1.0, "density": 0.5}},
                             {"model": "e1", "parameters": {"weight": 1.0, "density": 0.5}}],
                  "parameters": {"seed": 3}},
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engine_zoo")
    base, tok = tiny_llama(seed=1)
    save_pretrained_atomic(base, tok, root / "base", {})
    for i in range(2):
        save_pretrained_atomic(perturbed(base, seed=i, scale=0.05), tok, root / f"e{i}", {})
    return root


def recipe_at(zoo: Path, name: str, **extra) -> Recipe:
    return Recipe.from_dict({**RECIPES[name], **extra}, root=zoo, source=f"{name}.yml")


def fingerprint(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.mark.parametrize("method", list(RECIPES))
def test_streaming_equals_in_memory_and_writes_a_sharded_folder(zoo, tmp_path, method):
    before = {f: fingerprint(zoo / f) for f in ("base", "e0", "e1")}
    recipe = recipe_at(zoo, method)
    out = engine.merge(recipe, tmp_path / "out", shard_size="20KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not (out.parent / "out.partial").exists()
    streamed = load_state_dict(out)
    in_memory = engine.merge_in_memory(recipe)
    assert streamed.keys() == in_memory.keys()
    for name in streamed:
        assert torch.equal(streamed[name], in_memory[name]), name
    assert before == {f: fingerprint(zoo / f) for f in ("base", "e0", "e1")}  # inputs untouched
    if method == "ties":  # and the folder is a model transformers can load and run
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out)
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.fixture(scope="module")
def mergekit_api():
    pytest.importorskip("mergekit", reason="mergekit not installed (pip install -e '.[dev]')")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    def run(recipe: Recipe, out: Path) -> dict[str, torch.Tensor]:
        config = MergeConfiguration.model_validate(recipe.with_paths_resolved().to_dict())
        run_merge(config, str(out), MergeOptions(lazy_unpickle=True, copy_tokenizer=False, quiet=True,
                                                 write_model_card=False))
        return load_state_dict(out)

    return run


@pytest.mark.parametrize("method", ["linear", "slerp", "task_arithmetic", "ties"])
def test_equals_mergekit(zoo, tmp_path, mergekit_api, method):
    recipe = recipe_at(zoo, method, dtype="float32")
    theirs = mergekit_api(recipe, tmp_path / "mergekit")
    ours = load_state_dict(engine.merge(recipe, tmp_path / "ours", progress=False))
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_dtype_mixed_inputs_and_bfloat16_output(zoo, tmp_path):
    mixed = tmp_path / "e1_bf16"
    shutil.copytree(zoo / "e1", mixed)
    sd = load_file(mixed / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, mixed / "model.safetensors", {"format": "pt"})
    spec = json.loads(json.dumps(RECIPES["ties"]).replace('"e1"', json.dumps(str(mixed))))
    recipe = Recipe.from_dict({**spec, "dtype": "bfloat16"}, root=zoo)
    out = engine.merge(recipe, tmp_path / "out", progress=False)
    merged = load_state_dict(out)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    in_memory = engine.merge_in_memory(recipe)
    assert all(torch.equal(merged[k], in_memory[k]) for k in merged)


def test_existing_out_needs_force_and_cli_round_trip(zoo, tmp_path, capsys):
    path = tmp_path / "r.yml"
    recipe_at(zoo, "linear").with_paths_resolved().to_yaml(path)
    out = tmp_path / "out"
    assert cli.main(["merge", str(path), str(out), "--quiet", "--shard-size", "50KB"]) == 0
    first = load_state_dict(out)
    assert cli.main(["merge", str(path), str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["merge", str(path), str(out), "--quiet", "--force"]) == 0
    assert all(torch.equal(first[k], v) for k, v in load_state_dict(out).items())
    assert Recipe.from_yaml(out / "mergekit_config.yml").merge_method == "linear"


def test_resume_keeps_finished_shards(zoo, tmp_path, monkeypatch):
    recipe = recipe_at(zoo, "ties")
    out = tmp_path / "out"
    real = engine.TaskRunner.run_task
    calls = {"n": 0}

    def flaky(self, task):
        calls["n"] += 1
        if calls["n"] > 12:
            raise KeyboardInterrupt("simulated crash")
        return real(self, task)

    monkeypatch.setattr(engine.TaskRunner, "run_task", flaky)
    with pytest.raises(KeyboardInterrupt):
        engine.merge(recipe, out, shard_size="20KB", threads=1, progress=False)
    partial = tmp_path / "out.partial"
    finished = {p.name: p.stat().st_mtime_ns for p in partial.glob("*.safetensors")}
    assert finished and not out.exists()
    monkeypatch.setattr(engine.TaskRunner, "run_task", real)
    engine.merge(recipe, out, shard_size="20KB", resume=True, progress=False)
    assert all((out / n).stat().st_mtime_ns == t for n, t in finished.items())  # reused, not rewritten
    fresh = engine.merge(recipe, tmp_path / "fresh", shard_size="20KB", progress=False)
    a, b = load_state_dict(out), load_state_dict(fresh)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- bad input: a one-line error naming the file, nothing that looks finished -------------------------------
def expect_error(recipe: Recipe, out: Path, exc_type, *fragments: str) -> None:
    with pytest.raises(exc_type) as info:
        engine.merge(recipe, out, progress=False)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()


def with_model(zoo: Path, folder: Path, method: str = "task_arithmetic") -> Recipe:
    spec = json.loads(json.dumps(RECIPES[method]).replace('"e1"', json.dumps(str(folder))))
    return Recipe.from_dict(spec, root=zoo)


def test_different_shapes_and_architectures(zoo, tmp_path):
    wide, tok = tiny_llama(seed=5, hidden=48)
    save_pretrained_atomic(wide, tok, tmp_path / "wide", {})
    expect_error(with_model(zoo, tmp_path / "wide"), tmp_path / "out", CheckpointError, "wide", "shape")
    other = tmp_path / "other_arch"
    shutil.copytree(zoo / "e1", other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"], config["model_type"] = ["MistralForCausalLM"], "mistral"
    (other / "config.json").write_text(json.dumps(config))
    expect_error(with_model(zoo, other), tmp_path / "out", CheckpointError, "other_arch", "architecture")


def test_missing_tensor(zoo, tmp_path):
    folder = tmp_path / "missing"
    shutil.copytree(zoo / "e1", folder)
    sd = load_file(folder / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, folder / "model.safetensors", {"format": "pt"})
    expect_error(with_model(zoo, folder), tmp_path / "out", CheckpointError, "missing",
                 "model.layers.1.mlp.down_proj.weight")


def test_index_pointing_outside_the_folder_is_refused_unopened(zoo, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(zoo / "e1", folder)
    sd = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    save_file(sd, tmp_path / "outside.safetensors", {"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../outside.safetensors" for k in sd}}))
    before = (tmp_path / "outside.safetensors").stat().st_atime_ns
    expect_error(with_model(zoo, folder), tmp_path / "out", CheckpointError, "outside the checkpoint folder")
    assert (tmp_path / "outside.safetensors").stat().st_atime_ns == before


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_shard(zoo, tmp_path, damage):
    folder = tmp_path / "broken"
    shutil.copytree(zoo / "e1", folder)
    shard = folder / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\xff" * 64 + data[64:])
    expect_error(with_model(zoo, folder), tmp_path / "out", CheckpointError, str(shard))


def test_nan_in_an_input(zoo, tmp_path):
    folder = tmp_path / "nan"
    shutil.copytree(zoo / "e1", folder)
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(sd, folder / "model.safetensors", {"format": "pt"})
    expect_error(with_model(zoo, folder, "ties"), tmp_path / "out", CheckpointError, "nan", "NaN",
                 "model.layers.0.self_attn.q_proj.weight")


def test_out_equal_to_or_inside_an_input(zoo, tmp_path):
    recipe = recipe_at(zoo, "linear")
    with pytest.raises(ValueError, match="overlaps the input model"):
        engine.merge(recipe, zoo / "e0", force=True, progress=False)
    with pytest.raises(ValueError, match="overlaps the input model"):
        engine.merge(recipe, zoo / "e0" / "merged", progress=False)
    assert load_state_dict(zoo / "e0")  # still intact


def test_full_disk(zoo, tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    expect_error(recipe_at(zoo, "linear"), tmp_path / "out", CheckpointError, "out.partial", "disk full")

    monkeypatch.setattr(engine.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))
    expect_error(recipe_at(zoo, "linear"), tmp_path / "out", CheckpointError, "not enough disk space")


def test_device_and_module_entry_point(zoo, tmp_path, capsys):
    recipe = recipe_at(zoo, "linear")
    if torch.cuda.is_available():
        out = engine.merge(recipe, tmp_path / "gpu", device="cuda", progress=False)
        cpu = engine.merge(recipe, tmp_path / "cpu", progress=False)
        a, b = load_state_dict(out), load_state_dict(cpu)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    else:
        with pytest.raises(ValueError, match="CUDA is not available"):
            engine.merge(recipe, tmp_path / "gpu", device="cuda", progress=False)
    path = tmp_path / "r.yml"
    recipe.with_paths_resolved().to_yaml(path)
    assert engine.main([str(path), str(tmp_path / "m"), "--quiet", "--threads", "3"]) == 0
    assert engine.main([str(path), str(tmp_path / "m"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
