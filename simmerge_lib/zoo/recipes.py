"""The catalogue's recipe: model size, base pre-training, expert styles, and the recipe of each profile.

A :class:`ZooRecipe` determines every checkpoint of a catalogue; :meth:`ZooRecipe.digest` (a hash of all its
fields, nested ones included) keys the cache, so any change rebuilds."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import LlamaConfig

from .. import profiles
from ..tasks import TASKS, max_sequence_length

#: Bump when training code changes in a way that changes checkpoints, so caches rebuild.
ZOO_FORMAT = 2

#: What an expert may train (substring filters on parameter names, see :func:`~.training.trainable_filter`).
TRAINABLE = ("all", "mlp", "attn", "upper", "lower")


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
    """The catalogue recipe of a profile: ``smoke`` (CI), ``default`` (the laptop course), ``full`` (a GPU), each
    built from ``profiles.settings("zoo", profile)`` (model size, tasks — ``"all"`` or a list —, bases, style
    rotation, eval examples), or ``transfer`` (chapter 04's larger catalogue, :func:`transfer_recipe`)."""
    if profile == "transfer":
        return transfer_recipe("default")
    if profile not in profiles.TABLES["zoo"]:
        raise ValueError(f"unknown profile {profile!r}; expected smoke, default, full or transfer")
    cfg = profiles.settings("zoo", profile)
    tasks = tuple(TASKS) if cfg["tasks"] == "all" else tuple(cfg["tasks"])
    return ZooRecipe(name=profile, size=ModelSize(**cfg["size"]), tasks=tasks,
                     experts=_sibling_experts(tasks, _FIRST, _SECOND), n_bases=int(cfg["n_bases"]),
                     rotate_styles=bool(cfg["rotate_styles"]), eval_n=int(cfg["eval_n"]))


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
