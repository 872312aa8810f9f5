"""Every profile table of the kit, in one place: what ``smoke``, ``default`` and ``full`` mean for each chapter.

``smoke`` is sized for CI (every chapter in seconds on 2 cores), ``default`` for the course on a laptop's CPU and
``full`` for a GPU machine or a long run. Library modules, notebooks and benchmarks read their section with
:func:`settings`; a notebook's parameters cell only overrides single values.

The tables are plain data (numbers, strings, lists), so this module sits at the bottom of the layer order and
imports nothing of the kit: a section that names richer objects names them by a key the owning module resolves
(``labels.grid`` is ``"smoke"`` or ``"registry"``, resolved by :mod:`simmerge_lib.labels`).
"""

from __future__ import annotations

import copy
from typing import Any

#: The profiles, smallest first.
PROFILES = ("smoke", "default", "full")

#: section -> profile -> settings.
TABLES: dict[str, dict[str, dict[str, Any]]] = {
    # Chapter 00: the catalogue (model size; see simmerge_lib.zoo.recipe_for_profile for the tasks and styles).
    "zoo": {
        "smoke": {"size": {"hidden": 48, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 96},
                  "tasks": ["rotate", "double", "shift", "dedup"], "n_bases": 2, "rotate_styles": False,
                  "eval_n": 64},
        "default": {"size": {}, "tasks": "all", "n_bases": 2, "rotate_styles": True, "eval_n": 400},
        "full": {"size": {"hidden": 256, "layers": 4, "heads": 8, "kv_heads": 4, "intermediate": 512},
                 "tasks": "all", "n_bases": 3, "rotate_styles": True, "eval_n": 512},
    },
    # Chapter 01: unlabeled probe prompts per task.
    "probes": {"smoke": {"n_probes": 8}, "default": {"n_probes": 32}, "full": {"n_probes": 128}},
    # Chapter 02: eval examples per task of the operator tour.
    "operators": {"smoke": {"n_eval": 30}, "default": {"n_eval": 100}, "full": {"n_eval": 200}},
    # Chapter 03: the label grid (keyword arguments of labels.make_jobs; only the parents' tasks are scored).
    "labels": {
        "smoke": {"grid": "smoke", "n_eval": 32, "cross_base_sample": 2, "tasks": "parents"},
        "default": {"grid": "registry", "n_eval": 400, "cross_base_sample": 16, "tasks": "parents"},
        "full": {"grid": "registry", "n_eval": 512, "cross_base_sample": 64, "tasks": "parents"},
    },
    # Chapter 05: plan sizes of the main and unseen-task studies, runners-up merged for real.
    "multiway": {
        "smoke": {"ks": [2, 3, 4], "heldout_ks": [2], "top_realized": 2},
        "default": {"ks": [2, 3, 4, 5, 6], "heldout_ks": [2, 3, 4], "top_realized": 3},
        "full": {"ks": [2, 3, 4, 5, 6, 7, 8], "heldout_ks": [2, 3, 4, 5], "top_realized": 5},
    },
    # Chapter 06: replay seeds and horizon (None: the bandit module's default horizon), live requests, eval size.
    "bandit": {
        "smoke": {"seeds": 3, "horizon": 300, "live": 3, "n_eval": 8},
        "default": {"seeds": 20, "horizon": None, "live": 12, "n_eval": 24},
        "full": {"seeds": 50, "horizon": 2000, "live": 40, "n_eval": 50},
    },
    # Chapter 07: what is rehearsed at full width (layers, tensors by regex), output shards, calibration rows.
    # default keeps the layer's largest tensor (mlp.up_proj, where the memory bound binds) and the small attention
    # projections, half the bytes of the whole attention block.
    "scale": {
        "smoke": {"layers": [0, 1], "include": r"k_proj|input_layernorm", "shard_size": "20MB",
                  "calibration_rows": 128, "backend": "serial", "features": False},
        "default": {"layers": [0], "include": r"self_attn\.[kv]_proj|layernorm|mlp\.up_proj", "shard_size": "500MB",
                    "calibration_rows": 1024, "backend": "process", "features": True},
        "full": {"layers": [0, 1], "include": None, "shard_size": "2GB", "calibration_rows": 2048,
                 "backend": "process", "features": True},
    },
    # Chapter 08: evaluation sizes, trial budgets, surrogate samples, seeds and pairs of the search study.
    "search": {
        "smoke": {"n_eval": 16, "n_min": 4, "real_trials": 6, "nsga_trials": 4, "depth_trials": 4, "samples": 8,
                  "surrogate_trials": 30, "seeds": [0], "n_probes": 4, "trees": 30, "pairs": 2},
        "default": {"n_eval": 128, "n_min": 16, "real_trials": 40, "nsga_trials": 24, "depth_trials": 24,
                    "samples": 60, "surrogate_trials": 150, "seeds": [0, 1], "n_probes": 8, "trees": 100,
                    "pairs": 4},
        "full": {"n_eval": 256, "n_min": 16, "real_trials": 120, "nsga_trials": 60, "depth_trials": 60,
                 "samples": 200, "surrogate_trials": 500, "seeds": [0, 1, 2, 3, 4], "n_probes": 32, "trees": 200,
                 "pairs": 8},
    },
}


def settings(section: str, profile: str) -> dict[str, Any]:
    """A copy of ``section``'s settings for ``profile`` (changing it changes nothing here).

    Raises ``ValueError`` naming the known sections or profiles."""
    if section not in TABLES:
        raise ValueError(f"unknown profile section {section!r}; expected one of {sorted(TABLES)}")
    table = TABLES[section]
    if profile not in table:
        raise ValueError(f"unknown profile {profile!r} for {section}; expected one of {sorted(table)}")
    return copy.deepcopy(table[profile])
