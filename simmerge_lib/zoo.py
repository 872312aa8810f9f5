"""Chapter 00 — the model catalogue: real Llama checkpoints the kit trains itself, offline, on synthetic tasks.

Recipe (one :class:`ZooRecipe` per profile):

1. *Bases* — ``n_bases`` Llama models with different seeds, pre-trained on the task mixture with *format-only*
   answers (right alphabet and length, wrong content; see :mod:`simmerge_lib.tasks`). A base knows every prompt
   format and no skill, so each skill lives in an expert's task vector tau = theta_expert - theta_base.
2. *Experts* — per base and task, fine-tuned on that task's true answers (loss on the answer only). Recipes vary on
   purpose — steps, learning rate, and which parameters train (all, MLP only, attention only, upper or lower
   half) — so that task vectors differ in size and overlap, and which merge operator wins depends on the pair.
   Training continues in extra rounds until the expert reaches ``min_dev_score`` on the dev split (or
   ``max_rounds``): recipes should change the task vector, not whether the expert learned.
3. Every checkpoint is a Hugging Face folder (config, safetensors, tokenizer, ``simmerge_card.json`` with base,
   tasks, recipe and scores), listed in ``catalogue.json``.

The catalogue is cached under ``build/zoo/<profile>/`` keyed by the recipe's hash; an interrupted build resumes
checkpoint by checkpoint; a changed recipe rebuilds.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from .catalogue import CATALOGUE_FILE, Catalogue, ModelEntry
from .checkpoint import read_card, save_pretrained_atomic
from .evaluate import synthetic_evaluator
from .paths import build_path
from .tasks import AUXILIARY_TASKS, TASKS, Example, get_task, max_sequence_length
from .tokenizer import build_tokenizer

#: Bump when training code changes in a way that changes checkpoints, so caches rebuild.
ZOO_FORMAT = 1

#: What each expert variant trains (substring filters on parameter names; ``None`` = everything).
TRAINABLE = ("all", "mlp", "attn", "upper", "lower")


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128

    def config(self, vocab_size: int, tokenizer: Any) -> LlamaConfig:
        return LlamaConfig(vocab_size=vocab_size, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=max_sequence_length() + 8,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, rope_theta=10000.0)


@dataclass(frozen=True)
class ExpertRecipe:
    task: str
    variant: str  # a key of TRAINABLE
    steps: int
    lr: float
    seed: int


@dataclass(frozen=True)
class ZooRecipe:
    """Everything that determines the catalogue; its hash keys the cache."""

    name: str
    size: ModelSize
    tasks: tuple[str, ...]
    n_bases: int = 2
    base_steps: int = 800
    base_lr: float = 3e-3
    batch_size: int = 64
    #: Per-base expert list as (task, variant, steps, lr); the seed is derived from base and position.
    experts: tuple[tuple[str, str, int, float], ...] = ()
    min_dev_score: float = 0.95
    max_rounds: int = 6
    eval_n: int = 100
    seed: int = 0
    format_version: int = ZOO_FORMAT

    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def expert_recipes(self, base_index: int) -> list[ExpertRecipe]:
        return [ExpertRecipe(task, variant, steps, lr, seed=self.seed + 1000 * (base_index + 1) + i)
                for i, (task, variant, steps, lr) in enumerate(self.experts)]


def _varied_experts(tasks: Sequence[str], variants: Sequence[tuple[str, int, float]],
                    extra: Sequence[str] = ()) -> tuple[tuple[str, str, int, float], ...]:
    """One expert per task, cycling through ``variants``; a second, differently trained expert for ``extra`` tasks."""
    out = [(t, *variants[i % len(variants)]) for i, t in enumerate(tasks)]
    out += [(t, *variants[(i + 2) % len(variants)]) for i, t in enumerate(extra)]
    return tuple(out)


_VARIANTS = (("all", 300, 5e-3), ("attn", 300, 5e-3), ("mlp", 300, 5e-3), ("all", 150, 8e-3),
             ("upper", 300, 5e-3), ("lower", 300, 5e-3))


def recipe_for_profile(profile: str) -> ZooRecipe:
    """The catalogue recipe of a profile: ``smoke`` (CI, < 2 min), ``default`` (laptop, < 10 min), ``full``."""
    all_tasks = tuple(TASKS)
    if profile == "smoke":
        tasks = ("reverse", "double", "max", "min")
        return ZooRecipe(name="smoke", size=ModelSize(hidden=48, layers=2, heads=4, kv_heads=2, intermediate=96),
                         tasks=tasks, base_steps=300, experts=_varied_experts(tasks, _VARIANTS[:4]),
                         eval_n=50, max_rounds=3)
    if profile == "default":
        return ZooRecipe(name="default", size=ModelSize(), tasks=all_tasks, base_steps=800,
                         experts=_varied_experts(all_tasks, _VARIANTS, extra=all_tasks[:4]))
    if profile == "full":
        return ZooRecipe(name="full", size=ModelSize(hidden=256, layers=6, heads=8, kv_heads=4, intermediate=688),
                         tasks=all_tasks, base_steps=3000, n_bases=3,
                         experts=_varied_experts(all_tasks, _VARIANTS, extra=all_tasks), eval_n=200)
    if profile == "transfer":
        return transfer_recipe("default")
    raise ValueError(f"unknown profile {profile!r}; expected smoke, default, full or transfer")


def transfer_recipe(profile: str) -> ZooRecipe:
    """Chapter 04's transfer catalogue for a profile: at least 4x the parameters of that profile's catalogue,
    other seeds, the same tasks and the same recipe shape (so a predictor can be applied without retraining)."""
    small = recipe_for_profile(profile)
    deeper = 1 if profile == "smoke" else 2  # smoke stays CI-sized: 2x width alone is 4x the parameters
    size = dataclasses.replace(small.size, hidden=2 * small.size.hidden, layers=deeper * small.size.layers,
                               intermediate=2 * small.size.intermediate, heads=2 * small.size.heads,
                               kv_heads=2 * small.size.kv_heads)
    return dataclasses.replace(small, name=f"transfer-{profile}", size=size, seed=small.seed + 7)


# --- training ------------------------------------------------------------------------------------------------------


def encode_batch(examples: Sequence[Example], tokenizer: Any, answer_only: bool,
                 answers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``<bos> prompt answer <eos>`` ids, with labels on the answer (+ prompt unless answer_only)."""
    vocab = tokenizer.get_vocab()
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows, masks = [], []
    for i, ex in enumerate(examples):
        answer = ex.answer if answers is None else answers[i]
        prompt_ids = [bos] + [vocab[c] for c in ex.prompt]
        answer_ids = [vocab[c] for c in answer] + [eos]
        rows.append(prompt_ids + answer_ids)
        masks.append([not answer_only and j > 0 for j in range(len(prompt_ids))] + [True] * len(answer_ids))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, mask) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        labels[i, : len(row)] = torch.where(torch.tensor(mask), torch.tensor(row), torch.tensor(-100))
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def _trainable_filter(variant: str, layers: int) -> Callable[[str], bool]:
    half = layers // 2
    if variant == "all":
        return lambda name: True
    if variant == "mlp":
        return lambda name: ".mlp." in name
    if variant == "attn":
        return lambda name: ".self_attn." in name
    if variant in ("upper", "lower"):
        def in_half(name: str) -> bool:
            if ".layers." in name:
                index = int(name.split(".layers.")[1].split(".")[0])
                return index >= half if variant == "upper" else index < half
            return ("lm_head" in name or name.startswith("model.norm")) if variant == "upper" else "embed" in name
        return in_half
    raise ValueError(f"unknown trainable variant {variant!r}; expected one of {TRAINABLE}")


def train_steps(model: LlamaForCausalLM, batches: Iterator[dict[str, torch.Tensor]], steps: int, lr: float,
                trainable: Callable[[str], bool] = lambda name: True, desc: str = "train",
                warmup: int = 20, progress: bool = False) -> list[float]:
    """AdamW on the parameters selected by ``trainable`` with linear warm-up; returns the loss curve."""
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name))
        if p.requires_grad:
            params.append(p)
    if not params:
        raise ValueError("no parameter selected for training")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc=desc, leave=False, mininterval=1.0, disable=not progress):
        loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return losses


def _format_batches(tasks: Sequence[str], tokenizer: Any, batch_size: int, seed: int,
                    auxiliary_share: float = 0.3) -> Iterator[dict]:
    """Pre-training batches: catalogue tasks with format-only answers, plus auxiliary tasks with true answers."""
    rng = random.Random(seed)
    mixture = list(tasks) + list(AUXILIARY_TASKS)
    streams = {t: get_task(t).train_stream(seed) for t in mixture}
    while True:
        examples = [next(streams[rng.choice(list(AUXILIARY_TASKS)) if rng.random() < auxiliary_share
                                 else rng.choice(tasks)]) for _ in range(batch_size)]
        fakes = [ex.answer if ex.task in AUXILIARY_TASKS else get_task(ex.task).format_answer(rng, ex.input)
                 for ex in examples]
        yield encode_batch(examples, tokenizer, answer_only=False, answers=fakes)


def _task_batches(task: str, tokenizer: Any, batch_size: int, seed: int) -> Iterator[dict]:
    stream = get_task(task).train_stream(seed)
    while True:
        yield encode_batch([next(stream) for _ in range(batch_size)], tokenizer, answer_only=True)


def train_base(recipe: ZooRecipe, index: int, tokenizer: Any) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    seed = recipe.seed + index
    torch.manual_seed(seed)
    model = LlamaForCausalLM(recipe.size.config(len(tokenizer), tokenizer))
    start = time.perf_counter()
    losses = train_steps(model, _format_batches(recipe.tasks, tokenizer, recipe.batch_size, seed),
                         recipe.base_steps, recipe.base_lr, desc=f"base{index}")
    info = {"seed": seed, "steps": recipe.base_steps, "lr": recipe.base_lr, "final_loss": losses[-1],
            "train_seconds": round(time.perf_counter() - start, 2)}
    return model, info


def train_expert(base: LlamaForCausalLM, recipe: ZooRecipe, expert: ExpertRecipe, tokenizer: Any,
                 name: str) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    import copy

    torch.manual_seed(expert.seed)
    model = copy.deepcopy(base)
    trainable = _trainable_filter(expert.variant, recipe.size.layers)
    batches = _task_batches(expert.task, tokenizer, recipe.batch_size, expert.seed)
    start, steps, dev, fell_back = time.perf_counter(), 0, 0.0, False
    for round_ in range(recipe.max_rounds):
        if (not fell_back and expert.variant != "all" and round_ >= max(1, recipe.max_rounds // 2)
                and dev < recipe.min_dev_score - 0.1):
            # A restricted variant that cannot learn the task (e.g. MLP-only on an attention task) would leave a
            # weak expert, and every merge with it would be noise: from here on all parameters train.
            trainable, fell_back = _trainable_filter("all", recipe.size.layers), True
        chunk = expert.steps if round_ == 0 else expert.steps // 2
        train_steps(model, batches, chunk, expert.lr, trainable, desc=name, warmup=20 if round_ == 0 else 1)
        steps += chunk
        dev = synthetic_evaluator(model, tokenizer, [expert.task], 128, split="dev")[expert.task]
        if dev >= recipe.min_dev_score:
            break
    info = {**dataclasses.asdict(expert), "steps_trained": steps, "dev_score": dev, "fell_back_to_all": fell_back,
            "train_seconds": round(time.perf_counter() - start, 2)}
    return model, info


# --- building and caching ------------------------------------------------------------------------------------------


def catalogue_dir(profile: str) -> Path:
    return build_path("zoo", profile)


def build_transfer_catalogue(profile: str = "default", progress: bool = True, workers: int = 1) -> Catalogue:
    """The larger, differently seeded catalogue of :func:`transfer_recipe`, cached in
    ``build/zoo/transfer-<profile>`` (``workers``: see :func:`build_catalogue`)."""
    recipe = transfer_recipe(profile)
    return build_catalogue(recipe.name, root=catalogue_dir(recipe.name), recipe=recipe, progress=progress,
                           workers=workers)


def build_catalogue(profile: str = "default", root: str | Path | None = None, force: bool = False,
                    recipe: ZooRecipe | None = None, progress: bool = True, workers: int = 1) -> Catalogue:
    """Build (or load from cache) the catalogue of a profile and return it.

    Cached in ``root`` (default ``build/zoo/<profile>``) keyed by the recipe hash: a matching cache is returned at
    once; a different recipe rebuilds; checkpoints already finished for this recipe are kept (resume).
    ``workers > 1`` trains that many checkpoints at once in separate processes (one torch thread each): the bases
    first, then every expert; on a machine with many cores this divides the build time by about ``workers``."""
    recipe = recipe or recipe_for_profile(profile)
    root = Path(root) if root else catalogue_dir(profile)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Two notebooks or commands asking for the same catalogue at once: the second waits and then reads the cache.
    with FileLock(str(root.parent / f".{root.name}.lock")):
        return _build_catalogue_locked(recipe, root, force, progress, workers)


def _expert_names(recipe: ZooRecipe, base_index: int) -> list[tuple[str, ExpertRecipe]]:
    """(name, recipe) of a base's experts: ``base0-sort``, and ``base0-sort-2`` for a second expert of a task."""
    seen: dict[str, int] = {}
    out = []
    for expert in recipe.expert_recipes(base_index):
        seen[expert.task] = seen.get(expert.task, 0) + 1
        out.append((f"base{base_index}-{expert.task}" + ("" if seen[expert.task] == 1 else f"-{seen[expert.task]}"),
                    expert))
    return out


def _finished_card(folder: Path, digest: str) -> dict[str, Any] | None:
    """The card of a checkpoint already trained for this recipe, or None (missing, or from another recipe)."""
    card = read_card(folder) if folder.exists() else {}
    return card if card.get("recipe_hash") == digest else None


def _train_checkpoint(recipe: ZooRecipe, root: Path, base_index: int, expert_index: int | None) -> dict[str, Any]:
    """Train and save one checkpoint (the base when ``expert_index`` is None) unless it is finished; its card.

    The unit of a build: resumable one checkpoint at a time, and what a worker process runs."""
    digest, tokenizer, tasks = recipe.digest(), build_tokenizer(), list(recipe.tasks)
    base_dir = root / f"base{base_index}"
    if expert_index is None:
        folder, card = base_dir, _finished_card(base_dir, digest)
        if card is not None:
            return card
        model, info = train_base(recipe, base_index, tokenizer)
        card = {"role": "base", "base": None, "tasks": [], "recipe": info}
    else:
        name, expert = _expert_names(recipe, base_index)[expert_index]
        folder = root / "experts" / name
        card = _finished_card(folder, digest)
        if card is not None:
            return card
        base_model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        model, info = train_expert(base_model, recipe, expert, tokenizer, name)
        card = {"role": "expert", "base": base_dir.name, "tasks": [expert.task], "recipe": info}
    card["scores"] = synthetic_evaluator(model, tokenizer, tasks, recipe.eval_n)
    card.update(recipe_hash=digest, catalogue_tasks=tasks)
    save_pretrained_atomic(model, tokenizer, folder, card, force=True)
    return card


def _one_thread() -> None:
    torch.set_num_threads(1)


def _build_catalogue_locked(recipe: ZooRecipe, root: Path, force: bool, progress: bool, workers: int = 1
                            ) -> Catalogue:
    digest = recipe.digest()
    file = root / CATALOGUE_FILE
    if file.exists() and not force:
        cached = Catalogue.load(file)
        if cached.recipe_hash == digest:
            return cached
    if root.exists() and (force or (file.exists() and Catalogue.load(file).recipe_hash != digest)):
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    n_experts = len(recipe.experts)
    bar = tqdm(total=recipe.n_bases * (1 + n_experts), desc=f"zoo[{recipe.name}]", disable=not progress,
               mininterval=2.0)
    units = [[(b, None) for b in range(recipe.n_bases)],
             [(b, j) for b in range(recipe.n_bases) for j in range(n_experts)]]  # experts need their base first
    cards: dict[tuple[int, int | None], dict[str, Any]] = {}
    if workers > 1:
        import multiprocessing as mp

        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method),
                                 initializer=_one_thread) as pool:
            for stage in units:
                futures = {pool.submit(_train_checkpoint, recipe, root, b, j): (b, j) for b, j in stage}
                for future in as_completed(futures):
                    cards[futures[future]] = future.result()
                    bar.update()
    else:
        for stage in units:
            for b, j in stage:
                bar.set_postfix_str(f"base{b}" if j is None else _expert_names(recipe, b)[j][0])
                cards[(b, j)] = _train_checkpoint(recipe, root, b, j)
                bar.update()
    bar.close()
    models: list[ModelEntry] = []
    for b in range(recipe.n_bases):
        base_name, card = f"base{b}", cards[(b, None)]
        models.append(ModelEntry(base_name, base_name, "base", None, [], card["recipe"], card["scores"]))
        for j, (name, expert) in enumerate(_expert_names(recipe, b)):
            card = cards[(b, j)]
            models.append(ModelEntry(name, f"experts/{name}", "expert", base_name, [expert.task], card["recipe"],
                                     card["scores"]))
    catalogue = Catalogue(root=root, name=recipe.name, tasks=list(recipe.tasks), models=models,
                          recipe=dataclasses.asdict(recipe), recipe_hash=digest)
    catalogue.save()
    return catalogue


def task_vector_stats(catalogue: Catalogue) -> tuple[Any, Any]:
    """Norms of every expert's task vector and the pairwise cosine matrix (experts × experts, NaN across bases).

    ``||tau||_2`` with tau = theta_expert - theta_base over all tensors; cos(a, b) = <tau_a, tau_b> /
    (||tau_a|| ||tau_b||) for experts of the same base."""
    import pandas as pd

    from .checkpoint import load_state_dict

    vectors: dict[str, torch.Tensor] = {}
    bases = {b.name: load_state_dict(catalogue.path(b.name)) for b in catalogue.bases()}
    for e in catalogue.experts():
        sd = load_state_dict(catalogue.path(e.name))
        base = bases[e.base or ""]
        vectors[e.name] = torch.cat([(sd[k].float() - base[k].float()).flatten() for k in sorted(sd)])
    names = list(vectors)
    norms = pd.DataFrame({"expert": names, "base": [catalogue.entry(n).base for n in names],
                          "task": [catalogue.entry(n).tasks[0] for n in names],
                          "variant": [catalogue.entry(n).recipe.get("variant") for n in names],
                          "tv_norm": [float(vectors[n].norm()) for n in names]})
    cos = pd.DataFrame(float("nan"), index=names, columns=names)
    for a in names:
        for b in names:
            if catalogue.entry(a).base == catalogue.entry(b).base:
                cos.loc[a, b] = float(torch.nn.functional.cosine_similarity(vectors[a], vectors[b], dim=0))
    return norms, cos


# --- CLI -----------------------------------------------------------------------------------------------------------


def _cmd_zoo(args: argparse.Namespace) -> int:
    if args.profile == "transfer" and args.out is None:  # the same cache as chapter 04's build_transfer_catalogue
        recipe = transfer_recipe("default")
        catalogue = build_catalogue(recipe.name, root=catalogue_dir(recipe.name), force=args.force, recipe=recipe,
                                    workers=args.workers)
    else:
        catalogue = build_catalogue(args.profile, root=args.out, force=args.force, workers=args.workers)
    frame = catalogue.scores_frame()
    table = frame.pivot_table(index="model", columns="task", values="score", sort=False)
    print(table.round(2).to_string())
    print(f"catalogue: {catalogue.root / CATALOGUE_FILE}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("zoo", help="build (or load from cache) the model catalogue of a profile")
    p.add_argument("--profile", default="default", choices=["smoke", "default", "full", "transfer"],
                   help="'transfer' is chapter 04's larger catalogue (default size x8 parameters)")
    p.add_argument("--out", help="catalogue folder (default build/zoo/<profile>)")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    p.add_argument("--workers", type=int, default=1,
                   help="checkpoints trained at once, one process and one torch thread each (default 1)")
    p.set_defaults(func=_cmd_zoo)
