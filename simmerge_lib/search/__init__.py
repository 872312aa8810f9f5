"""Chapter 08 — automated merge search: search spaces of fine-grained recipes, Optuna optimizers with multi-fidelity
evaluation, and a surrogate benchmark that makes comparing search algorithms cheap.

**Problem.** Two experts a, b of one base (:class:`MergeProblem`). A candidate recipe r is merged in memory and scored
on the parents' tasks T = tasks(a) ∪ tasks(b) with the first n examples of each task's ``eval`` split:

    norm_t(r; n) = score_t(merge(r); n) / ref_t(n),       quality(r; n) = mean_{t in T} norm_t(r; n)

where ref_t(n) is the best parent's own score on t with the same n (the *merge quality* of the labels chapter).

**Search space 1 — layer-wise fusion** (:class:`LayerwiseSpace`). Tensors are split into groups: ``outer``
(embeddings, final norm, head) and G contiguous blocks of decoder layers. Each group g picks an operator o_g and its
parameters from one fixed-dimensional vector (so that every sampler, NSGA-II's crossover included, sees the same
space): mix_g in [0, 1] (a's share: linear weights (mix, 1 - mix), SLERP t = 1 - mix, task-vector weights
(2 mix, 2 (1 - mix))), lambda_g in [0.3, 1.5] and density_g in [0.1, 1]; parameters an operator does not use are
ignored. A group's choice is a :class:`~simmerge_lib.operators.Candidate` (the operator with the parameters ``mix``,
``lambda`` and ``density``: :func:`group_candidate`). A sample is a :class:`LayerwiseRecipe`: one mergekit recipe per
group (each a valid :class:`~simmerge_lib.recipe.Recipe` the engine runs), and the merged model takes each group's
tensors from its group's recipe.

**Search space 2 — depth-level integration** (:class:`DepthSpace`). A new layer stack of depth D (from L - 1 to
L + ``extra_layers`` for L-layer inputs): position j copies decoder layer l_j of model s_j in {a, b}, in any order,
with its residual-branch outputs (``o_proj``, ``down_proj``) scaled by c_j in [0.5, 1.5]; embeddings, final norm and
head come from one model. A sample is a :class:`DepthRecipe`, written as mergekit's ``passthrough`` recipe with
``slices`` (one single-layer slice per position, ``scale`` filtered to o_proj / down_proj); this package builds the
stack in memory itself (:meth:`DepthRecipe.build`) and reads the same YAML back (:meth:`DepthRecipe.from_dict`).

**Optimizers** (:func:`run_search`, Optuna): TPE (one objective: quality), NSGA-II (one objective per parent task:
the Pareto front of task trade-offs), random search as the control. *Multi-fidelity*: a trial is scored on n_1 < n_2
< … examples per task (nested prefixes of the eval split) and reports quality(r; n_k) after each rung; a
successive-halving or Hyperband pruner stops trials that rank in the bottom of their rung, so a pruned trial costs
sum_{k<=stop} n_k |T| decoded examples instead of sum_k n_k |T|.

**Surrogate benchmark** (:func:`collect_samples`, :func:`fit_surrogate`, :func:`surrogate_quality`): a random
forest maps the encoded configuration x(r) to (quality, norm_t for t in T). Its quality is measured on held-out
*groups* (:func:`group_split`: the group of a sample is its pair and its canonical recipe, so a configuration sampled
twice never sits on both sides), as R² and Kendall's τ of predicted vs measured quality. Optimizers then run against
the surrogate (:class:`Surrogate` as the objective: no merge per trial) at equal budget, and the best configuration
of each is merged and scored for real. Baselines: the SimMerge predictor's choice for the pair (:func:`simmerge_choice`;
it also warm-starts the search) and the best fixed operator of the labels table (:func:`best_fixed_choice`).

Submodules (each name is re-exported here):

- :mod:`.spaces` — the two search spaces, their recipes, and a group's candidate (recipe, coefficients, kept share);
- :mod:`.problem` — :class:`MergeProblem`: the pair in memory, the cost-counting scorer, held-out scoring;
- :mod:`.optimize` — samplers, pruners, :func:`run_search`, :class:`SearchResult`, :func:`pareto_mask`;
- :mod:`.surrogate` — samples, the group split and its leakage check, :class:`Surrogate`, optimizer comparison;
- :mod:`.choices` — baselines (best fixed, SimMerge choice, held-out choice, label oracle) and the pairs searched;
- :mod:`.experiment` — :func:`run_experiment`, :func:`pair_study` and its summary (sizes:
  ``profiles.settings("search", profile)``);
- :mod:`.cli` — ``simmerge search``.
"""

from __future__ import annotations

from .choices import (best_fixed_choice, choose_pair, choose_pairs, heldout_choice, label_oracle, simmerge_choice,
                      uniform_recipe)
from .cli import register
from .experiment import COMPARED, Experiment, pair_study, pair_study_summary, run_experiment
from .optimize import SAMPLERS, SearchResult, fidelity_schedule, make_pruner, make_sampler, pareto_mask, run_search
from .problem import MergeProblem
from .spaces import (DENSITY_RANGE, LAMBDA_RANGE, METHODS, MIX_RANGE, RESIDUAL_OUTPUTS, SCALE_RANGE, DepthRecipe,
                     DepthSlice, DepthSpace, LayerwiseRecipe, LayerwiseSpace, SearchRecipe, Space, coefficients,
                     group_candidate, group_parameters, group_recipe, kept, layer_blocks, setting_from_grid)
from .surrogate import (Surrogate, best_configs, check_no_leakage, collect_samples, compare_on_surrogate,
                        fit_surrogate, group_split, samples_from_trials, surrogate_quality)

__all__ = ["COMPARED", "DENSITY_RANGE", "DepthRecipe", "DepthSlice", "DepthSpace", "Experiment", "LAMBDA_RANGE",
           "LayerwiseRecipe", "LayerwiseSpace", "METHODS", "MIX_RANGE", "MergeProblem", "RESIDUAL_OUTPUTS",
           "SAMPLERS", "SCALE_RANGE", "SearchRecipe", "SearchResult", "Space", "Surrogate", "best_configs",
           "best_fixed_choice", "check_no_leakage", "choose_pair", "choose_pairs", "coefficients", "collect_samples",
           "compare_on_surrogate", "fidelity_schedule", "fit_surrogate", "group_candidate", "group_parameters",
           "group_recipe", "group_split", "heldout_choice", "kept", "label_oracle", "layer_blocks", "make_pruner",
           "make_sampler", "pair_study", "pair_study_summary", "pareto_mask", "register", "run_experiment",
           "run_search", "samples_from_trials", "setting_from_grid", "simmerge_choice", "surrogate_quality",
           "uniform_recipe"]
