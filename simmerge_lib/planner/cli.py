"""``simmerge plan CATALOGUE --tasks T1,T2 --k K``: plan a multi-way merge with the predictor and write its
multi-document recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..catalogue import Catalogue
from ..predictor import catalogue_predictor, predictor_parser
from .merges import write_plan_recipe
from .plans import EXHAUSTIVE_LIMIT, plan
from .scoring import PredictorScorer, predictor_ops


def _cmd_plan(args: argparse.Namespace) -> int:
    catalogue = Catalogue.load(args.catalogue)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks: give at least one task (comma-separated)")
    if args.k < 2:
        raise ValueError(f"--k must be at least 2, got {args.k}")
    predictor = catalogue_predictor(catalogue, args.predictor)
    ops = predictor_ops(predictor, args.ops.split(",") if args.ops else None)
    scorer = PredictorScorer(predictor, catalogue, n_probes=args.n_probes, seed=args.seed)
    min_k = args.k if args.min_k is None else args.min_k
    result = plan(catalogue, tasks, args.k, scorer, ops, base=args.base, beam_width=args.beam,
                  exhaustive_limit=args.exhaustive_limit, top=args.top, progress=not args.quiet, min_k=min_k)
    best = result.plan
    size = f"{min_k} to {args.k}" if min_k < args.k else f"{args.k}"
    print(f"# plan of {size} experts of {result.base} for {', '.join(tasks)} ({result.method} search over "
          f"{result.space} plans, {result.step_calls} scored steps; predictor: {predictor.family})")
    for rank, p in enumerate(result.ranked, start=1):
        print(f"{rank:>2}  predicted {p.predicted:.3f}  {p.describe()}")
    print("per-task predicted: " + ", ".join(f"{t}={v:.3f}" for t, v in best.task_predicted))
    if best.k == 1:
        print(f"advice: keep {best.order[0]} alone; no merge of up to {args.k} experts is predicted to do better")
        return 0
    out = Path(args.out) if args.out else Path(f"plan-{result.base}-{'-'.join(tasks)}-k{args.k}.yml")
    write_plan_recipe(best, catalogue, out, args.seed,
                      comment=f"simmerge plan: {best.describe()}\npredicted quality {best.predicted:.4f} on "
                              f"{', '.join(tasks)}\nrun: simmerge merge {out} OUT")
    print(f"recipe: {out}  (run `simmerge merge {out} OUT`)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``simmerge plan CATALOGUE --tasks T1,T2 --k K``."""
    p = predictor_parser(subparsers, "plan", help="plan a multi-way merge (subset, order, operators) with the "
                         "predictor", description="Search subsets, orders and per-step operators of k experts for the "
                                                  "target tasks with the predictor (no evaluation), print the plan "
                                                  "and write a multi-document recipe that `simmerge merge` executes.")
    p.add_argument("catalogue", help="catalogue folder or catalogue.json")
    p.add_argument("--tasks", required=True, help="target tasks, comma-separated")
    p.add_argument("--k", type=int, required=True, help="number of experts to merge")
    p.add_argument("--min-k", type=int, help="also consider plans of this many experts up to k, leaving some target "
                   "tasks' experts out (default: exactly k)")
    p.add_argument("--ops", help="only these operators, comma-separated (default: every predictor candidate)")
    p.add_argument("--base", help="only experts of this base (default: the best plan over every base)")
    p.add_argument("--beam", type=int, default=8, help="beam width when the space is too large (default 8)")
    p.add_argument("--exhaustive-limit", type=int, default=EXHAUSTIVE_LIMIT,
                   help=f"search exhaustively up to this many plans (default {EXHAUSTIVE_LIMIT})")
    p.add_argument("--n-probes", type=int, default=32, help="probe prompts per task for the features (default 32)")
    p.add_argument("--top", type=int, default=5, help="plans to list")
    p.add_argument("--seed", type=int, default=0, help="seed written into the recipe (DARE masks)")
    p.add_argument("--out", help="recipe file to write (default plan-<base>-<tasks>-k<k>.yml)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_plan)
