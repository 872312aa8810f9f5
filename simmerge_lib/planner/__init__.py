"""Chapter 05 — multi-way planning: which experts to merge, in which order, with which operator at each step.

**Plans.** For target tasks T, a plan over experts of one base is a subset S, an order pi = (e_1, ..., e_k) and an
operator choice o_j per step (a :class:`~simmerge_lib.operators.Candidate`: operator + setting), read as a
*left fold* of 2-way merges:

    M_1 = e_1,    M_j = merge_{o_{j-1}}(M_{j-1}, e_j)   (j = 2..k),   result M_k.

Step j is the 2-way merge of the labels table (:func:`simmerge_lib.labels.job_recipe`) with a = M_{j-1} (the running
model: a ``weight`` is its share, SLERP's ``t`` runs from it) and b = e_j. For a fixed S there are
|S|! * |O|^(|S|-1) plans (:func:`enumerate_plans`, :func:`count_plans`). :func:`plan` searches at most one expert per
task (two experts of one task are alternatives, not partners), and a first step and its swapped twin under an
order-free operator (:func:`is_order_free`) once: they are the same merge (:meth:`Planner.space` counts what is left).

**Scoring without evaluating.** A *step scorer* (:class:`StepScorer`) returns, for a prefix M_{j-1}, the next expert
e and every operator choice o, the predicted normalized score yhat_o(t) of merge_o(M_{j-1}, e) on each task t of
tasks(M_{j-1}) ∪ tasks(e). :class:`PredictorScorer` computes the owner-oriented features of the *running merged
model* against e on the fly (the prefix merge is built in memory and probed on unlabeled prompts; no labelled data
is touched; a first step between two experts reads the catalogue's features table) and asks the chapter-04
predictor, once for every step of a search depth. The 2-way predictor's targets are normalized by the owner's own
score, so a plan's per-task prediction chains multiplicatively:

    qhat(M_1, t) = 1 for t in tasks(e_1)
    qhat(M_j, t) = yhat_{o_{j-1}}(t) * qhat(M_{j-1}, t)   if t not in tasks(e_j)   (a skill carried by the prefix)
    qhat(M_j, t) = yhat_{o_{j-1}}(t)                      if t in tasks(e_j)       (relative to e_j's own score)

and the *predicted quality* of a plan is mean_{t in T} qhat(M_k, t).

**Leaving an expert out.** A plan may merge fewer experts than there are target tasks (``min_k`` < k). A target task
u that no expert of the plan serves still has the skill the merged model kept from its base: the scorer forecasts it
with the predictor's *keep* head (chapter 04's ``keep_other``, what a model keeps of a task it was not trained on),
applied to the rows (x, M_k, u) for each expert x of u: qhat(M_k, u) = mean_x keep_hat(x, M_k, u). Keeping one
expert alone is the plan of size 1. Smaller plans thus compete with larger ones on the same scale
(:meth:`Planner.complete`).

**Search.** :func:`exhaustive_search` scores every plan over k-subsets of the candidate pool (step tables are
memoized per (prefix, expert), so shared prefixes are merged and probed once); :func:`beam_search` keeps the
``width`` best partial plans at each depth (every single expert at depth 1; ties broken by the plan's key, so with a
width at least the number of partial plans it returns exactly the exhaustive optimum). :func:`plan` picks exhaustive
search when the space has at most ``exhaustive_limit`` plans, else the beams of every depth give the candidates of
every size.

**Realized quality** (:class:`Realizer`) merges a plan for real (in memory, the same operator code as the engine)
and evaluates it: quality = mean_{t in T} score(M_k, t) / ref(t), with ref(t) the best own-task score of the base's
experts of t (same evaluator and n). Baselines (:func:`baselines`): all-at-once merges of the k target experts
(linear with equal weights, TIES at density 0.2 and 0.5, task arithmetic at lambda 0.5 and 1), random plans (order
and operators drawn uniformly) over the same experts, the best fixed operator at every step in the planner's order,
keeping the best single expert (in hindsight), and the oracle over real merges where it fits. :func:`multiway_study`
runs them for k = 2, 3, ...; :func:`heldout_study` plans with predictors that never trained on the target tasks.

**Multi-document recipes.** :func:`write_plan_recipe` writes one mergekit-format YAML document per step, separated by
``---``; each document carries a ``name`` (``step1``, ``step2``, ...) and a later step names an earlier result as
``"@<name>"`` (e.g. ``model: "@step1"``, also allowed in ``base_model``). ``simmerge merge plan.yml OUT`` runs
:func:`simmerge_lib.engine.merge_multi`: each step is merged by the streaming engine into ``.OUT.steps/<name>``
(removed at the end unless ``keep_steps``), the last document into ``OUT``.

**Submodules.** :mod:`~simmerge_lib.planner.plans` (:class:`Plan`, :class:`Planner`, the searches, :func:`plan`),
:mod:`~simmerge_lib.planner.scoring` (:class:`PredictorScorer`), :mod:`~simmerge_lib.planner.merges` (step recipes,
the in-memory left fold, multi-document recipes), :mod:`~simmerge_lib.planner.realize` (real merges and the
baselines), :mod:`~simmerge_lib.planner.study` (chapter 05's studies and their summary),
:mod:`~simmerge_lib.planner.cli` (``simmerge plan``).
"""

from __future__ import annotations

from .plans import (
    EXHAUSTIVE_LIMIT, Plan, count_plans, enumerate_plans, StepScorer, is_order_free, Planner, exhaustive_search,
    beam_search, candidate_experts, PlanResult, plan,
)
from .merges import (
    step_recipe, Merges, plan_documents, write_plan_recipe,
)
from .scoring import (
    PredictorScorer, predictor_ops, load_or_fit_predictor,
)
from .realize import (
    Realizer, all_at_once_recipe, random_plans, oracle_search, ALL_AT_ONCE, oracle_plans, baselines,
)
from .study import (
    fixed_op_from_labels, multiway_study, BASELINE_NAMES, study_frame, study_summary, task_halves, half_predictors,
    heldout_study,
)
from .cli import (
    register,
)

__all__ = [
    "EXHAUSTIVE_LIMIT", "Plan", "count_plans", "enumerate_plans", "StepScorer", "is_order_free", "Planner",
    "exhaustive_search", "beam_search", "candidate_experts", "PlanResult", "plan", "step_recipe", "Merges",
    "plan_documents", "write_plan_recipe", "PredictorScorer", "predictor_ops", "load_or_fit_predictor", "Realizer",
    "all_at_once_recipe", "random_plans", "oracle_search", "ALL_AT_ONCE", "oracle_plans", "baselines",
    "fixed_op_from_labels", "multiway_study", "BASELINE_NAMES", "study_frame", "study_summary", "task_halves",
    "half_predictors", "heldout_study", "register",
]
