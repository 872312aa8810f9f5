"""Training the catalogue's checkpoints: a base pre-trained on a weighted task mixture (annealed copies checked
against the target after each chunk) and experts fine-tuned from it with replay of that mixture."""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from ..checkpoint import layer_index
from ..evaluate import encode_batch, synthetic_detail
from ..tasks import AUXILIARY_TASKS, get_task
from .recipes import TRAINABLE, BaseRecipe, ExpertStyle, ZooRecipe


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
            index = layer_index(name)
            if index is not None:
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
