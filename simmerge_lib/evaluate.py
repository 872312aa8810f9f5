"""Scoring a checkpoint: exact match of greedy answers, as a tidy DataFrame.

For the kit's synthetic tasks the score of a model on task t is

    score(t) = (1/n) * sum_i [ greedy_answer(prompt_i) == answer_i ]

over the first n examples of t's ``eval`` split. It is computed in **one teacher-forced forward pass** instead of a
decoding loop: greedy decoding reproduces ``answer + <eos>`` exactly iff, feeding the true prefix, the argmax of the
next-token distribution equals the true next token at every answer position (by induction over positions: while
every earlier token matched, the greedy prefix *is* the true prefix). So

    exact(i) = prod_{j in answer(i) + eos} [ argmax p(. | x_<j) == x_j ]

equals the greedy-decoding exact match (up to exact float ties in the argmax), and the per-character accuracy
``char(i) = mean_j [ argmax p(. | x_<j) == x_j ]`` comes for free as a softer secondary score (it shows partial
retention that exact match hides). :func:`greedy_answers` still decodes for display.

A user's own catalogue names its evaluator in ``catalogue.json`` (``"evaluator": "package.module:function"``); the
function is called as ``fn(model, tokenizer, tasks, n)`` and returns ``{task: score}``.
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .checkpoint import quiet_transformers, read_card
from .tasks import Example, get_task

Evaluator = Callable[[PreTrainedModel, Any, Sequence[str], int], Mapping[str, float]]


def load_model(path: str | os.PathLike[str], device: str = "cpu") -> tuple[PreTrainedModel, Any]:
    """Load a checkpoint folder with transformers (read-only) and put the model in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no config.json)")
    with quiet_transformers():  # the kit draws its own bars; one per checkpoint load is noise
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


@torch.inference_mode()
def greedy_answers(model: PreTrainedModel, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                   batch_size: int = 256) -> list[str]:
    """Greedy continuation of each prompt up to ``<eos>`` (left-padded batches), decoded without specials."""
    device = next(model.parameters()).device
    answers: list[str] = []
    tokenizer.padding_side = "left"
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True).to(device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def encode_batch(examples: Sequence[Example], tokenizer: Any, answer_only: bool,
                 answers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``<bos> prompt answer <eos>`` ids, with labels on the answer (+ prompt unless answer_only).

    Right padding keeps every real token at its true position, so no padding mask is needed for the causal
    attention of real tokens (pads only ever follow them)."""
    vocab = _vocab(tokenizer)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows, starts = [], []
    for i, ex in enumerate(examples):
        answer = ex.answer if answers is None else answers[i]
        prompt_ids = [bos] + [vocab[c] for c in ex.prompt]
        rows.append(prompt_ids + [vocab[c] for c in answer] + [eos])
        starts.append(len(prompt_ids) if answer_only else 1)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    position = torch.arange(width)
    attention = (position < lengths[:, None]).long()
    labelled = (position >= torch.tensor(starts)[:, None]) & attention.bool()
    labels = torch.where(labelled, ids, torch.tensor(-100))
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


_VOCABS: dict[int, dict[str, int]] = {}


def _vocab(tokenizer: Any) -> dict[str, int]:
    # get_vocab() builds a new dict on every call; encoding runs once per training step.
    key = id(tokenizer)
    if key not in _VOCABS:
        _VOCABS[key] = tokenizer.get_vocab()
    return _VOCABS[key]


@torch.inference_mode()
def answer_accuracy(model: PreTrainedModel, tokenizer: Any, examples: Sequence[Example],
                    batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Per example (in the order given): greedy exact match (bool) and per-character accuracy (float), by teacher
    forcing (see the module docstring); one forward pass per batch.

    Batches hold examples of similar length (a stable sort by characters), so little of a forward pass is spent on
    padding; with right padding and a causal mask a row's logits do not depend on the other rows of its batch."""
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt) + len(examples[i].answer))
    exact = np.zeros(len(examples), dtype=bool)
    chars = np.zeros(len(examples), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = encode_batch([examples[i] for i in rows], tokenizer, answer_only=True)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        target = batch["labels"][:, 1:].to(device)
        scored = target != -100
        right = (logits[:, :-1].argmax(-1) == target) & scored
        exact[rows] = ((right | ~scored).all(dim=1)).cpu().numpy()
        chars[rows] = (right.sum(1) / scored.sum(1)).float().cpu().numpy()
    return exact, chars


def task_examples(tasks: Sequence[str], n: int, split: str = "eval") -> list[Example]:
    """The first ``n`` examples of each task's fixed split, tasks in order."""
    return [ex for t in tasks for ex in get_task(t).split(split, n)]


def synthetic_detail(model: PreTrainedModel, tokenizer: Any, tasks: Sequence[str], n: int,
                     split: str = "eval") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task: per-example exact match and per-character accuracy on the first ``n`` examples of ``split``."""
    examples = task_examples(tasks, n, split)
    exact, chars = answer_accuracy(model, tokenizer, examples)
    # split() returns exactly n examples per task (it raises otherwise), in task order.
    return {t: (exact[i * n:(i + 1) * n], chars[i * n:(i + 1) * n]) for i, t in enumerate(tasks)}


def synthetic_evaluator(model: PreTrainedModel, tokenizer: Any, tasks: Sequence[str], n: int,
                        split: str = "eval") -> dict[str, float]:
    """Exact-match scores on the kit's synthetic tasks (teacher-forced, equal to greedy decoding's)."""
    return {t: float(exact.mean()) if len(exact) else 0.0
            for t, (exact, _) in synthetic_detail(model, tokenizer, tasks, n, split).items()}


def resolve_evaluator(spec: str | None) -> Evaluator:
    """``None`` → the kit's synthetic evaluator; ``"module:function"`` → that function (a user's own tasks)."""
    if spec is None:
        return synthetic_evaluator
    module_name, _, func_name = spec.partition(":")
    if not func_name:
        raise ValueError(f"evaluator {spec!r}: expected 'package.module:function'")
    try:
        return getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"evaluator {spec!r} cannot be imported ({exc})") from None


def evaluate_model(model: PreTrainedModel, tokenizer: Any, tasks: Iterable[str], n: int = 100,
                   evaluator: str | Evaluator | None = None, **labels: Any) -> pd.DataFrame:
    """Score ``model`` on ``tasks``: one row per task with columns task, score, n (+ any ``labels`` as columns)."""
    tasks = list(tasks)
    fn = evaluator if callable(evaluator) else resolve_evaluator(evaluator)
    scores = fn(model, tokenizer, tasks, n)
    return pd.DataFrame([{**labels, "task": t, "score": float(scores[t]), "n": n} for t in tasks])


def evaluate_state_dict(model: PreTrainedModel, tokenizer: Any, state_dict: Mapping[str, torch.Tensor],
                        tasks: Iterable[str], n: int = 100, evaluator: str | Evaluator | None = None,
                        **labels: Any) -> pd.DataFrame:
    """Load ``state_dict`` into ``model`` (a skeleton of the same architecture, reused across calls) and score it."""
    model.load_state_dict(state_dict, strict=True)
    return evaluate_model(model, tokenizer, tasks, n, evaluator, **labels)


def evaluate_checkpoint(path: str | os.PathLike[str], tasks: Iterable[str], n: int = 100,
                        evaluator: str | Evaluator | None = None, device: str = "cpu") -> pd.DataFrame:
    model, tokenizer = load_model(path, device)
    return evaluate_model(model, tokenizer, tasks, n, evaluator, checkpoint=Path(path).name)


# --- CLI -----------------------------------------------------------------------------------------------------------


def _cmd_eval(args: argparse.Namespace) -> int:
    if not (Path(args.checkpoint) / "config.json").is_file():
        raise FileNotFoundError(f"{args.checkpoint}: not a checkpoint folder (no config.json)")
    tasks = args.tasks.split(",") if args.tasks else None
    if tasks is None:
        tasks = read_card(args.checkpoint).get("catalogue_tasks") or []
        if not tasks:
            raise ValueError(f"{args.checkpoint}: no --tasks given and the checkpoint's card names none")
    frame = evaluate_checkpoint(args.checkpoint, tasks, n=args.n, evaluator=args.evaluator, device=args.device)
    print(frame.to_string(index=False))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="score a checkpoint folder on tasks (exact match of greedy answers)")
    p.add_argument("checkpoint", help="Hugging Face checkpoint folder")
    p.add_argument("--tasks", help="comma-separated task names (default: the catalogue's, from the model card)")
    p.add_argument("--n", type=int, default=100, help="examples per task (default 100)")
    p.add_argument("--evaluator", help="'package.module:function' for your own tasks")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_eval)
