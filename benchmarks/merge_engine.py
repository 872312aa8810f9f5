"""The streaming merge engine against mergekit and against the I/O floor, on synthetic checkpoints.

Makes three Llama-shaped checkpoints (a base and two experts = base + small noise) of ``--gb-per-model`` each,
then, for a ``linear`` and a ``ties`` recipe, runs as separate processes (wall seconds and peak RSS of each,
from ``getrusage`` of the child, imports included):

* ours: ``python -m simmerge_lib.engine RECIPE OUT`` (= ``simmerge merge``, minus other commands' imports);
* mergekit: ``mergekit-yaml RECIPE OUT`` (skipped with a note when mergekit is not installed);
* the I/O floor: reading the three inputs into memory and writing one output with plain ``safetensors``
  (``load_file`` + a copy of each tensor, since ``load_file`` only maps the file; then ``save_file``).

``speedup_vs_mergekit = mergekit_s / ours_s``; ``ratio_to_io_floor = ours_s / io_floor_s``. Goals: speedup >= 1.5
at no more peak memory than mergekit, ratio_to_io_floor <= 1.5. Also checks that both tools produced the same
tensors (up to TIES threshold ties). Usage: ``python benchmarks/merge_engine.py [--gb-per-model 1] [--dtype float32] [--threads N]``.
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
    import torch
    from safetensors.torch import save_file

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
    e0, e1, base = (str(folders[n]) for n in ("e0", "e1", "base"))
    return {
        "linear": {"merge_method": "linear", "models": [{"model": e0, "parameters": {"weight": 0.5}},
                                                         {"model": e1, "parameters": {"weight": 0.5}}],
                   "dtype": dtype_name},
        "ties": {"merge_method": "ties", "base_model": base,
                 "models": [{"model": e0, "parameters": {"weight": 1.0, "density": 0.2}},
                            {"model": e1, "parameters": {"weight": 1.0, "density": 0.2}}],
                 "parameters": {"lambda": 1.0}, "dtype": dtype_name},
    }


IO_FLOOR = """
import sys, time
from safetensors.torch import load_file, save_file
t0 = time.perf_counter()
keep = None
for path in sys.argv[2:]:
    mapped = load_file(path)  # memory-mapped: no byte has been read yet
    sd = {name: t.clone() for name, t in mapped.items()}  # the bytes actually read into memory
    del mapped
    keep = keep or sd
save_file(keep, sys.argv[1], {"format": "pt"})
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


def compare(a: Path, b: Path, atol: float = 1e-6) -> dict:
    """Largest absolute difference between two checkpoints and how many elements differ by more than ``atol``
    (TIES keeps every entry tied with the top-k threshold; mergekit's argsort keeps an arbitrary k of them)."""
    from safetensors import safe_open

    from simmerge_lib.checkpoint import iter_tensors, weight_files

    files = weight_files(b)
    worst, differ, total = 0.0, 0, 0
    for name, x in iter_tensors(a):
        with safe_open(str(files[name]), framework="pt") as fh:
            diff = (x.float() - fh.get_tensor(name).float()).abs()
        worst = max(worst, float(diff.max())) if diff.numel() else worst
        differ += int((diff > atol).sum())
        total += diff.numel()
    return {"max_abs_diff": worst, "elements_differing": differ, "elements": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb-per-model", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="simmerge --threads (default: its own)")
    parser.add_argument("--work", default=None, help="scratch folder (default build/bench/merge_engine_work)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints and outputs")
    parser.add_argument("--device", default="cpu",
                        help="simmerge --device; with cuda the output is also compared with a CPU merge and the "
                             "result goes to build/bench/merge_engine_cuda.json")
    args = parser.parse_args()

    from simmerge_lib.checkpoint import write_json_atomic
    from simmerge_lib.paths import build_path

    work = Path(args.work) if args.work else build_path("bench", "merge_engine_work")
    folders = make_checkpoints(work / "models", args.gb_per_model, args.dtype)
    have_mergekit = MERGEKIT.exists()
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]  # mergekit's shard size counts parameters
    env_note = None if have_mergekit else "mergekit not installed: pip install -e '.[dev]'"
    result: dict = {"gb_per_model": args.gb_per_model, "dtype": args.dtype, "cores": os.cpu_count(),
                    "device": args.device,
                    "ours_s": {}, "mergekit_s": {}, "speedup_vs_mergekit": {}, "ours_peak_rss_mb": {},
                    "mergekit_peak_rss_mb": {}, "io_floor_s": None, "io_floor_peak_rss_mb": None,
                    "ratio_to_io_floor": {}, "vs_mergekit_output": {}}
    inputs = [str(folders[n] / "model.safetensors") for n in ("base", "e0", "e1")]
    floor_out = work / "io_floor.safetensors"
    floor = measure([sys.executable, "-c", IO_FLOOR, str(floor_out), *inputs])
    floor_out.unlink(missing_ok=True)
    result["io_floor_s"], result["io_floor_peak_rss_mb"] = round(floor["wall_s"], 2), round(floor["peak_rss_mb"])
    for name, spec in recipes(folders, args.dtype).items():
        path = work / f"{name}.yml"
        from simmerge_lib.recipe import Recipe

        Recipe.from_dict(spec).to_yaml(path)
        ours_out, theirs_out = work / f"ours_{name}", work / f"mergekit_{name}"
        def engine_cmd(out: Path, device: str) -> list[str]:
            # `python -m simmerge_lib.engine` is `simmerge merge` without importing the other sub-commands' modules
            cmd = [sys.executable, "-m", "simmerge_lib.engine", str(path), str(out), "--force", "--quiet",
                   "--device", device]
            return cmd + (["--threads", str(args.threads)] if args.threads else [])

        ours = measure(engine_cmd(ours_out, args.device))
        if args.device != "cpu":  # the GPU path must give the CPU path's tensors
            cpu_out = work / f"ours_cpu_{name}"
            cpu = measure(engine_cmd(cpu_out, "cpu"))
            result.setdefault("cpu_s", {})[name] = round(cpu["wall_s"], 2)
            result.setdefault("vs_cpu_output", {})[name] = compare(ours_out, cpu_out)
            shutil.rmtree(cpu_out, ignore_errors=True)
        result["ours_s"][name] = round(ours["wall_s"], 2)
        result["ours_peak_rss_mb"][name] = round(ours["peak_rss_mb"])
        result["ratio_to_io_floor"][name] = round(ours["wall_s"] / floor["wall_s"], 2)
        if have_mergekit:
            shutil.rmtree(theirs_out, ignore_errors=True)
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            os.environ.update(env)
            theirs = measure([str(MERGEKIT), str(path), str(theirs_out), "--lazy-unpickle", "--no-copy-tokenizer",
                              "--out-shard-size", str(int(2e9 // itemsize)), "--quiet"])
            result["mergekit_s"][name] = round(theirs["wall_s"], 2)
            result["mergekit_peak_rss_mb"][name] = round(theirs["peak_rss_mb"])
            result["speedup_vs_mergekit"][name] = round(theirs["wall_s"] / ours["wall_s"], 2)
            result["vs_mergekit_output"][name] = compare(ours_out, theirs_out)
        if not args.keep:
            shutil.rmtree(ours_out, ignore_errors=True)
            shutil.rmtree(theirs_out, ignore_errors=True)
    if env_note:
        result["note"] = env_note
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    line = json.dumps(result)
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    write_json_atomic(build_path("bench", f"merge_engine{suffix}.json"), result)
    print(line)


if __name__ == "__main__":
    main()
