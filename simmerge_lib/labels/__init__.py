"""Chapter 03 — label collection: merge every candidate pair with every operator on a small grid, and score it.

This is the expensive loop SimMerge exists to replace, measured once so that a predictor can learn from it.

**Jobs.** One job = one 2-way merge recipe: an unordered expert pair (a, b) (``a`` before ``b`` in catalogue order,
whichever order the pair was given in), an operator and one grid *setting* (:data:`DEFAULT_GRID`), a seed and the
evaluation settings.

**Order-free candidates.** A *candidate* is an operator at one setting. Every setting of the label grid is
symmetric in the two experts (linear weight 0.5, SLERP t = 0.5, and operators that give both task vectors the same
weight), and pairs are canonical, so no result and no policy built on the table (best fixed, a predictor) can win by
favouring whichever model the catalogue lists first. :func:`check_order_free` enforces it for any grid. A job's key is the
SHA-256 (16 hex digits) of the canonical recipe: method, ordered model names with their parameters, base, global
parameters, seed, ``n_eval``, evaluator, the evaluated tasks, the catalogue's recipe hash and :data:`LABELS_FORMAT`,
so any change of a field makes a new job and a rerun does only the jobs whose key is not in the table yet.

How a setting becomes a mergekit recipe (the ``recipe`` column; model paths as in ``catalogue.json``, relative to
the catalogue folder):

- ``linear``: models a (weight w) and b (weight 1 - w): theta = w theta_a + (1 - w) theta_b (the grid uses w = 0.5).
- ``slerp``: ``base_model: a``, t interpolates from a (t = 0) to b (t = 1) (the grid uses t = 0.5).
- ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``: ``base_model`` = base(a), both experts with weight
  1 (``weight`` in a setting is a's share, b gets 1 - weight) and the setting's density / lambda; DARE draws its
  masks from the job seed.
- *Cross-base pairs* (experts of independently initialised bases) have no common base; the kit uses **a's base**,
  exactly what ``mergekit`` does with that recipe (tau_b = theta_b - theta_base(a)). Every operator thus labels every
  pair, and each stored recipe reproduces its row with ``simmerge merge``.

**Evaluation.** The merged weights are loaded into a skeleton model (one per architecture, reused) and scored on the
catalogue's tasks by the catalogue's evaluator (all tasks decode in one batched pass), ``n_eval`` examples each.
Every expert that appears in a job is also scored once with the same evaluator and n (a *reference* table, stored
beside the labels as ``<out>.experts.parquet``) so that scores can be normalized:

    norm_score(t) = score(t) / ref(t)

where ref(t) is, for a parent task (t in tasks(a) ∪ tasks(b)), the best parent's own score on t (for cross-base
pairs each parent's own score on its task), and for another task the first expert of t on base(a) (NaN if there is
none, or if ref(t) = 0).

**Merge quality** of a job = mean norm_score over its parent tasks (NaN ones skipped; :func:`merge_quality`).
*Keep the better parent* (:func:`keep_parent`) is the no-merge reference: the better of the two experts alone, scored
the same way; a merge is worth doing only when it beats it. *Wins* (:func:`win_shares`) compare operator *families*
(linear/SLERP, task arithmetic, TIES/DARE; :data:`FAMILIES`) at their best candidate per pair: a family wins a pair
only if its best quality beats every other family's best by more than ``tol``; otherwise the pair is a *tie*.
*Oracle* = the best candidate per pair in hindsight; *best fixed* = the one candidate with the best mean quality
over the pairs; *regret* = oracle - chosen; *gap* = oracle - best fixed (:func:`oracle_vs_fixed`).

**Is the gap real?** Every candidate of a pair is scored on the same examples, so the oracle's lead over best fixed
mixes real differences with evaluation noise. Two tests: :func:`split_half_gain` chooses each pair's candidate (and
the best fixed one) on the even-indexed evaluation examples and scores the choice on the odd ones, and vice versa
(an honest, held-out estimate of what choosing per pair is worth); :func:`noise_gap` simulates the gap that
binomial noise alone would produce if every candidate were equally good (a pessimistic null: it ignores that the
candidates share their examples).

The labels table (Parquet, one row per job × evaluated task; the column names are stable, other chapters read them):

=============  =====================================================================================================
job_key        str, hash of the canonical recipe (see above)
a, b           str, expert names (a before b in catalogue order)
base_a, base_b str, their bases
same_base      bool
method         str, operator name (:data:`simmerge_lib.operators.OPERATORS`)
setting        str, short stable label of the grid point, e.g. ``"t=0.3"`` or ``"density=0.2,weight=0.5"``
parameters     str, JSON of the grid point
task           str, evaluated task
parent_task    bool, task in tasks(a) ∪ tasks(b)
score          float, the evaluator's score (exact match for the kit's tasks)
norm_score     float, score / ref(task) (see above)
norm_even      float, the score on the even-indexed examples / ref(task) (kit tasks; NaN for other evaluators)
norm_odd       float, the same on the odd-indexed examples
char_score     float, per-character accuracy of the answers (kit tasks; NaN for other evaluators)
seed           int, job seed (DARE masks)
n_eval         int, examples per task
seconds        float, wall seconds of the job (merge + evaluation), repeated on each of its rows
versions       str, JSON {torch, transformers, simmerge_lib}
recipe         str, the mergekit YAML recipe
=============  =====================================================================================================

Execution: ``executor="local"`` runs jobs in a process pool (``workers`` processes, one torch thread each; each
worker loads the catalogue's checkpoints once); ``executor="ray"`` submits the same job function as Ray tasks
(``num_cpus`` / ``num_gpus`` per job) to ``ray.init(address=...)`` or a local Ray runtime. The catalogue folder must be
readable at the same path from every Ray node. Finished rows are appended to the Parquet file atomically (rewrite
through a temporary file + rename) every ``flush_every`` jobs or ``flush_seconds``, and on any interruption.

Submodules: :mod:`.jobs` (grid, candidates, :class:`Job`, keys), :mod:`.run` (one job in a worker; the local and
Ray executors), :mod:`.collect` (the reference table and the resumable collection), :mod:`.analysis` (quality,
keep-parent, win shares, best fixed, split-half, noise gap, summary) and :mod:`.cli` (``simmerge labels``).
"""

from __future__ import annotations

from ..operators import setting_label, setting_parameters  # defined with the operators; labels write them in tables
from .analysis import (PAIR_COLUMNS, best_fixed, best_per_method, keep_parent, max_win_share, merge_quality,
                       noise_gap, oracle_vs_fixed, pair_winners, split_half_gain, summarize, win_shares)
from .cli import register
from .collect import collect_labels, load_labels
from .jobs import (DEFAULT_GRID, FAMILIES, FIXED_PARAMETERS, GRIDS, LABEL_COLUMNS, LABEL_OPERATORS, LABELS_FORMAT,
                   REFERENCE_COLUMNS, SMOKE_GRID, Job, catalogue_hash, check_order_free, family, job_recipe,
                   labels_path, make_job, make_jobs, profile_settings, reference_path)
from .run import IN_MEMORY_LIMIT, run_job

__all__ = [
    "DEFAULT_GRID", "FAMILIES", "FIXED_PARAMETERS", "GRIDS", "IN_MEMORY_LIMIT", "LABEL_COLUMNS", "LABEL_OPERATORS",
    "LABELS_FORMAT", "PAIR_COLUMNS", "REFERENCE_COLUMNS", "SMOKE_GRID", "Job", "best_fixed",
    "best_per_method", "catalogue_hash", "check_order_free", "collect_labels", "family", "job_recipe", "keep_parent",
    "labels_path", "load_labels", "make_job", "make_jobs", "max_win_share", "merge_quality", "noise_gap",
    "oracle_vs_fixed", "pair_winners", "profile_settings", "reference_path", "register", "run_job",
    "setting_label", "setting_parameters", "split_half_gain", "summarize", "win_shares",
]
