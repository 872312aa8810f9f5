"""The streaming engine against mergekit and against the I/O floor, for every registered method, on the same inputs.

Makes three Llama-shaped checkpoints (a base and two experts = base + small noise) of ``--gb-per-model`` each, per
dtype in ``--dtype`` (float32 and bfloat16 by default), then for one recipe per registered method (the recipe's
``dtype`` is the checkpoints' dtype, so both tools compute in it) runs, as separate processes (wall seconds and
peak RSS of each, from ``getrusage`` of the child, imports included):

* ours: ``python -m simmerge_lib.engine RECIPE OUT`` (= ``simmerge merge``, which imports nothing else);
* mergekit: ``mergekit-yaml RECIPE OUT`` (skipped with a note when mergekit is not installed, or ``--no-mergekit``);
* the I/O floor of that recipe: reading the tensors it reads into memory and writing an output of its size with
  plain ``safetensors`` (``load_file`` + a copy of each tensor, since ``load_file`` only maps the file; then
  ``save_file``), one process.

Per method: ``speedup_vs_mergekit = mergekit_s / ours_s``, ``ratio_to_io_floor = ours_s / io_floor_s``,
``ours_peak_rss_mb``, ``mergekit_peak_rss_mb``. Goals: speedup >= 1.5, ratio_to_io_floor <= 1.5 and no more peak
memory than mergekit (``targets_met``). Also how far the two tools' tensors are apart (``vs_mergekit_output``:
TIES-like methods differ where entries tie at the trimming threshold; DARE and DELLA draw other random masks).
The machine's load average is recorded before and after (figures measured on a loaded machine are slower).
Usage: ``python benchmarks/merge_engine.py [--gb-per-model 1] [--dtype float32 bfloat16] [--methods ties linear]``.
Prints one JSON line and writes it to ``build/bench/merge_engine.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from simmerge_lib import engine
from simmerge_lib.checkpoint import iter_tensors, weight_files, write_json_atomic
from simmerge_lib.operators import OPERATORS
from simmerge_lib.paths import build_path
from simmerge_lib.recipe import Recipe

VOCAB, LAYERS = 32000, 8
MERGEKIT = Path(sys.executable).with_name("mergekit-yaml")


def llama_shapes(hidden: int) -> dict[str, tuple[int, ...]]:
    inter, kv = int(hidden * 2.75) // 64 * 64, hidden // 4
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, hidden)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                   p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                   p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter)}
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (VOCAB, hidden)}
    return shapes


def make_checkpoints(root: Path, gb: float, dtype_name: str) -> dict[str, Path]:
    """base, e0, e1 with about ``gb`` GB each (hidden size solved for; 8 layers, vocabulary 32000)."""
    dtype = getattr(torch, dtype_name)
    target = gb * 1e9 / dtype.itemsize
    # params ~ 2 V h + L (2 + 2/4 + 3 * 2.75) h^2
    a, b = LAYERS * 10.75, 2 * VOCAB
    hidden = max(64, int((-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)) // 64 * 64)
    shapes = llama_shapes(hidden)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": shapes["model.layers.0.mlp.up_proj.weight"][0], "num_hidden_layers": LAYERS,
              "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 256 or 1,
              "vocab_size": VOCAB, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "dtype": dtype_name, "torch_dtype": dtype_name}
    folders = {n: root / n for n in ("base", "e0", "e1")}
    stamp = root / f"made-{gb}-{dtype_name}"
    if stamp.exists():
        return folders
    shutil.rmtree(root, ignore_errors=True)
    gen = torch.Generator().manual_seed(0)
    for name, folder in folders.items():
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors: dict[str, dict[str, torch.Tensor]] = {n: {} for n in folders}
    for tname, shape in shapes.items():
        base = torch.randn(shape, generator=gen) * 0.02
        tensors["base"][tname] = base.to(dtype)
        for n in ("e0", "e1"):
            tensors[n][tname] = (base + torch.randn(shape, generator=gen) * 0.002).to(dtype)
    for n, folder in folders.items():
        save_file(tensors[n], folder / "model.safetensors", {"format": "pt"})
    stamp.write_text("ok")
    return folders


def recipes(folders: dict[str, Path], dtype_name: str) -> dict[str, dict]:
    """One recipe per registered method (the benchmark covers every one; a new operator needs a line here)."""
    e0, e1, base = (str(folders[n]) for n in ("e0", "e1", "base"))

    def task_vectors(method: str, **per_model: float) -> dict:
        return {"merge_method": method, "base_model": base,
                "models": [{"model": e0, "parameters": {"weight": 1.0, **per_model}},
                           {"model": e1, "parameters": {"weight": 1.0, **per_model}}]}

    out = {
        "linear": {"merge_method": "linear", "models": [{"model": e0, "parameters": {"weight": 0.5}},
                                                         {"model": e1, "parameters": {"weight": 0.5}}]},
        "slerp": {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": e0}],
                  "parameters": {"t": 0.5}},
        "nuslerp": {"merge_method": "nuslerp", "base_model": base,
                    "models": [{"model": e0, "parameters": {"weight": 0.5}},
                               {"model": e1, "parameters": {"weight": 0.5}}]},
        "task_arithmetic": {**task_vectors("task_arithmetic"), "parameters": {"lambda": 0.8}},
        "ties": {**task_vectors("ties", density=0.2), "parameters": {"lambda": 1.0}},
        "dare_linear": task_vectors("dare_linear", density=0.2),
        "dare_ties": task_vectors("dare_ties", density=0.2),
        "breadcrumbs": task_vectors("breadcrumbs", density=0.9, gamma=0.01),
        "breadcrumbs_ties": task_vectors("breadcrumbs_ties", density=0.9, gamma=0.01),
        "della": task_vectors("della", density=0.2, epsilon=0.1),
        "della_linear": task_vectors("della_linear", density=0.2, epsilon=0.1),
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": [{"model": e0},
                                                                                       {"model": e1}]},
        "passthrough": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": e0, "layer_range": [0, LAYERS * 5 // 8]}]},
            {"sources": [{"model": e1, "layer_range": [LAYERS * 3 // 8, LAYERS]}]}]},
    }
    missing = set(OPERATORS) - set(out)
    if missing:
        raise SystemExit(f"benchmarks/merge_engine.py: no recipe for the registered method(s) {sorted(missing)}")
    return {name: {**spec, "dtype": dtype_name} for name, spec in out.items()}


IO_FLOOR = """
import json, sys, time
from safetensors.torch import load_file, save_file
spec = json.loads(sys.argv[1])
t0 = time.perf_counter()
read = {}
for path, names in spec["reads"].items():
    mapped = load_file(path)  # memory-mapped: no byte has been read yet
    read[path] = {name: mapped[name].clone() for name in names}  # the bytes actually read into memory
    del mapped
save_file({out: read[path][name] for path, name, out in spec["writes"]}, spec["out"], {"format": "pt"})
print(time.perf_counter() - t0)
"""

MEASURE = """
import resource, subprocess, sys, time, json
t0 = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t0
peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": rc.returncode, "wall_s": wall, "peak_rss_mb": peak_kb / 1024, "err": rc.stderr[-2000:]}))
"""


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` as the only child of a fresh process: its wall time and peak RSS (ru_maxrss)."""
    res = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if out["rc"] != 0:
        raise RuntimeError(f"{cmd[0]} failed: {out['err']}")
    return out


def floor_spec(recipe_dict: dict, out: Path) -> dict:
    """What the recipe reads (each needed tensor once) and an output of its size, for the I/O floor script."""
    plan = engine.plan_merge(Recipe.from_dict(recipe_dict), "1TB")
    reads: dict[str, list[str]] = {}
    writes = []
    for job in plan.jobs:
        names = job.input_names + ([job.base_name] if job.base is not None else [])
        for info, name in zip(job.inputs + ([job.base] if job.base is not None else []), names):
            if name not in reads.setdefault(str(info.path), []):
                reads[str(info.path)].append(name)
        first = (job.inputs or [job.base])[0]
        writes.append([str(first.path), (job.input_names or [job.base_name])[0], job.name])
    return {"reads": reads, "writes": writes, "out": str(out)}


def compare(a: Path, b: Path, atol: float = 1e-6) -> dict:
    """Largest absolute difference between two checkpoints and how many elements differ by more than ``atol``."""
    files = weight_files(b)
    worst, differ, total = 0.0, 0, 0
    for name, x in iter_tensors(a):
        with safe_open(str(files[name]), framework="pt") as fh:
            diff = (x.float() - fh.get_tensor(name).float()).abs()
        worst = max(worst, float(diff.max())) if diff.numel() else worst
        differ += int((diff > atol).sum())
        total += diff.numel()
    return {"max_abs_diff": worst, "elements_differing": differ, "elements": total}


def bench_dtype(args: argparse.Namespace, dtype: str, work: Path, have_mergekit: bool) -> dict:
    folders = make_checkpoints(work / f"models-{dtype}", args.gb_per_model, dtype)
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]  # mergekit's shard size counts parameters
    specs = recipes(folders, dtype)
    methods = args.methods or list(specs)
    rows: dict[str, dict] = {}
    floors: dict[str, dict] = {}
    for name in methods:
        spec = specs[name]
        path = work / f"{name}.yml"
        Recipe.from_dict(spec).to_yaml(path)
        ours_out, theirs_out = work / f"ours_{name}", work / f"mergekit_{name}"
        fspec = floor_spec(spec, work / "io_floor.safetensors")
        key = json.dumps(fspec, sort_keys=True)
        if key not in floors:  # recipes that read and write the same tensors share one floor measurement
            floors[key] = measure([sys.executable, "-c", IO_FLOOR, json.dumps(fspec)])
            (work / "io_floor.safetensors").unlink(missing_ok=True)
        floor = floors[key]
        cmd = [sys.executable, "-m", "simmerge_lib.engine", str(path), str(ours_out), "--force", "--quiet",
               "--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
        ours = measure(cmd)
        row = {"ours_s": round(ours["wall_s"], 2), "ours_peak_rss_mb": round(ours["peak_rss_mb"]),
               "io_floor_s": round(floor["wall_s"], 2), "io_floor_peak_rss_mb": round(floor["peak_rss_mb"]),
               "ratio_to_io_floor": round(ours["wall_s"] / floor["wall_s"], 2)}
        if have_mergekit:
            shutil.rmtree(theirs_out, ignore_errors=True)
            theirs = measure([str(MERGEKIT), str(path), str(theirs_out), "--lazy-unpickle", "--no-copy-tokenizer",
                              "--out-shard-size", str(int(2e9 // itemsize)), "--quiet"])
            row |= {"mergekit_s": round(theirs["wall_s"], 2), "mergekit_peak_rss_mb": round(theirs["peak_rss_mb"]),
                    "speedup_vs_mergekit": round(theirs["wall_s"] / ours["wall_s"], 2),
                    "vs_mergekit_output": compare(ours_out, theirs_out)}
            row["targets_met"] = (row["speedup_vs_mergekit"] >= 1.5 and row["ratio_to_io_floor"] <= 1.5
                                  and row["ours_peak_rss_mb"] <= row["mergekit_peak_rss_mb"])
        rows[name] = row
        print(json.dumps({"dtype": dtype, "method": name, **row}), file=sys.stderr, flush=True)
        shutil.rmtree(ours_out, ignore_errors=True)
        shutil.rmtree(theirs_out, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb-per-model", type=float, default=1.0)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (default: every one)")
    parser.add_argument("--no-mergekit", action="store_true", help="ours and the I/O floor only")
    parser.add_argument("--threads", type=int, default=None, help="simmerge --threads (default: its own)")
    parser.add_argument("--work", default=None, help="scratch folder (default build/bench/merge_engine_work)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    parser.add_argument("--device", default="cpu", help="simmerge --device (results go to merge_engine_<device>.json)")
    args = parser.parse_args()

    work = Path(args.work) if args.work else build_path("bench", "merge_engine_work")
    work.mkdir(parents=True, exist_ok=True)
    have_mergekit = MERGEKIT.exists() and not args.no_mergekit
    os.environ["HF_HUB_OFFLINE"] = "1"
    result: dict = {"gb_per_model": args.gb_per_model, "cores": os.cpu_count(), "device": args.device,
                    "load_average_before": [round(x, 2) for x in os.getloadavg()], "by_dtype": {}}
    for dtype in args.dtype:
        result["by_dtype"][dtype] = bench_dtype(args, dtype, work, have_mergekit)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if not have_mergekit:
        result["note"] = "mergekit not run" + ("" if args.no_mergekit else ": pip install -e '.[dev]'")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    write_json_atomic(build_path("bench", f"merge_engine{suffix}.json"), result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
