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
thread each): at these sizes a step is too small to keep several threads busy, so several single-threaded models
beat one multi-threaded model.

Submodules (each name is re-exported here):

- :mod:`.recipes` — :class:`ZooRecipe` and its parts (:class:`ModelSize`, :class:`BaseRecipe`, :class:`ExpertStyle`,
  :data:`STYLES`), :func:`recipe_for_profile` (from ``profiles.settings("zoo", profile)``), :func:`transfer_recipe`;
- :mod:`.training` — :func:`train_base`, :func:`train_expert`, the :class:`Trainer` and what an expert trains
  (:func:`trainable_filter`);
- :mod:`.build` — :func:`build_catalogue` (cache, resume, worker processes), :func:`build_transfer_catalogue`;
- :mod:`.stats` — :func:`base_skill_ratio`, :func:`task_vector_stats`;
- :mod:`.cli` — ``simmerge zoo``.
"""

from __future__ import annotations

# encode_batch is the evaluation's batching, re-exported here where the training code has always offered it.
from ..evaluate import encode_batch
from .build import build_catalogue, build_transfer_catalogue, catalogue_dir
from .cli import register
from .recipes import (STYLES, TRAINABLE, ZOO_FORMAT, BaseRecipe, ExpertStyle, ModelSize, ZooRecipe,
                      recipe_for_profile, transfer_recipe)
from .stats import base_skill_ratio, task_vector_stats
from .training import Trainer, dev_scores, train_base, train_expert, trainable_filter

__all__ = ["STYLES", "TRAINABLE", "ZOO_FORMAT", "BaseRecipe", "ExpertStyle", "ModelSize", "Trainer", "ZooRecipe",
           "base_skill_ratio", "build_catalogue", "build_transfer_catalogue", "catalogue_dir", "dev_scores",
           "encode_batch", "recipe_for_profile", "register", "task_vector_stats", "train_base", "train_expert",
           "trainable_filter", "transfer_recipe"]
