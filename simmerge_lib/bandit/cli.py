"""``simmerge bandit``: replay a profile's labels through the policies and print the regret summary (JSON)."""

from __future__ import annotations

import argparse
import json

from .arms import replay_data
from .replay import replay_many, prepare_replay, summarize_runs
from .scenarios import DEFAULT_HORIZON, scenario_for
from .tables import bandit_tables


def _cmd_bandit(args: argparse.Namespace) -> int:
    features, labels = bandit_tables(args.profile)
    data = replay_data(features, labels)
    scenario = scenario_for(data, horizon=args.horizon, seed=args.split_seed)
    setup = prepare_replay(data, scenario)
    runs = replay_many(setup, seeds=range(args.seeds), noise=args.noise)
    print(json.dumps(summarize_runs(runs, scenario)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bandit", help="replay a profile's labels through contextual bandits (regret summary)")
    p.add_argument("--profile", default="default", help="tables build/{features,labels}/<profile>.parquet")
    p.add_argument("--horizon", type=int, default=DEFAULT_HORIZON, help="requests in the stream")
    p.add_argument("--seeds", type=int, default=10, help="streams replayed per policy")
    p.add_argument("--noise", type=float, default=0.0, help="std of noise added to observed rewards")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the history pairs and new experts")
    p.set_defaults(func=_cmd_bandit)
