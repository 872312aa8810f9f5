"""Chapter 00 — the model catalogue: real Llama checkpoints the kit trains itself, offline, on synthetic tasks.

The catalogue is built to behave like real fine-tunes of one capable base (the world SimMerge predicts in): task
vectors are small moves of a base that already holds part of every skill, so merges of two experts keep most of both
skills, and experts differ in *how* they moved, so which merge works best differs from pair to pair.

Recipe (one :class:`ZooRecipe` per profile):

1. *Bases* — ``n_bases`` Llama models with different seeds, pre-trained briefly on **true answers** of a weighted
   task mixture plus an auxiliary copy task (:class:`BaseRecipe`). Pre-training stops after the first chunk of steps
   whose mean dev exact match reaches ``target``, so a base holds part of each skill, not all of it.
   Why: a skill the base lacks entirely lives wholly in one task vector and never survives a merge; stronger bases
   merge better (Yadav et al. 2024, "What matters for model merging at scale"; "Will it merge?", 2026).
2. *Experts* — per base and task, fine-tuned to ``min_dev_score`` on that task's dev split with small updates:
   each batch mixes task examples with *replay* of the base's own pre-training mixture, at a learning rate well
   below the base's. Their :class:`ExpertStyle` varies on purpose — learning rate, replay share, which parameters
   train (all, MLP only, attention only, upper or lower half), and extra steps past the threshold — so that task
   vectors differ in size, placement and overlap, and the best merge operator depends on the pair.
3. Every checkpoint is a Hugging Face folder (config, safetensors, tokenizer, ``simmerge_card.json`` with base,
   tasks, recipe and scores), listed in ``catalogue.json``.

The catalogue is cached under ``build/zoo/<profile>/`` keyed by the recipe's hash; an interrupted build resumes
checkpoint by checkpoint; a changed recipe rebuilds. Checkpoints train in parallel worker processes (one torch
thread each): at these sizes a step is a few milliseconds of arithmetic, so several single-threaded models beat one
multi-threaded model.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from .catalogue import CATALOGUE_FILE, Catalogue, ModelEntry
from .checkpoint import quiet_transformers, read_card, save_pretrained_atomic
from .evaluate import encode_batch, synthetic_detail
from .paths import build_path
from .tasks import AUXILIARY_TASKS, TASKS, get_task, max_sequence_length
from .tokenizer import build_tokenizer

#: Bump when training code changes in a way that changes checkpoints, so caches rebuild.
ZOO_FORMAT = 2

#: What an expert may train (substring filters on parameter names, see :func:`trainable_filter`).
TRAINABLE = ("all", "mlp", "attn", "upper", "lower")

__all__ = ["BaseRecipe", "ExpertStyle", "ModelSize", "ZooRecipe", "base_skill_ratio", "build_catalogue",
           "build_transfer_catalogue", "catalogue_dir", "encode_batch", "recipe_for_profile", "task_vector_stats",
           "transfer_recipe"]


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256

    def config(self, vocab_size: int, tokenizer: Any) -> LlamaConfig:
        return LlamaConfig(vocab_size=vocab_size, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=max_sequence_length() + 8,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, rope_theta=10000.0)

    def parameters(self, vocab_size: int) -> int:
        """Parameter count of the Llama this size describes (embeddings and head untied)."""
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        layer = attn + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * layer + 2 * vocab_size * self.hidden + self.hidden


@dataclass(frozen=True)
class BaseRecipe:
    """Pre-training of a base: true answers on a weighted task mixture, stopped while skills are still partial.

    Each example is the auxiliary copy task with probability ``copy_share``, else a catalogue task drawn with
    probability proportional to its weight (``weights`` lists the tasks whose weight is not 1). Training runs in
    chunks of ``chunk`` steps; after each chunk a copy is *annealed* (``anneal_steps`` more steps with the learning
    rate falling linearly to 0) and scored on the dev split; the first annealed copy whose mean exact match over the
    catalogue's tasks reaches ``target`` is the base (or the one after ``max_steps``).
    Why anneal: a base stopped at a high learning rate sits in a noisy spot of the loss, and any low-rate
    fine-tune would first collect that free gain on *every* task; released bases are annealed too."""

    lr: float = 3e-3
    batch_size: int = 64
    copy_share: float = 0.3
    # reverse and sort are the slowest skills to pick up, max and min the fastest: weighted so that the base holds
    # a comparable share of each (DESIGN.md, field notes)
    weights: tuple[tuple[str, float], ...] = (("reverse", 2.0), ("sort", 1.5), ("max", 0.15), ("min", 0.15))
    chunk: int = 50
    target: float = 0.4
    anneal_steps: int = 30
    max_steps: int = 2000
    dev_n: int = 64

    def weight(self, task: str) -> float:
        return dict(self.weights).get(task, 1.0)


@dataclass(frozen=True)
class ExpertStyle:
    """How an expert moves away from its base. Each batch holds ``replay`` x batch examples of the base's own
    pre-training mixture and the rest from the expert's task; only parameters selected by ``trains`` (a key of
    :data:`TRAINABLE`) move. Training stops ``extra_steps`` after the dev score first reaches the catalogue's
    ``min_dev_score`` (checked every ``chunk`` steps), or at ``max_steps``."""

    name: str
    trains: str = "all"
    lr: float = 1e-3
    replay: float = 0.5
    replay_target: str = "answers"
    extra_steps: int = 0
    fallback_steps: int = 300
    max_steps: int = 1200


#: The styles of the kit's catalogues. *gentle*: a small full fine-tune that distils the base on its replay (its
#: task vector moves little beyond the task: task arithmetic adds such vectors almost for free). *mlp* / *attn*: the
#: same, confined to one kind of tensor (vectors that barely overlap). *broad*: a larger full fine-tune that replays
#: the base's mixture with its true answers and trains on past the threshold: it also improves the other tasks a
#: little, so two broad experts share a direction that task arithmetic counts twice and TIES / linear do not. Every
#: style replays: without replay, experts forget the other skills and merges collapse (DESIGN.md, field notes).
STYLES: tuple[ExpertStyle, ...] = (
    ExpertStyle("gentle", "all", lr=5e-4, replay=1 / 3, replay_target="base"),
    ExpertStyle("mlp", "mlp", lr=1e-3, replay=1 / 3, replay_target="base"),
    ExpertStyle("attn", "attn", lr=1e-3, replay=1 / 3, replay_target="base"),
    ExpertStyle("broad", "all", lr=1e-3, replay=1 / 3, replay_target="answers", extra_steps=150),
)


@dataclass(frozen=True)
class ZooRecipe:
    """Everything that determines the catalogue; its hash keys the cache.

    ``experts`` lists, per base, (task, style name) with styles from ``styles``; two experts of one task on one base
    are *siblings* (held out together in chapter 04). ``rotate_styles`` shifts every style but the first by one
    place per base (base 1 trains with ``attn`` what base 0 trains with ``mlp``, and so on), so the two bases pair
    tasks and styles differently."""

    name: str
    size: ModelSize
    tasks: tuple[str, ...]
    experts: tuple[tuple[str, str], ...] = ()
    styles: tuple[ExpertStyle, ...] = STYLES
    n_bases: int = 2
    base: BaseRecipe = BaseRecipe()
    batch_size: int = 48
    chunk: int = 50
    min_dev_score: float = 0.95
    eval_n: int = 200
    rotate_styles: bool = False
    seed: int = 0
    format_version: int = ZOO_FORMAT

    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def style(self, name: str) -> ExpertStyle:
        for style in self.styles:
            if style.name == name:
                return style
        raise ValueError(f"recipe {self.name!r}: unknown expert style {name!r}; it defines "
                         f"{', '.join(s.name for s in self.styles)}")

    def expert_plan(self, base_index: int) -> list[tuple[str, ExpertStyle, int]]:
        """(task, style, seed) of each expert of a base, in catalogue order."""
        names = [s.name for s in self.styles]
        out = []
        for i, (task, style) in enumerate(self.experts):
            if self.rotate_styles and style != names[0]:
                restricted = names[1:]
                style = restricted[(restricted.index(style) + base_index) % len(restricted)]
            out.append((task, self.style(style), self.seed + 1000 * (base_index + 1) + i))
        return out


def _sibling_experts(tasks: Sequence[str], first: Sequence[str], second: Sequence[str]
                     ) -> tuple[tuple[str, str], ...]:
    """Two siblings per task: the first takes ``first`` cyclically over the tasks, the second ``second``."""
    return tuple([(t, first[i % len(first)]) for i, t in enumerate(tasks)]
                 + [(t, second[i % len(second)]) for i, t in enumerate(tasks)])


#: Sibling styles of the kit's catalogues: every task has a gentle or broad expert and one of another style.
_FIRST, _SECOND = ("gentle", "broad"), ("mlp", "attn", "broad", "gentle")


def recipe_for_profile(profile: str) -> ZooRecipe:
    """The catalogue recipe of a profile: ``smoke`` (CI), ``default`` (the laptop course), ``full`` (a GPU),
    ``transfer`` (chapter 04's larger catalogue, :func:`transfer_recipe`)."""
    all_tasks = tuple(TASKS)
    if profile == "smoke":
        tasks = ("rotate", "double", "shift", "dedup")  # the four skills the experts learn fastest: CI-sized
        return ZooRecipe(name="smoke", size=ModelSize(hidden=48, layers=2, heads=4, kv_heads=2, intermediate=96),
                         tasks=tasks, experts=_sibling_experts(tasks, _FIRST, _SECOND), eval_n=64)
    if profile == "default":
        return ZooRecipe(name="default", size=ModelSize(), tasks=all_tasks,
                         experts=_sibling_experts(all_tasks, _FIRST, _SECOND), rotate_styles=True, eval_n=400)
    if profile == "full":
        return ZooRecipe(name="full", size=ModelSize(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=512),
                         tasks=all_tasks, n_bases=3, experts=_sibling_experts(all_tasks, _FIRST, _SECOND),
                         rotate_styles=True, eval_n=512)
    if profile == "transfer":
        return transfer_recipe("default")
    raise ValueError(f"unknown profile {profile!r}; expected smoke, default, full or transfer")


def transfer_recipe(profile: str) -> ZooRecipe:
    """Chapter 04's transfer catalogue for a profile: at least 4x the parameters of that profile's catalogue (twice
    the width, 2.25x the MLP: embeddings only double), other seeds, the same tasks and expert styles (so a predictor
    can be applied without retraining)."""
    small = recipe_for_profile(profile)
    size = dataclasses.replace(small.size, hidden=2 * small.size.hidden, intermediate=9 * small.size.intermediate // 4,
                               heads=2 * small.size.heads, kv_heads=2 * small.size.kv_heads)
    # One base and the skills every style learns in a few hundred steps, with their siblings: at four times the cost
    # of a step, the build stays within a few minutes on a laptop. (reverse and sort take the larger models over a
    # thousand steps.) The predictor names no task, so it meets these like any other.
    tasks = tuple(t for t in small.tasks if t not in ("reverse", "sort")) or small.tasks
    # Seeds no other catalogue uses. (The first builds of this recipe, at seed + 7 and + 11 with two bases and every
    # task, were scored by predictors whose design changed afterwards: a changed design meets a catalogue it has
    # never seen.)
    return dataclasses.replace(small, name=f"transfer-{profile}", size=size, tasks=tasks, n_bases=1,
                               experts=_sibling_experts(tasks, _FIRST, _SECOND), seed=small.seed + 13)


# --- training ------------------------------------------------------------------------------------------------------


def trainable_filter(trains: str, layers: int) -> Callable[[str], bool]:
    """Which parameters an expert style trains: ``all``, ``mlp``, ``attn``, or the ``upper`` / ``lower`` half of
    the layers (the upper half with the final norm and head, the lower half with the embeddings)."""
    half = layers // 2
    if trains == "all":
        return lambda name: True
    if trains == "mlp":
        return lambda name: ".mlp." in name
    if trains == "attn":
        return lambda name: ".self_attn." in name
    if trains in ("upper", "lower"):
        def in_half(name: str) -> bool:
            if ".layers." in name:
                index = int(name.split(".layers.")[1].split(".")[0])
                return index >= half if trains == "upper" else index < half
            return ("lm_head" in name or name.startswith("model.norm")) if trains == "upper" else "embed" in name
        return in_half
    raise ValueError(f"unknown trainable part {trains!r}; expected one of {TRAINABLE}")


class Trainer:
    """AdamW (no weight decay) on the parameters ``trainable`` selects, linear warm-up over ``warmup`` steps,
    gradient clipping at 1; kept across calls of :meth:`run`, so training can stop and continue chunk by chunk."""

    def __init__(self, model: LlamaForCausalLM, lr: float, trainable: Callable[[str], bool] = lambda name: True,
                 warmup: int = 20, loss: Callable[[LlamaForCausalLM, dict], torch.Tensor] | None = None) -> None:
        self.model, self.lr, self.warmup = model, lr, warmup
        self.loss = loss or (lambda m, batch: m(**batch).loss)
        self.params = []
        for name, p in model.named_parameters():
            p.requires_grad_(trainable(name))
            if p.requires_grad:
                self.params.append(p)
        if not self.params:
            raise ValueError("no parameter selected for training")
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.steps = 0

    def run(self, batches: Iterator[dict[str, torch.Tensor]], steps: int, decay: bool = False) -> list[float]:
        """``steps`` optimizer steps; with ``decay`` the learning rate falls linearly to 0 over them (annealing)."""
        self.model.train()
        losses = []
        for i in range(steps):
            scale = min(1.0, (self.steps + 1) / self.warmup) * ((1 - i / steps) if decay else 1.0)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * scale
            loss = self.loss(self.model, next(batches))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().item())
            self.steps += 1
        self.model.eval()
        return losses


def _mixture_batches(tasks: Sequence[str], recipe: BaseRecipe, tokenizer: Any, size: int, seed: int,
                     extra: Iterator[Any] | None = None, extra_count: int = 0) -> Iterator[dict]:
    """Batches of the base's pre-training mixture (true answers, loss on the answer); with ``extra``,
    ``extra_count`` examples of each batch come from that stream instead (an expert's task)."""
    rng = random.Random(seed)
    streams = {t: get_task(t).train_stream(seed) for t in [*tasks, *AUXILIARY_TASKS]}
    names = list(tasks)
    weights = [recipe.weight(t) for t in names]
    copy_task = next(iter(AUXILIARY_TASKS))
    while True:
        examples = [next(extra) for _ in range(extra_count)] if extra is not None else []
        for _ in range(size - len(examples)):
            task = copy_task if rng.random() < recipe.copy_share else rng.choices(names, weights)[0]
            examples.append(next(streams[task]))
        yield encode_batch(examples, tokenizer, answer_only=True)


def _distillation_loss(teacher: LlamaForCausalLM, n_task: int) -> Callable[[LlamaForCausalLM, dict], torch.Tensor]:
    """Loss of a batch whose first ``n_task`` rows are task examples and the rest replay: cross-entropy on the task
    rows' answers, KL(p_teacher || p_model) on the replay rows' answer positions (teacher-forced on the true answer),
    averaged over all scored positions. The replay then holds the base's behaviour instead of teaching it more."""
    import torch.nn.functional as F

    def loss(model: LlamaForCausalLM, batch: dict) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        target = batch["labels"][:, 1:]
        scored = target != -100
        task_rows, replay_rows = scored[:n_task], scored[n_task:]
        ce = F.cross_entropy(logits[:n_task][task_rows], target[:n_task][task_rows], reduction="sum")
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"][n_task:],
                                     attention_mask=batch["attention_mask"][n_task:]).logits[:, :-1]
        kl = F.kl_div(F.log_softmax(logits[n_task:][replay_rows], -1), F.log_softmax(teacher_logits[replay_rows], -1),
                      log_target=True, reduction="sum")
        return (ce + kl) / scored.sum()

    return loss


def dev_scores(model: LlamaForCausalLM, tokenizer: Any, tasks: Sequence[str], n: int) -> dict[str, float]:
    """Exact match on the first ``n`` examples of each task's dev split (what stops training)."""
    return {t: float(exact.mean()) for t, (exact, _) in synthetic_detail(model, tokenizer, tasks, n, "dev").items()}


def train_base(recipe: ZooRecipe, index: int, tokenizer: Any) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    seed = recipe.seed + index
    torch.manual_seed(seed)
    model = LlamaForCausalLM(recipe.size.config(len(tokenizer), tokenizer))
    plan = recipe.base
    start = time.perf_counter()
    trainer = Trainer(model, plan.lr)
    batches = _mixture_batches(recipe.tasks, plan, tokenizer, plan.batch_size, seed)
    while True:
        trainer.run(batches, plan.chunk)
        if trainer.steps < plan.max_steps and np.mean(list(dev_scores(model, tokenizer, recipe.tasks,
                                                                      plan.dev_n).values())) < plan.target / 4:
            continue  # too early for an annealed copy to reach the target: skip the (costly) check
        annealed = copy.deepcopy(trainer)  # the model, its optimizer state and step count, together
        anneal_batches = _mixture_batches(recipe.tasks, plan, tokenizer, plan.batch_size, seed + 7919 * trainer.steps)
        losses = annealed.run(anneal_batches, plan.anneal_steps, decay=True)
        dev = dev_scores(annealed.model, tokenizer, recipe.tasks, plan.dev_n)
        if np.mean(list(dev.values())) >= plan.target or trainer.steps >= plan.max_steps:
            break
    info = {"seed": seed, "steps_trained": trainer.steps, "anneal_steps": plan.anneal_steps, "lr": plan.lr,
            "final_loss": losses[-1], "dev_scores": dev, "train_seconds": round(time.perf_counter() - start, 2)}
    return annealed.model, info


def train_expert(base: LlamaForCausalLM, recipe: ZooRecipe, task: str, style: ExpertStyle, seed: int,
                 tokenizer: Any) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    n_task = recipe.batch_size - round(style.replay * recipe.batch_size)
    loss = None
    if style.replay_target == "base":
        loss = _distillation_loss(base.eval(), n_task)
    elif style.replay_target != "answers":
        raise ValueError(f"expert style {style.name!r}: replay_target must be 'answers' or 'base'")
    trainer = Trainer(model, style.lr, trainable_filter(style.trains, recipe.size.layers), loss=loss)
    batches = _mixture_batches(recipe.tasks, recipe.base, tokenizer, recipe.batch_size, seed,
                               extra=get_task(task).train_stream(seed), extra_count=n_task)
    start, dev, reached, fell_back = time.perf_counter(), 0.0, None, False
    while trainer.steps < style.max_steps:
        if reached is not None and trainer.steps >= reached + style.extra_steps:
            break
        if reached is None and not fell_back and style.trains != "all" and trainer.steps >= style.fallback_steps:
            # A restricted style that cannot learn the task (e.g. MLP only on an attention task) would leave a weak
            # expert, and every merge with it would be noise: from here on all parameters train.
            steps, trainer = trainer.steps, Trainer(model, style.lr, loss=loss, warmup=1)
            trainer.steps, fell_back = steps, True
        trainer.run(batches, recipe.chunk)
        if reached is None:
            dev = dev_scores(model, tokenizer, [task], 128)[task]
            if dev >= recipe.min_dev_score:
                reached = trainer.steps
    info = {"task": task, "style": style.name, "trains": style.trains, "lr": style.lr, "replay": style.replay,
            "replay_target": style.replay_target, "seed": seed, "steps_trained": trainer.steps,
            "steps_to_threshold": reached, "dev_score": dev,
            "train_seconds": round(time.perf_counter() - start, 2)}
    return model, info


# --- building and caching ------------------------------------------------------------------------------------------


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


def _units(recipe: ZooRecipe) -> list[tuple[int, int | None]]:
    """Every checkpoint of the build as (base index, expert index or None for the base), bases first."""
    return ([(b, None) for b in range(recipe.n_bases)]
            + [(b, j) for b in range(recipe.n_bases) for j in range(len(recipe.experts))])


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
    start = time.perf_counter()
    units = _units(recipe)
    resumed = any(_finished_card(_unit_folder(root, recipe, b, j), digest) is not None for b, j in units)
    bar = tqdm(total=len(units), desc=f"zoo[{recipe.name}]", disable=not progress, mininterval=1.0, unit="model")
    cards: dict[tuple[int, int | None], dict[str, Any]] = {}
    if workers > 1:
        import multiprocessing as mp

        # Fewer bases than workers: a lone base would train on one core while the others idle, so the bases train
        # here, on every thread (the weights do not depend on the thread count: tests/test_zoo.py checks it).
        early = recipe.n_bases < workers
        for b, _ in units[:recipe.n_bases] if early else []:
            bar.set_postfix_str(f"base{b}")
            cards[(b, None)] = _train_checkpoint(recipe, root, b, None)
            bar.update()
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method),
                                 initializer=_one_thread) as pool:
            # An expert needs its base on disk: submit a base's experts when the base is done.
            first = [(b, k) for b in range(recipe.n_bases) for k in range(len(recipe.experts))] if early else [
                (b, None) for b in range(recipe.n_bases)]
            futures = {pool.submit(_train_checkpoint, recipe, root, b, j): (b, j) for b, j in first}
            while futures:
                done = next(as_completed(futures))
                b, j = futures.pop(done)
                cards[(b, j)] = done.result()
                bar.set_postfix_str(f"base{b}" if j is None else _expert_names(recipe, b)[j][0])
                bar.update()
                if j is None:
                    futures.update({pool.submit(_train_checkpoint, recipe, root, b, k): (b, k)
                                    for k in range(len(recipe.experts))})
    else:
        for b, j in units:
            bar.set_postfix_str(f"base{b}" if j is None else _expert_names(recipe, b)[j][0])
            cards[(b, j)] = _train_checkpoint(recipe, root, b, j)
            bar.update()
    bar.close()
    models: list[ModelEntry] = []
    for b in range(recipe.n_bases):
        base_name, card = f"base{b}", cards[(b, None)]
        models.append(ModelEntry(base_name, base_name, "base", None, [], card["recipe"], card["scores"]))
        for j, (name, task, _, _) in enumerate(_expert_names(recipe, b)):
            card = cards[(b, j)]
            models.append(ModelEntry(name, f"experts/{name}", "expert", base_name, [task], card["recipe"],
                                     card["scores"]))
    build = {"seconds": round(time.perf_counter() - start, 1), "workers": workers, "resumed": resumed}
    catalogue = Catalogue(root=root, name=recipe.name, tasks=list(recipe.tasks), models=models,
                          recipe=dataclasses.asdict(recipe), recipe_hash=digest, build=build)
    catalogue.save()
    return catalogue


def _unit_folder(root: Path, recipe: ZooRecipe, base_index: int, expert_index: int | None) -> Path:
    if expert_index is None:
        return root / f"base{base_index}"
    return root / "experts" / _expert_names(recipe, base_index)[expert_index][0]


def base_skill_ratio(catalogue: Catalogue) -> float:
    """How much of each skill the bases already hold: the mean over bases and tasks of
    score(base, t) / mean score of that base's experts of t on t (DESIGN.md: 0.2-0.7 makes merges realistic)."""
    ratios = []
    for base in catalogue.bases():
        for task in catalogue.tasks:
            own = [e.scores[task] for e in catalogue.experts(base.name) if task in e.tasks and task in e.scores]
            if own and np.mean(own) > 0 and task in base.scores:
                ratios.append(base.scores[task] / float(np.mean(own)))
    return float(np.mean(ratios)) if ratios else float("nan")


def task_vector_stats(catalogue: Catalogue) -> tuple[Any, Any]:
    """Norms of every expert's task vector and the pairwise cosine matrix (experts × experts, NaN across bases).

    ``||tau||_2`` with tau = theta_expert - theta_base over all tensors, and the relative size ``||tau|| / ||theta_base||``;
    cos(a, b) = <tau_a, tau_b> / (||tau_a|| ||tau_b||) for experts of the same base."""
    import pandas as pd

    from .checkpoint import load_state_dict

    vectors: dict[str, torch.Tensor] = {}
    base_norms: dict[str, float] = {}
    bases = {b.name: load_state_dict(catalogue.path(b.name)) for b in catalogue.bases()}
    for name, state in bases.items():
        base_norms[name] = float(torch.cat([v.float().flatten() for v in state.values()]).norm())
    for e in catalogue.experts():
        sd = load_state_dict(catalogue.path(e.name))
        base = bases[e.base or ""]
        vectors[e.name] = torch.cat([(sd[k].float() - base[k].float()).flatten() for k in sorted(sd)])
    names = list(vectors)
    norms = pd.DataFrame({"expert": names, "base": [catalogue.entry(n).base for n in names],
                          "task": [catalogue.entry(n).tasks[0] for n in names],
                          "style": [catalogue.entry(n).recipe.get("style") for n in names],
                          "tv_norm": [float(vectors[n].norm()) for n in names]})
    norms["relative_norm"] = norms.tv_norm / norms.base.map(base_norms)
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
                   help="'transfer' is chapter 04's larger catalogue (the default recipe at 4x the parameters)")
    p.add_argument("--out", help="catalogue folder (default build/zoo/<profile>)")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    p.add_argument("--workers", type=int, default=None,
                   help="checkpoints trained at once, one process and one torch thread each (default: one per core)")
    p.set_defaults(func=_cmd_zoo)
