"""Building the catalogue: every checkpoint of a recipe trained (in worker processes, one torch thread each, or in
this process), saved as a Hugging Face folder with its card, and listed in ``catalogue.json``.

The cache under ``build/zoo/<profile>/`` is keyed by the recipe's digest: a matching catalogue is returned at once, a
changed recipe rebuilds, and an interrupted build resumes checkpoint by checkpoint (a checkpoint whose card carries
the digest is finished)."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from ..catalogue import CATALOGUE_FILE, Catalogue, ModelEntry
from ..checkpoint import quiet_transformers, read_card, save_pretrained_atomic
from ..evaluate import synthetic_detail
from ..paths import build_path
from ..tokenizer import build_tokenizer
from .recipes import ExpertStyle, ZooRecipe, recipe_for_profile, transfer_recipe
from .training import train_base, train_expert

#: A checkpoint of a build: (base index, expert index or None for the base itself).
Unit = tuple[int, int | None]


def catalogue_dir(profile: str) -> Path:
    return build_path("zoo", profile)


def build_transfer_catalogue(profile: str = "default", progress: bool = True, workers: int | None = None
                             ) -> Catalogue:
    """The larger, differently seeded catalogue of :func:`transfer_recipe`, cached in
    ``build/zoo/transfer-<profile>`` (``workers``: see :func:`build_catalogue`)."""
    recipe = transfer_recipe(profile)
    return build_catalogue(recipe.name, root=catalogue_dir(recipe.name), recipe=recipe, progress=progress,
                           workers=workers)


def build_catalogue(profile: str = "default", root: str | Path | None = None, force: bool = False,
                    recipe: ZooRecipe | None = None, progress: bool = True, workers: int | None = None
                    ) -> Catalogue:
    """Build (or load from cache) the catalogue of a profile and return it.

    Cached in ``root`` (default ``build/zoo/<profile>``) keyed by the recipe hash: a matching cache is returned at
    once; a different recipe rebuilds; checkpoints already finished for this recipe are kept (resume).
    ``workers`` checkpoints train at once in separate processes, one torch thread each (default: one per core;
    ``1`` trains in this process; with fewer bases than workers the bases train first, in this process, on all its
    threads); an expert starts as soon as its base is saved. The checkpoints do not depend on ``workers``."""
    recipe = recipe or recipe_for_profile(profile)
    workers = max(1, int(workers or os.cpu_count() or 1))
    root = Path(root) if root else catalogue_dir(profile)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Two notebooks or commands asking for the same catalogue at once: the second waits and then reads the cache.
    with FileLock(str(root.parent / f".{root.name}.lock")):
        return _build_catalogue_locked(recipe, root, force, progress, workers)


def _expert_names(recipe: ZooRecipe, base_index: int) -> list[tuple[str, str, ExpertStyle, int]]:
    """(name, task, style, seed) of a base's experts: ``base0-sort``, and ``base0-sort-2`` for a sibling."""
    seen: dict[str, int] = {}
    out = []
    for task, style, seed in recipe.expert_plan(base_index):
        seen[task] = seen.get(task, 0) + 1
        out.append((f"base{base_index}-{task}" + ("" if seen[task] == 1 else f"-{seen[task]}"), task, style, seed))
    return out


def _finished_card(folder: Path, digest: str) -> dict[str, Any] | None:
    """The card of a checkpoint already trained for this recipe, or None (missing, or from another recipe)."""
    card = read_card(folder) if folder.exists() else {}
    return card if card.get("recipe_hash") == digest else None


def _train_checkpoint(recipe: ZooRecipe, root: Path, base_index: int, expert_index: int | None) -> dict[str, Any]:
    """Train and save one checkpoint (the base when ``expert_index`` is None) unless it is finished; its card.

    The unit of a build: resumable one checkpoint at a time, and what a worker process runs."""
    digest, tokenizer, tasks = recipe.digest(), build_tokenizer(), list(recipe.tasks)
    base_dir = _unit_folder(root, recipe, base_index, None)
    if expert_index is None:
        folder, card = base_dir, _finished_card(base_dir, digest)
        if card is not None:
            return card
        model, info = train_base(recipe, base_index, tokenizer)
        card = {"role": "base", "base": None, "tasks": [], "recipe": info}
    else:
        _, task, style, seed = _expert_names(recipe, base_index)[expert_index]
        folder = _unit_folder(root, recipe, base_index, expert_index)
        card = _finished_card(folder, digest)
        if card is not None:
            return card
        with quiet_transformers():
            base_model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        model, info = train_expert(base_model, recipe, task, style, seed, tokenizer)
        card = {"role": "expert", "base": base_dir.name, "tasks": [task], "recipe": info}
    detail = synthetic_detail(model, tokenizer, tasks, recipe.eval_n)
    card["scores"] = {t: float(exact.mean()) for t, (exact, _) in detail.items()}
    card["char_scores"] = {t: float(chars.mean()) for t, (_, chars) in detail.items()}
    card.update(recipe_hash=digest, catalogue_tasks=tasks)
    save_pretrained_atomic(model, tokenizer, folder, card, force=True)
    return card


def _one_thread() -> None:
    torch.set_num_threads(1)


def _units(recipe: ZooRecipe) -> list[Unit]:
    """Every checkpoint of the build as (base index, expert index or None for the base), bases first."""
    return ([(b, None) for b in range(recipe.n_bases)]
            + [(b, j) for b in range(recipe.n_bases) for j in range(len(recipe.experts))])


def _unit_folder(root: Path, recipe: ZooRecipe, base_index: int, expert_index: int | None) -> Path:
    if expert_index is None:
        return root / f"base{base_index}"
    return root / "experts" / _expert_names(recipe, base_index)[expert_index][0]


def _unit_name(recipe: ZooRecipe, b: int, j: int | None) -> str:
    return f"base{b}" if j is None else _expert_names(recipe, b)[j][0]


def _cached(recipe: ZooRecipe, root: Path, force: bool) -> Catalogue | None:
    """The cached catalogue when it matches the recipe (and ``force`` is off); else None, after clearing a cache of
    another recipe (or every cache with ``force``) and creating ``root``."""
    digest, file = recipe.digest(), root / CATALOGUE_FILE
    if file.exists() and not force:
        cached = Catalogue.load(file)
        if cached.recipe_hash == digest:
            return cached
    if root.exists() and (force or (file.exists() and Catalogue.load(file).recipe_hash != digest)):
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    return None


def _train_in_workers(recipe: ZooRecipe, root: Path, workers: int, bar: Any) -> dict[Unit, dict[str, Any]]:
    """Every checkpoint's card, trained in ``workers`` processes (one torch thread each); an expert is submitted
    when its base is done. Fewer bases than workers: a lone base would train on one core while the others idle, so
    the bases train here, on every thread (the weights do not depend on the thread count: tests/test_zoo.py checks
    it)."""
    cards: dict[Unit, dict[str, Any]] = {}
    early = recipe.n_bases < workers
    for b in range(recipe.n_bases) if early else []:
        bar.set_postfix_str(f"base{b}")
        cards[(b, None)] = _train_checkpoint(recipe, root, b, None)
        bar.update()
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method), initializer=_one_thread) as pool:
        first = [(b, k) for b in range(recipe.n_bases) for k in range(len(recipe.experts))] if early else [
            (b, None) for b in range(recipe.n_bases)]
        futures = {pool.submit(_train_checkpoint, recipe, root, b, j): (b, j) for b, j in first}
        while futures:
            done = next(as_completed(futures))
            b, j = futures.pop(done)
            cards[(b, j)] = done.result()
            bar.set_postfix_str(_unit_name(recipe, b, j))
            bar.update()
            if j is None:
                futures.update({pool.submit(_train_checkpoint, recipe, root, b, k): (b, k)
                                for k in range(len(recipe.experts))})
    return cards


def _train_here(recipe: ZooRecipe, root: Path, bar: Any) -> dict[Unit, dict[str, Any]]:
    """Every checkpoint's card, trained one after the other in this process."""
    cards: dict[Unit, dict[str, Any]] = {}
    for b, j in _units(recipe):
        bar.set_postfix_str(_unit_name(recipe, b, j))
        cards[(b, j)] = _train_checkpoint(recipe, root, b, j)
        bar.update()
    return cards


def _catalogue_of(recipe: ZooRecipe, root: Path, cards: dict[Unit, dict[str, Any]], build: dict[str, Any]
                  ) -> Catalogue:
    """The catalogue listing every checkpoint (bases, each followed by its experts) with its card's recipe and
    scores."""
    models: list[ModelEntry] = []
    for b in range(recipe.n_bases):
        base_name, card = f"base{b}", cards[(b, None)]
        models.append(ModelEntry(base_name, base_name, "base", None, [], card["recipe"], card["scores"]))
        for j, (name, task, _, _) in enumerate(_expert_names(recipe, b)):
            card = cards[(b, j)]
            models.append(ModelEntry(name, f"experts/{name}", "expert", base_name, [task], card["recipe"],
                                     card["scores"]))
    return Catalogue(root=root, name=recipe.name, tasks=list(recipe.tasks), models=models,
                     recipe=dataclasses.asdict(recipe), recipe_hash=recipe.digest(), build=build)


def _build_catalogue_locked(recipe: ZooRecipe, root: Path, force: bool, progress: bool, workers: int = 1
                            ) -> Catalogue:
    cached = _cached(recipe, root, force)
    if cached is not None:
        return cached
    start = time.perf_counter()
    units = _units(recipe)
    resumed = any(_finished_card(_unit_folder(root, recipe, b, j), recipe.digest()) is not None for b, j in units)
    bar = tqdm(total=len(units), desc=f"zoo[{recipe.name}]", disable=not progress, mininterval=1.0, unit="model")
    cards = _train_in_workers(recipe, root, workers, bar) if workers > 1 else _train_here(recipe, root, bar)
    bar.close()
    build = {"seconds": round(time.perf_counter() - start, 1), "workers": workers, "resumed": resumed}
    catalogue = _catalogue_of(recipe, root, cards, build)
    catalogue.save()
    return catalogue
