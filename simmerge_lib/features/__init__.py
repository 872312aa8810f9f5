"""Chapter 01: cheap similarity signals between checkpoints, from a few unlabeled probes.

For an ordered pair of experts ``(a, b)`` (with bases ``base_a``, ``base_b``) and a task ``t`` the kit computes

* **functional** features from one forward pass of each model over ``t``'s probe prompts
  (:mod:`simmerge_lib.probes`): how the two models' next-token distributions, hidden states and attention patterns
  differ;
* **structural** features from the weights, streamed one tensor at a time: how the task vectors
  ``tau_a = theta_a - theta_base_a`` and ``tau_b = theta_b - theta_base_b`` relate.

Every feature is scale-free (a divergence, a cosine, a ratio or a rate), so a predictor trained on the kit's tiny
models can be applied to large ones. Names and one-line definitions are in :data:`FEATURE_DOCS`; one table row
per ordered pair × task is built by :func:`compute_features` (``simmerge features``).

Cost. A model's probe outputs are computed once per probe set and cached (in memory and on disk under
``build/features/probe_cache``, keyed by the checkpoint's path, file sizes and mtimes, and the prompts), so a
catalogue of N models costs N forward passes, not one per pair. Structural features read each pair's four
checkpoints once, holding one tensor of each in memory at a time, so a 111B pair needs no more memory than its
largest tensor (times four).

Models can be checkpoint folders or in-memory models (:class:`ModelRef`): the multi-way planner measures a
running merged model against the next expert without saving it.

Widths. Linear CKA compares representations of different widths, so it is defined for any pair. Hidden-state
cosine compares vectors coordinate by coordinate and is ``NaN`` when the two models' widths differ; structural
features only use tensors whose names and shapes agree in all four checkpoints (``NaN`` when none do). Models with
different depths are compared layer to layer by relative depth. Where one expert left a group of tensors untouched
(its task vector is 0 there), that group's cosine, sign-conflict and overlap are 0 by convention (no shared
direction), so a predictor always sees a value; they are NaN only for a group with no tensors (e.g. the middle third
of a 2-block model).

Submodules, bottom to top:

* :mod:`.columns`: the table's columns and their definitions (:data:`FEATURE_DOCS`), versions, TIES density;
* :mod:`.stats`: row statistics (KL, JS, entropy, cosines, linear CKA, slopes over depth);
* :mod:`.refs`: the models the features read (:class:`ModelRef`) and their tensors one at a time
  (:class:`TensorReader`);
* :mod:`.probing`: probe outputs (:func:`run_probes`) and their cache (:class:`ProbeCache`);
* :mod:`.functional`: the ``fn_*`` features from two models' probe outputs;
* :mod:`.structural`: the ``st_*`` features from the weights;
* :mod:`.table`: the features table, its file and cache, and chapter 01's views;
* :mod:`.cli`: ``simmerge features``.
"""

from __future__ import annotations

from ..kernels import ties_threshold
from .cli import register
from .columns import (DESCRIPTOR_COLUMNS, FEATURE_COLUMNS, FEATURE_DOCS, FEATURE_VERSION, FUNCTIONAL_COLUMNS,
                      ID_COLUMNS, NAN, PROBE_VERSION, STRUCTURAL_COLUMNS, TIES_DENSITY)
from .functional import SMALL_WIDTH, answer_features, functional_features, layer_profile
from .probing import ProbeCache, ProbeOutputs, run_probes
from .refs import ModelLike, ModelRef, TensorReader, as_ref
from .stats import cosine, depth_slope, entropy_rows, js_rows, kl_rows, linear_cka, row_cosine
from .structural import _tensor_acc as _structural_tensor_acc
from .structural import depth_third, structural_features, swap_structural
from .table import (add_task_owner, compute_features, describe_features, features_path, load_or_compute,
                    pair_features, similarity_matrix, task_owner, write_table)

# The per-tensor sums and the TIES threshold behind the top-k features, under the names the tests use.
_tensor_acc, _ties_threshold = _structural_tensor_acc, ties_threshold

__all__ = [
    "DESCRIPTOR_COLUMNS", "FEATURE_COLUMNS", "FEATURE_DOCS", "FEATURE_VERSION", "FUNCTIONAL_COLUMNS", "ID_COLUMNS",
    "NAN", "PROBE_VERSION", "SMALL_WIDTH", "STRUCTURAL_COLUMNS", "TIES_DENSITY", "ModelLike", "ModelRef",
    "ProbeCache", "ProbeOutputs", "TensorReader", "add_task_owner", "answer_features", "as_ref", "compute_features",
    "cosine", "depth_slope", "depth_third", "describe_features", "entropy_rows", "features_path",
    "functional_features", "js_rows", "kl_rows", "layer_profile", "linear_cka", "load_or_compute", "pair_features",
    "register", "row_cosine", "run_probes", "similarity_matrix", "structural_features", "swap_structural",
    "task_owner", "write_table",
]
