"""Chapter 07 at small sizes: the plan matches a hand count, a killed merge resumes to the same bytes, workers
write the same shards as one process, and peak memory is bounded by the largest tensor, not the model size."""

from __future__ import annotations

import json

import pytest
import torch

from simmerge_lib import cli, engine, scale
from simmerge_lib.checkpoint import load_state_dict

# hidden 256, 8 heads of 32, 2 kv heads -> k/v rows 64; mlp 1024
CFG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 1024,
       "num_hidden_layers": 12, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 256,
       "tie_word_embeddings": False}
SHARD = "300KB"  # each mlp tensor (512 KB in bf16) gets a shard of its own: ~50 shards


def hand_count(h: int, inter: int, layers: int, vocab: int, kv_rows: int, tied: bool) -> dict[str, int]:
    per_layer = 2 * h * h + 2 * kv_rows * h + 3 * h * inter + 2 * h  # q, o; k, v; gate, up, down; 2 norms
    embed = vocab * h * (1 if tied else 2)
    return {"params": layers * per_layer + embed + h, "tensors": layers * 9 + 2 + (0 if tied else 1)}


@pytest.mark.parametrize("tied", [False, True])
def test_plan_matches_a_hand_count(tied):
    cfg = {**CFG, "num_hidden_layers": 3, "tie_word_embeddings": tied}
    plan = scale.plan_from_config(cfg, n_models=3, method="ties", dtype="bfloat16", out_dtype="float32",
                                  shard_size="1MB", gb_per_s=0.5)
    want = hand_count(256, 1024, 3, 256, 64, tied)
    assert plan.params == want["params"] and len(plan.tensors) == want["tensors"]
    assert plan.bytes_read == 3 * want["params"] * 2 and plan.bytes_written == want["params"] * 4
    assert plan.largest.numel == 1024 * 256  # an mlp matrix, larger than the 256 x 256 embedding
    assert plan.peak_bytes == 5 * 1024 * 256 * 4 + scale.OVERHEAD_BYTES
    assert plan.seconds == pytest.approx(plan.bytes_read / 0.5e9)
    # shards: in order, every tensor once, each under the limit unless a single tensor exceeds it
    table = plan.table()
    assert [n for s in plan.shards for n in s] == [t.name for t in plan.tensors]
    per_shard = table.groupby("shard")["bytes_written"].agg(["sum", "count"])
    assert ((per_shard["sum"] <= 1e6) | (per_shard["count"] == 1)).all()
    assert len(plan.shards) == 4 * 3 + 1  # fp32 mlp matrix is exactly 1 MiB > 1 MB: each alone, per layer
    layers = plan.per_layer()
    assert layers["bytes_read"].sum() == plan.bytes_read and len(layers) == 4
    assert ("lm_head.weight" in table["name"].values) is not tied


def test_the_shipped_111b_config_plans_to_111b():
    plan = scale.plan_from_config(scale.DENSE_111B, n_models=3)
    assert 110e9 < plan.params < 112e9 and plan.in_dtype == "bfloat16"
    assert plan.largest.name == "model.embed_tokens.weight"
    assert plan.summary()["bytes_read_gb"] == pytest.approx(3 * plan.params * 2 / 1e9, rel=1e-3)


def test_plan_merge_command(capsys, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**CFG, "num_hidden_layers": 2}))
    assert cli.main(["plan-merge", str(cfg), "--models", "3", "--method", "ties", "--json", "--gb-per-s", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["params"] == hand_count(256, 1024, 2, 256, 64, False)["params"]
    assert cli.main(["plan-merge", str(tmp_path / "nope.json")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert cli.main(["plan-merge", str(cfg), "--models", "1"]) == 2


def test_assign_shards_balances():
    bins = scale.assign_shards([5, 1, 1, 1, 1, 1], 2)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert sorted(sum([5, 1, 1, 1, 1, 1][i] for i in b) for b in bins) == [5, 5]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("scale")
    big = scale.synthesize_checkpoints(root / "big", CFG, layers=None, shard_size="4MB", progress=False)
    small = scale.synthesize_checkpoints(root / "small", CFG, layers=[0], shard_size="4MB", progress=False)
    recipes = {}
    for name, folders in (("big", big), ("small", small)):
        recipes[name] = root / f"{name}.yml"
        scale.ties_recipe(folders).to_yaml(recipes[name])
    reference = engine.merge(scale.ties_recipe(big), root / "reference", shard_size=SHARD, progress=False)
    return {"root": root, "big": big, "recipes": recipes, "reference": reference}


def test_synthesized_checkpoints_have_real_names_and_shapes(inputs):
    headers = engine.load_input(inputs["big"]["e0"]).tensors
    inventory = {t.name: t.shape for t in scale.tensor_inventory(CFG)}
    assert {n: i.shape for n, i in headers.items()} == inventory
    assert all(i.dtype == torch.bfloat16 for i in headers.values())


def test_kill_and_resume_equals_an_uninterrupted_merge(inputs):
    recipe_path, out = inputs["recipes"]["big"], inputs["root"] / "killed"
    total = len(engine.plan_merge(scale.ties_recipe(inputs["big"]), SHARD).shards)
    run = scale.run_measured(scale.merge_command(recipe_path, out, threads=1, shard_size=SHARD),
                             kill_when=lambda: len(scale.finished_shards(out)) >= 2, poll_s=0.005)
    kept = scale.finished_shards(out)
    assert run.killed and 2 <= len(kept) < total and not out.exists()
    partial = out.with_name("killed.partial")
    stamps = {p: (partial / p).stat().st_mtime_ns for p in kept}
    recipe = engine.Recipe.from_yaml(recipe_path)
    engine.merge(recipe, out, resume=True, shard_size=SHARD, progress=False)
    assert {p: (out / p).stat().st_mtime_ns for p in kept} == stamps  # finished shards were kept, not redone
    assert scale.files_identical(out, inputs["reference"])
    cmp = scale.compare_with_in_memory(recipe, out)  # the operator on whole tensors, one tensor at a time
    assert cmp["equal"] and cmp["tensors"] == len(load_state_dict(out))


def test_multi_worker_output_equals_single_worker(inputs):
    recipe = engine.Recipe.from_yaml(inputs["recipes"]["small"])  # 1 layer: 5 shards, cheap for 2 processes
    single = engine.merge(recipe, inputs["root"] / "one_worker", shard_size=SHARD, progress=False)
    out = inputs["root"] / "two_workers"
    report = scale.merge_distributed(recipe, out, workers=2, backend="process", shard_size=SHARD, progress=False)
    pids = {r["pid"] for r in report["reports"]}
    assert len(pids) == 2 and all(r["shards"] for r in report["reports"])
    assert scale.files_identical(out, single)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index == json.loads((single / "model.safetensors.index.json").read_text())
    assert (out / "config.json").is_file() and not out.with_name("two_workers.partial").exists()


def test_distributed_resume_keeps_finished_shards(inputs):
    recipe = scale.ties_recipe(inputs["big"])
    out = inputs["root"] / "serial"
    plan = engine.plan_merge(recipe, SHARD)
    partial = out.with_name("serial.partial")
    partial.mkdir()
    (partial / engine.PLAN_FILE).write_text(json.dumps({"fingerprint": plan.fingerprint}))
    scale.run_worker(recipe.with_paths_resolved().to_dict(), str(out), [0, 1, 2], plan.fingerprint, SHARD)
    (partial / (plan.shards[3].name + ".tmp")).write_bytes(b"half")
    report = scale.merge_distributed(recipe, out, workers=3, backend="serial", shard_size=SHARD, resume=True,
                                     progress=False)
    assert report["resumed_shards"] == 3
    assert scale.files_identical(out, inputs["reference"])
    with pytest.raises(FileExistsError):
        scale.merge_distributed(recipe, out, workers=2, backend="serial", shard_size=SHARD, progress=False)


def test_peak_memory_is_bounded_by_the_largest_tensor_not_the_model(inputs):
    largest, total_in, n_loaded = scale.largest_numel(engine.Recipe.from_yaml(inputs["recipes"]["big"]))
    tensor_part = (n_loaded + 2) * largest * 4
    assert total_in >= 10 * tensor_part  # the inputs are 10x the tensor-dependent part of the bound
    peaks = {}
    for name in ("big", "small"):
        out = inputs["root"] / f"rss_{name}"
        run = scale.run_measured(scale.merge_command(inputs["recipes"][name], out, threads=2, shard_size="2GB"))
        assert run.returncode == 0, run.output
        peaks[name] = run.peak_rss_bytes
    small_in = scale.largest_numel(engine.Recipe.from_yaml(inputs["recipes"]["small"]))[1]
    assert peaks["big"] <= scale.peak_bound(n_loaded, largest)
    # 12 layers instead of 1 (same largest tensor, ~10x the input bytes) cost almost nothing more in memory
    assert peaks["big"] - peaks["small"] < min(16 * 2**20, (total_in - small_in) / 4)
