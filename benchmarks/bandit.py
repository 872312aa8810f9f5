"""Online operator choice (chapter 06): regret of contextual bandits replaying a profile's labels table.

Replays ``--seeds`` streams of ``--horizon`` merge requests drawn from the pairs of ``build/labels/<profile>.parquet``
(contexts from ``build/features/<profile>.parquet``) through LinUCB, hybrid LinUCB, linear Thompson sampling, the
offline predictor of chapter 04 (trained on the pre-stream pairs), the best fixed arm and uniform random, with three
events mid-stream (a new operator's arms appear; a new task's pairs enter; new experts' pairs enter; see
:func:`simmerge_lib.bandit.make_scenario`). Reports, each as mean ± std over seeds: the cumulative regret at the end
of the stream, and the summed regret over the ``window`` (50) requests before and after each event. LinUCB and
hybrid LinUCB also run warm-started from the offline predictor (``linucb_warm``, ``hybrid_warm``; weight 0.5 per
pseudo-observation, :func:`simmerge_lib.bandit.warm_observations`).
``--synthetic`` replays the planted-rule tables of :func:`simmerge_lib.bandit.synthetic_tables` instead.
Usage: ``python benchmarks/bandit.py [--profile default] [--seeds 20] [--horizon 600] [--synthetic]``.
Prints one JSON line and writes it to ``build/bench/bandit.json``.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    from simmerge_lib import bandit
    from simmerge_lib.paths import build_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="tables build/{features,labels}/<profile>.parquet")
    parser.add_argument("--synthetic", action="store_true", help="replay synthetic tables (no build outputs needed)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--horizon", type=int, default=600)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--noise", type=float, default=0.0, help="std of noise on observed rewards")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the history pairs and the new experts")
    args = parser.parse_args()

    start = time.perf_counter()
    if args.synthetic:
        features, labels = bandit.synthetic_tables(seed=args.split_seed)
        source = "synthetic"
    else:
        features, labels = bandit.bandit_tables(args.profile)
        source = args.profile
    data = bandit.replay_data(features, labels)
    scenario = None
    # A small catalogue may not keep enough pairs at the start for every event: drop new experts, then the task.
    for new_task, new_experts in (("auto", 2), ("auto", 1), ("auto", None), (None, None)):
        try:
            scenario = bandit.make_scenario(data, args.horizon, new_task=new_task, new_experts=new_experts,
                                            window=args.window, seed=args.split_seed)
            break
        except ValueError:
            continue
    if scenario is None:
        raise SystemExit(f"bandit benchmark: too few pairs ({len(data.pairs)}) for a scenario")
    setup = bandit.prepare_replay(data, scenario)
    prep = time.perf_counter() - start
    warm = ["linucb", "hybrid"] if setup.predictor is not None else []
    runs = bandit.replay_many(setup, seeds=range(args.seeds), noise=args.noise, warm_start=warm)
    wall = time.perf_counter() - start
    summary = bandit.summarize_runs(runs, scenario)
    pol = summary["policies"]
    result = {
        "benchmark": "bandit", "tables": source, "pairs": len(data.pairs), "arms": len(data.arms),
        "history_pairs": len(scenario.history), "horizon": args.horizon, "seeds": args.seeds, "window": args.window,
        "noise": args.noise, "best_fixed_arm": setup.best_fixed.key, "offline_predictor": setup.predictor is not None,
        "events": summary["events"],
        "cumulative_regret": {name: rec["cumulative_regret"] for name, rec in pol.items()},
        "mean_reward": {name: rec["mean_reward"] for name, rec in pol.items()},
        "regret_after_event": {ev.kind: {name: rec[f"{ev.kind}_after"] for name, rec in pol.items()}
                               for ev in scenario.events},
        "regret_before_event": {ev.kind: {name: rec[f"{ev.kind}_before"] for name, rec in pol.items()}
                                for ev in scenario.events},
        "prepare_seconds": round(prep, 2), "wall_seconds": round(wall, 2),
    }
    line = json.dumps(result)
    build_path("bench", "bandit.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
