"""``simmerge recommend A B``: rank every candidate for a pair of experts, compare with keeping the better
parent, and print the recipe of the best merge (or advise not to merge)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd

from .. import profiles
from ..catalogue import Catalogue
from ..features import pair_features
from ..labels import job_recipe
from ..operators import setting_parameters
from ..paths import build_path
from ..recipe import Recipe
from .store import catalogue_predictor
from .training import owner_rows


def recommend_rows(catalogue: Any, a: str, b: str, n_probes: int) -> pd.DataFrame:
    """The owner-oriented feature rows of the pair (a, b) of a catalogue, computed now (both orders)."""
    bases = [catalogue.path(catalogue.base_of(x).name) for x in (a, b)]
    tasks = [t for t in catalogue.tasks if t in set(catalogue.entry(a).tasks) | set(catalogue.entry(b).tasks)]
    forward = pair_features(catalogue.path(a), catalogue.path(b), *bases, tasks, n_probes=n_probes)
    backward = pair_features(catalogue.path(b), catalogue.path(a), *bases[::-1], tasks, n_probes=n_probes)
    forward["a"], forward["b"], backward["a"], backward["b"] = a, b, b, a
    feats = pd.concat([forward, backward], ignore_index=True)
    feats["task_of_a"] = [1.0 if t in catalogue.entry(x).tasks else 0.0 for x, t in zip(feats.a, feats.task)]
    return owner_rows(feats, pd.DataFrame({"a": a, "b": b, "task": tasks}))


def _recommend(args: argparse.Namespace) -> int:
    catalogue = Catalogue.load(args.catalogue)
    predictor = catalogue_predictor(catalogue, args.predictor)
    for name in (args.a, args.b):
        if catalogue.entry(name).role != "expert":
            raise ValueError(f"{name!r} is a base of catalogue {catalogue.name!r}; recommend merges two experts")
    if set(catalogue.entry(args.a).tasks) == set(catalogue.entry(args.b).tasks):
        raise ValueError(f"{args.a!r} and {args.b!r} serve the same task(s); recommend combines two skills")
    n_probes = args.n_probes or profiles.settings("probes", "default")["n_probes"]
    rows = recommend_rows(catalogue, args.a, args.b, n_probes)
    ranked = predictor.rank(rows)
    advice = predictor.recommend(rows).iloc[0]
    print(f"# {args.a} + {args.b} — predicted merge quality (predictor: {predictor.family}; the best fixed "
          f"candidate {predictor.fixed} gets a head start of {predictor.margin:g})")
    print(ranked[["rank", "method", "setting", "predicted"]].head(args.top).to_string(index=False, float_format="%.3f"))
    print(f"\n# keeping {advice.parent} alone: predicted {advice.keep_predicted:.3f}; the best merge is predicted "
          f"{advice.margin_over_parent:+.3f} against it")
    if advice.abstain:
        print(f"# advice: do not merge — no candidate is predicted to beat keeping {advice.parent} "
              f"(predicted margin {advice.margin_over_parent:+.3f})")
        return 0
    pair = sorted((args.a, args.b), key=[m.name for m in catalogue.models].index)
    recipe = job_recipe(advice.method, pair[0], pair[1], catalogue.base_of(pair[0]).name,
                        setting_parameters(advice.setting), args.seed)
    text = Recipe.from_dict(catalogue.with_paths(recipe, absolute=True), source="recommendation").to_yaml()
    print("\n# recipe (mergekit format): save as recipe.yaml and run `simmerge merge recipe.yaml OUT`")
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


def predictor_parser(subparsers: argparse._SubParsersAction, name: str, help: str, description: str
                     ) -> argparse.ArgumentParser:
    """The parser of a sub-command that asks a catalogue's predictor (``recommend``, ``plan``), with the option they
    share: ``--predictor`` (default: :func:`~simmerge_lib.predictor.store.catalogue_predictor`'s file)."""
    p = subparsers.add_parser(name, help=help, description=description)
    p.add_argument("--predictor", help="predictor .skops file (default build/predictor/<catalogue name>.skops)")
    return p


def register(subparsers: argparse._SubParsersAction) -> None:
    p = predictor_parser(subparsers, "recommend", help="rank merge candidates for two experts by predicted quality",
                         description="Compute the pair's features, rank every candidate by the predictor's quality, "
                                     "compare with keeping the better parent, and print the recipe of the best "
                                     "merge (or advise not to merge).")
    p.add_argument("a", help="one expert")
    p.add_argument("b", help="the other expert (the order does not matter)")
    p.add_argument("--catalogue", default=str(build_path("zoo", "default")), help="catalogue folder "
                   "(default build/zoo/default)")
    p.add_argument("--n-probes", type=int, help="probe prompts per task for the features (default 32)")
    p.add_argument("--top", type=int, default=20, help="rows of the ranking to print")
    p.add_argument("--seed", type=int, default=0, help="seed written into the recipe (DARE masks)")
    p.add_argument("--out", help="also write the recipe YAML here")
    p.set_defaults(func=_recommend)
