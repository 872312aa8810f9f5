"""Full-width rehearsal of a 111B merge (chapter 07): memory bound, throughput, kill-and-resume, workers.

Synthesizes base + 2 experts with the real tensor names and full shapes of ``data/configs/dense-111b`` for the
chosen layers / tensors, then (see ``simmerge_lib.scale.rehearse``): a TIES merge in a child process (wall seconds,
peak RSS from the child's own ``VmHWM``, against ``(3 + 2) x largest x 4 B + overhead``); a second merge SIGKILLed
once half its shards are written and resumed (byte-equal to the first, equal tensor by tensor to the operator on
whole tensors in memory); a merge spread over ``--workers`` processes (byte-equal to the first); the read/write
floor of the disk. ``predicted_s`` comes from a separate small calibration merge (``measure_throughput``).
Inputs are deleted afterwards unless ``--keep``.

Usage: ``python benchmarks/scale.py [--layers 0] [--include REGEX] [--workers 2] [--backend process|ray]``.
Prints one JSON line and writes it to ``build/bench/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import time

from simmerge_lib import scale
from simmerge_lib.paths import build_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[0])
    ap.add_argument("--include", default=r"self_attn|layernorm",
                    help="regex of tensor names to synthesize (default: the attention block; '' = whole layers)")
    ap.add_argument("--shard-size", default="200MB")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backend", default="process", choices=["process", "ray", "serial"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--features", action="store_true", help="also stream the structural features of the pair")
    ap.add_argument("--device", default="cpu", help="where the merge arithmetic runs (cpu or cuda)")
    ap.add_argument("--keep", action="store_true", help="keep the synthesized inputs in build/scale/bench")
    args = ap.parse_args()
    start = time.perf_counter()
    cal = scale.measure_throughput(rows=1024, threads=args.threads)
    r = scale.rehearse(build_path("scale", "bench"), layers=args.layers, include=args.include or None,
                       shard_size=args.shard_size, threads=args.threads, workers=args.workers, backend=args.backend,
                       calibrated_gb_per_s=cal["gb_per_s"], calibrated_gb_per_cpu_s=cal["gb_per_cpu_s"],
                       features=args.features, cleanup=not args.keep, device=args.device,
                       progress=False)
    plan = scale.rehearsal_plan(r)
    result = {
        "total_input_gb": round(r.total_input_gb, 3), "peak_rss_mb": round(r.peak_rss_mb, 1),
        "predicted_peak_mb": round(r.predicted_peak_mb, 1), "gb_per_s": round(r.gb_per_s, 4),
        "io_floor_gb_per_s": round(r.io_floor_gb_per_s, 3), "resumed_ok": r.resumed_ok,
        "equal_to_in_memory": r.equal_to_in_memory, "workers": r.workers,
        "workers_equal": r.workers_equal, "workers_s": r.workers_s and round(r.workers_s, 1),
        "merge_s": round(r.merge_s, 1), "startup_s": round(r.startup_s, 1),
        "predicted_s": r.predicted_s and round(r.predicted_s, 1),
        "merge_cpu_s": round(r.merge_cpu_s, 1), "predicted_cpu_s": r.predicted_cpu_s and round(r.predicted_cpu_s, 1),
        "calibration_gb_per_s": round(cal["gb_per_s"], 4), "baseline_rss_mb": round(r.baseline_rss_mb, 1),
        "largest_tensor_mb_f32": round(r.largest_tensor_mb_f32, 1), "shards": r.shards,
        "killed_after_shards": r.killed_after_shards, "layers": r.layers, "include": args.include,
        "features_peak_rss_mb": r.features_peak_rss_mb and round(r.features_peak_rss_mb, 1),
        "plan_111b_params": plan.params, "plan_111b_hours_one_worker": plan.summary()["predicted_hours"],
        "plan_111b_peak_gb": plan.summary()["predicted_peak_gb_per_worker"], "notes": r.notes,
        "wall_s": round(time.perf_counter() - start, 1), "device": args.device,
    }
    line = json.dumps(result)
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    build_path("bench", f"scale{suffix}.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
