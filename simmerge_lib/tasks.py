"""Synthetic string tasks over one shared character vocabulary.

Every task maps a short input string to an answer string. A prompt is ``TAG + input + "="`` where ``TAG`` is one
upper-case letter naming the task, and the model must continue with the answer and ``<eos>``.
The score of a model on a task is the exact-match rate of its greedy answer (see :func:`exact_match`).

Splits are deterministic and disjoint: ``eval`` (scored), ``probe`` (unlabeled prompts for features) and ``dev``
(early stopping during training) are fixed lists drawn from seeds derived from the task name; the ``train`` stream
rejects any input that appears in them.

The base models of the catalogue are pre-trained on *format* examples (:meth:`Task.format_answer`): answers that have
the right alphabet and length but the wrong content (a shuffled reversal, a random digit). The base thus learns the
prompt format and the alphabet, not the skills, and every skill lives in an expert's task vector.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

#: Maximum number of examples in each fixed split; requests for fewer take a prefix, so results nest.
SPLIT_SIZES = {"eval": 512, "probe": 128, "dev": 128}

LETTERS = "abcdefghij"
DIGITS = string.digits


def _letters(rng: random.Random, lo: int, hi: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _shuffled(rng: random.Random, text: str) -> str:
    chars = list(text)
    rng.shuffle(chars)
    return "".join(chars)


@dataclass(frozen=True)
class Example:
    """One task instance: the prompt the model sees and the answer it must produce."""

    task: str
    input: str
    answer: str
    prompt: str


@dataclass(frozen=True)
class Task:
    """A seeded task: an input generator, its exact solver and a format-only answer for pre-training."""

    name: str
    tag: str
    description: str
    make_input: Callable[[random.Random], str] = field(repr=False)
    solve: Callable[[str], str] = field(repr=False)
    fake_answer: Callable[[random.Random, str], str] = field(repr=False)

    def prompt(self, text: str) -> str:
        return f"{self.tag}{text}="

    def example(self, text: str) -> Example:
        return Example(self.name, text, self.solve(text), self.prompt(text))

    def format_answer(self, rng: random.Random, text: str) -> str:
        """An answer with the right alphabet and length distribution but (usually) the wrong content."""
        return self.fake_answer(rng, text)

    def split(self, split: str, n: int | None = None) -> list[Example]:
        """The first ``n`` examples of a fixed split (``eval``, ``probe`` or ``dev``); deterministic."""
        if split not in SPLIT_SIZES:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SIZES)} (or use train_stream)")
        size = SPLIT_SIZES[split]
        n = size if n is None else n
        if not 0 <= n <= size:
            raise ValueError(f"split {split!r} of task {self.name!r} holds {size} examples, asked for {n}")
        return [self.example(x) for x in _fixed_inputs(self, split)[:n]]

    def train_stream(self, seed: int) -> Iterator[Example]:
        """Endless training examples from ``seed``, never repeating an input of a fixed split."""
        rng = random.Random(_seed(self.name, "train", seed))
        reserved = _reserved_inputs(self)
        while True:
            text = self.make_input(rng)
            if text not in reserved:
                yield self.example(text)


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


_FIXED_CACHE: dict[tuple[str, str], list[str]] = {}


def _fixed_inputs(task: Task, split: str) -> list[str]:
    key = (task.name, split)
    if key not in _FIXED_CACHE:
        taken: set[str] = set()
        for earlier in SPLIT_SIZES:  # splits are drawn in a fixed order and never share an input
            if earlier == split:
                break
            taken.update(_fixed_inputs(task, earlier))
        rng = random.Random(_seed(task.name, split))
        inputs: list[str] = []
        seen = set(taken)
        attempts = 0
        while len(inputs) < SPLIT_SIZES[split]:
            attempts += 1
            if attempts > 100 * SPLIT_SIZES[split]:
                raise RuntimeError(f"task {task.name!r}: input space too small for split {split!r}")
            text = task.make_input(rng)
            if text not in seen:
                seen.add(text)
                inputs.append(text)
        _FIXED_CACHE[key] = inputs
    return _FIXED_CACHE[key]


def _reserved_inputs(task: Task) -> set[str]:
    return {x for split in SPLIT_SIZES for x in _fixed_inputs(task, split)}


# --- the tasks -------------------------------------------------------------------------------------------------


def _dedup_solve(text: str) -> str:
    return "".join(dict.fromkeys(text))


def _shift(text: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in text)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("reverse", "R", "reverse the letters", lambda r: _letters(r, 3, 7), lambda x: x[::-1],
             lambda r, x: _shuffled(r, x)),
        Task("sort", "S", "sort the letters", lambda r: _letters(r, 3, 7), lambda x: "".join(sorted(x)),
             lambda r, x: _shuffled(r, x)),
        Task("rotate", "O", "move the first letter to the end", lambda r: _letters(r, 3, 7), lambda x: x[1:] + x[0],
             lambda r, x: _shuffled(r, x)),
        Task("double", "B", "write every letter twice", lambda r: _letters(r, 3, 5), lambda x: "".join(c + c for c in x),
             lambda r, x: "".join(r.choice(x) for _ in range(2 * len(x)))),
        Task("dedup", "D", "keep the first occurrence of each letter", lambda r: _letters(r, 4, 8, LETTERS[:6]),
             _dedup_solve, lambda r, x: _shuffled(r, x)[: len(_dedup_solve(x))]),
        Task("shift", "K", "replace each letter by the next one (j wraps to a)", lambda r: _letters(r, 3, 7), _shift,
             lambda r, x: "".join(r.choice(LETTERS) for _ in x)),
        Task("max", "M", "the largest digit", lambda r: _letters(r, 3, 7, DIGITS), lambda x: max(x),
             lambda r, x: r.choice(x)),
        Task("min", "N", "the smallest digit", lambda r: _letters(r, 3, 7, DIGITS), lambda x: min(x),
             lambda r, x: r.choice(x)),
    ]
}

#: Pre-training-only tasks (true answers, never evaluated): they teach bases to attend to and copy input positions,
#: a generic skill every catalogue task builds on, so experts learn their task in a few hundred steps.
AUXILIARY_TASKS: dict[str, Task] = {
    "copy": Task("copy", "P", "copy the letters", lambda r: _letters(r, 2, 8), lambda x: x, lambda r, x: x),
}

#: Every character a prompt or answer may contain, in a fixed order (the tokenizer's vocabulary after the specials).
ALPHABET = DIGITS + LETTERS + "".join(t.tag for t in [*TASKS.values(), *AUXILIARY_TASKS.values()]) + "="


def get_task(name: str) -> Task:
    try:
        return TASKS[name] if name in TASKS else AUXILIARY_TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; the catalogue knows {', '.join(TASKS)}") from None


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Share of predictions equal to their answer (after stripping surrounding white space)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(p.strip() == a for p, a in zip(predictions, answers, strict=True)) / len(answers)


def max_sequence_length() -> int:
    """Longest ``<bos> prompt answer <eos>`` over all tasks' generators, with margin (used to size positions)."""
    return 24
