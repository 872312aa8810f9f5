"""Online operator choice (chapter 06): regret of cold contextual bandits replaying a profile's labels table.

Replays ``--seeds`` streams of ``--horizon`` merge requests drawn from the pairs of ``build/labels/<profile>.parquet``
(the catalogue's current jobs; contexts from ``build/features/<profile>.parquet``) through LinUCB, hybrid LinUCB,
linear Thompson sampling — all *cold*: no observation before the stream — the offline predictor of chapter 04
(trained on the pre-stream history pairs, frozen), the best fixed arm (best on the history) and uniform random.
Three events mid-stream (:func:`simmerge_lib.bandit.make_scenario`): at T/4 the arms of an operator from the
registry that chapter 03's grid does not hold (``--new-operator``; its labels are collected on every pair once, into
``build/bandit/<profile>-registry.parquet``), at T/2 a new task's pairs enter, at 3T/4 new experts' pairs enter.
Reports, each as mean ± std over seeds: the cumulative regret at the end of the stream, the mean regret per request
over the last quarter, the request from which each learner's cumulative regret stays below the best fixed arm's
(the crossing point, on the mean curves), and the summed regret over the ``window`` requests before and after each
event. LinUCB and hybrid LinUCB also run warm-started from the offline predictor (``*_warm``), for comparison.
``--synthetic`` replays the planted-rule tables of :func:`simmerge_lib.bandit.synthetic_tables` instead.
Usage: ``python benchmarks/bandit.py [--profile default] [--seeds 20] [--horizon 1200] [--new-operator della]``.
Prints one JSON line and writes it to ``build/bench/bandit.json``.
"""

from __future__ import annotations

import argparse
import json
import time

from simmerge_lib import bandit
from simmerge_lib.checkpoint import write_json_atomic
from simmerge_lib.paths import build_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="tables build/{features,labels}/<profile>.parquet")
    parser.add_argument("--synthetic", action="store_true", help="replay synthetic tables (no build outputs needed)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--horizon", type=int, default=bandit.DEFAULT_HORIZON)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--new-operator", default=bandit.NEW_OPERATOR,
                        help="registry operator whose arms appear at T/4 ('auto': the label grid's operator whose "
                             "absence costs the oracle most)")
    parser.add_argument("--alpha", type=float, default=bandit.DEFAULT_ALPHA)
    parser.add_argument("--components", type=int, default=bandit.DEFAULT_COMPONENTS)
    parser.add_argument("--noise", type=float, default=0.0, help="std of noise on observed rewards")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the history pairs and the new experts")
    args = parser.parse_args()

    start = time.perf_counter()
    if args.synthetic:
        features, labels = bandit.synthetic_tables(seed=args.split_seed)
        source, new_operator = "synthetic", "auto"
    else:
        features, labels = bandit.stream_tables(args.profile, args.new_operator, progress=True)
        source, new_operator = args.profile, args.new_operator
    collected = time.perf_counter() - start
    data = bandit.replay_data(features, labels)
    scenario = bandit.scenario_for(data, args.horizon, new_operator=new_operator, window=args.window,
                                   seed=args.split_seed)
    setup = bandit.prepare_replay(data, scenario, n_components=args.components)
    prep = time.perf_counter() - start
    warm = ["linucb", "hybrid"] if setup.predictor is not None else []
    params = {p: {"alpha": args.alpha} for p in ("linucb", "hybrid")}
    runs = bandit.replay_many(setup, seeds=range(args.seeds), params=params, noise=args.noise, warm_start=warm)
    wall = time.perf_counter() - start
    summary = bandit.summarize_runs(runs, scenario)
    pol = summary["policies"]
    cold = [p for p in ("linucb", "hybrid", "thompson") if p in pol]
    end = {name: rec["cumulative_regret"]["mean"] for name, rec in pol.items()}
    best_cold = min(cold, key=end.get)
    result = {
        "benchmark": "bandit", "tables": source, "pairs": len(data.pairs), "arms": len(data.arms),
        "arm_names": data.keys, "history_pairs": len(scenario.history), "horizon": args.horizon,
        "seeds": args.seeds, "window": args.window, "alpha": args.alpha, "components": args.components,
        "noise": args.noise, "best_fixed_arm": setup.best_fixed.key, "offline_predictor": setup.predictor is not None,
        "events": summary["events"],
        "cumulative_regret": {name: rec["cumulative_regret"] for name, rec in pol.items()},
        "last_quarter_regret": {name: rec["last_quarter_regret"] for name, rec in pol.items()},
        "mean_reward": {name: rec["mean_reward"] for name, rec in pol.items()},
        "crossing_best_fixed": {name: rec.get("crossing_best_fixed") for name, rec in pol.items()
                                if name != "best_fixed"},
        "regret_before_event": {ev.kind: {name: rec[f"{ev.kind}_before"] for name, rec in pol.items()}
                                for ev in scenario.events},
        "regret_after_event": {ev.kind: {name: rec[f"{ev.kind}_after"] for name, rec in pol.items()}
                               for ev in scenario.events},
        "best_cold_learner": best_cold,
        "cold_beats_best_fixed": end[best_cold] < end["best_fixed"],
        "cold_beats_random": end[best_cold] < end["random"],
        "labels_seconds": round(collected, 2), "prepare_seconds": round(prep, 2), "wall_seconds": round(wall, 2),
    }
    write_json_atomic(build_path("bench", "bandit.json"), result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
