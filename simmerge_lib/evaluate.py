"""Scoring a checkpoint: batched greedy decoding and exact match, as a tidy DataFrame.

For the kit's synthetic tasks the score of a model on task t is

    score(t) = (1/n) * sum_i [ greedy_answer(prompt_i) == answer_i ]

over the first n examples of t's ``eval`` split. A user's own catalogue names its evaluator in ``catalogue.json``
(``"evaluator": "package.module:function"``); the function is called as ``fn(model, tokenizer, tasks, n)`` and
returns ``{task: score}``.
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .tasks import exact_match, get_task

Evaluator = Callable[[PreTrainedModel, Any, Sequence[str], int], Mapping[str, float]]


def load_model(path: str | os.PathLike[str], device: str = "cpu") -> tuple[PreTrainedModel, Any]:
    """Load a checkpoint folder with transformers (read-only) and put the model in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no config.json)")
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


def synthetic_evaluator(model: PreTrainedModel, tokenizer: Any, tasks: Sequence[str], n: int,
                        split: str = "eval", batch_size: int = 512) -> dict[str, float]:
    """Exact-match scores on the kit's synthetic tasks; all tasks decode together in large batches."""
    examples = [ex for t in tasks for ex in get_task(t).split(split, n)]
    longest = max(len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) for ex in examples)
    predicted = greedy_answers(model, tokenizer, [ex.prompt for ex in examples], longest + 1, batch_size)
    scores = {}
    for t in tasks:
        pairs = [(p, ex.answer) for p, ex in zip(predicted, examples, strict=True) if ex.task == t]
        scores[t] = exact_match([p for p, _ in pairs], [a for _, a in pairs])
    return scores


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
        from .checkpoint import read_card

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
