"""Chapter 04 — the SimMerge predictor: choose a pair's merge from cheap similarity signals, without merging.

**Rows.** Merge quality averages the parents' tasks, and each task belongs to one parent, its *owner*. So the
predictor reads one row per pair × parent task, *owner-oriented*: the features row ``(owner, other, task)`` of
chapter 01 (how the owner and the other expert compare on that task's probes, how far each moved from its base
there, how their task vectors relate). The question a row answers: *does the owner's skill survive merging with the
other expert, under each candidate?* Nothing depends on the order in which the catalogue lists the two experts, and
the row names no task: an unseen task is described by its probes (:data:`~simmerge_lib.features.FEATURE_DOCS`).

**Targets** of a row (owner o, other x, task t): y_c = norm_score(merge_c(o, x), t) for every candidate c of the
labels (chapter 03), and y_keep = norm_score(x alone, t), what keeping the *other* expert would leave of this task
(from the labels' reference table).

**Models** (scikit-learn; one multi-output model each, so one fit serves every candidate):

* *advantage*: y_c - mean_c y_c for all candidates at once: which candidate is better *for this row* (the row's
  difficulty, shared by every candidate, is removed: it carries no information about the choice);
* *level*: (mean_c y_c, y_keep): how well this row merges at all, and what the other parent alone keeps;
* a *classifier* of the pair's best candidate (pair level: both owner rows' features, averaged), P̂(c).

**Selection.** Q̂(c) = mean over the pair's rows of (level + advantage_c). The choice is the argmax of

    score(c) = Q̂(c) + v (P̂(c) - 1/|C|) + m [c = best fixed],

two views of the same question — how good each candidate is, and which one is best — combined at a scale fixed on
the training pairs: v = |C| x the standard deviation of the pairs' measured advantages (a classifier sure of a
candidate is worth about one typical advantage). The best fixed candidate of the training pairs gets a head start
``margin`` m (a hedge against predicted noise). *Keep the
better parent* is predicted too: Q̂_keep(p) = ½ [1 + ŷ_keep(row of the task p does not own)] (a parent keeps its own
task fully); when no candidate is predicted to beat it, the predictor *abstains* and advises keeping that parent.

**Protocol** (:func:`nested_evaluation`). Leave-one-task-out (every pair with the held-out task is tested; nothing
with it is trained on) and leave-one-expert-out (every pair with the held-out expert is tested; pairs with it *or
its siblings* — the same task on the same base — are not trained on). The model family and the feature set are
chosen inside each split by grouped cross-validation on its training pairs, and so is the margin: nothing scored
reaches a choice. Every split is checked by :func:`check_split`. Per held-out pair: chosen quality, oracle
(max_c Q_c), best fixed (the training pairs' best candidate), and the baselines of :data:`BASELINES`.
*Gap closure* = (mean chosen - mean best fixed) / (mean oracle - mean best fixed); confidence intervals come from a
*cluster* bootstrap over the held-out groups (tasks, or experts), because pairs sharing a task or an expert are
correlated (:func:`cluster_bootstrap_ci`).

**Persistence** with skops (:func:`save_predictor`, :func:`load_predictor`): loading checks every type in the file
against :data:`TRUSTED_TYPES` and refuses anything else (no arbitrary pickle code runs).

**Submodules.** :mod:`~simmerge_lib.predictor.training` (the training table: owner rows, targets, pair quality),
:mod:`~simmerge_lib.predictor.model` (:class:`Predictor`, :func:`fit_predictor`),
:mod:`~simmerge_lib.predictor.splits` (held-out splits, :func:`check_split`),
:mod:`~simmerge_lib.predictor.evaluation` (one split scored, metrics, bootstrap),
:mod:`~simmerge_lib.predictor.nested` (nested evaluation and its cache),
:mod:`~simmerge_lib.predictor.store` (skops persistence, the profile's tables),
:mod:`~simmerge_lib.predictor.synthetic` (tables with a planted rule), :mod:`~simmerge_lib.predictor.cli`
(``simmerge recommend``).
"""

from __future__ import annotations

from .training import (
    FEATURE_SETS, ROW_KEYS, feature_columns, owner_rows, training_table, candidates_of, pair_quality,
    keep_parent_quality,
)
from .model import (
    FAMILIES, PREDICTOR_FORMAT, quiet, Predictor, fit_predictor, similarity_columns,
)
from .splits import (
    Split, expert_tasks, siblings, leave_one_task_out, leave_one_expert_out, grouped_folds, check_split,
)
from .evaluation import (
    TOL, BASELINES, task_pair_lookup, evaluate_split, transfer_records, gap_closure, cluster_bootstrap_ci, spearman,
    within_pair_spearman, abstain_precision, selection_metrics,
)
from .nested import (
    MARGINS, regret_with_margin, choose_design, nested_evaluation,
)
from .store import (
    TRUSTED_TYPES, predictor_path, catalogue_predictor, save_predictor, load_predictor, load_tables,
)
from .synthetic import (
    synthetic_tables,
)
from .cli import (
    recommend_rows, predictor_parser, register,
)

__all__ = [
    "FEATURE_SETS", "ROW_KEYS", "feature_columns", "owner_rows", "training_table", "candidates_of", "pair_quality",
    "keep_parent_quality", "FAMILIES", "PREDICTOR_FORMAT", "quiet", "Predictor", "fit_predictor",
    "similarity_columns", "Split", "expert_tasks", "siblings", "leave_one_task_out", "leave_one_expert_out",
    "grouped_folds", "check_split", "TOL", "BASELINES", "task_pair_lookup", "evaluate_split", "transfer_records",
    "gap_closure", "cluster_bootstrap_ci", "spearman", "within_pair_spearman", "abstain_precision",
    "selection_metrics", "MARGINS", "regret_with_margin", "choose_design", "nested_evaluation", "TRUSTED_TYPES",
    "predictor_path", "catalogue_predictor", "save_predictor", "load_predictor", "load_tables", "synthetic_tables",
    "recommend_rows", "predictor_parser", "register",
]
