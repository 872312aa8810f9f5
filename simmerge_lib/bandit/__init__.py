"""Chapter 06 — the bandit extension: choose the merge operator online, and absorb new operators, tasks and models.

A trained predictor (chapter 04) is frozen; a lab's catalogue is not. A *contextual bandit* learns while it serves
merge requests: request t is a pair (a, b) with context x_t (its similarity features), the bandit picks an *arm*
k_t = operator × setting (a :class:`~simmerge_lib.operators.Candidate`), the merge is run and its quality r_t is
observed, and the bandit updates. Its *regret* is

    regret_t = max_{k in K_t} q(pair_t, k) - q(pair_t, k_t),     R_T = sum_{t <= T} regret_t

over the arms K_t available at time t (q = merge quality, :func:`simmerge_lib.labels.merge_quality`).

**Context.** x = [1, PCA-whitened standardized pair features, multi-hot of the pair's parent tasks]: the features
(``fn_*`` / ``st_*``) of the ordered rows (a, b, t) are averaged over the parent tasks t, median-imputed, standardized
and projected on ``n_components`` principal components, clipped to [-clip, clip] (:class:`ContextEncoder`). The
encoder is fitted on the features of the pairs that exist when the stream starts (features are label-free and
cheap, so that uses no merge result); pairs arriving later are encoded with the same statistics. The task columns
of a task nobody has seen yet are all zero, which for a ridge model is the same as adding the column when the task
appears: its coefficient keeps its prior until the first such request.

**Policies** (numpy; λ = ridge prior, each arm k keeps A_k = λI + sum x x^T and b_k = sum (r - r_0) x, where the
offset r_0 = the pre-stream mean quality, so that an arm nobody has tried is expected at r_0 rather than at 0 —
otherwise a small exploration bonus would never try it):

* :class:`LinUCB` (disjoint, Li et al. 2010, Alg. 1): θ_k = A_k^{-1} b_k, choose
  argmax_k θ_k^T x + α sqrt(x^T A_k^{-1} x).
* :class:`HybridLinUCB` (Li et al. 2010, Alg. 2): r = z_k^T β + x^T θ_k, where z_k = shared features of the context
  *and the arm* (:func:`shared_features`: x itself, the pair's level, and the outer product of the arm's
  descriptor — operator traits and setting, :func:`arm_descriptor` — with the first context components). β is
  shared by all arms, so a new arm starts from what its traits predict instead of from zero. With A_0 = λI + ...,
  β = A_0^{-1} b_0, θ_k = A_k^{-1}(b_k - B_k β), the score is z^T β + x^T θ_k + α sqrt(s) with
  s = z^T A_0^{-1} z - 2 z^T A_0^{-1} B_k^T A_k^{-1} x + x^T A_k^{-1} x + x^T A_k^{-1} B_k A_0^{-1} B_k^T A_k^{-1} x.
  Update of the chosen arm: A_0 += B^T A^{-1} B, b_0 += B^T A^{-1} b; A += x x^T, B += x z^T, b += r x;
  A_0 += z z^T - B^T A^{-1} B, b_0 += r z - B^T A^{-1} b (A, B, b of the chosen arm, after its update).
* :class:`LinearThompson` (Agrawal & Goyal 2013, one model per arm): μ_k = A_k^{-1} b_k, draw
  θ̃_k ~ N(μ_k, v² A_k^{-1}) and choose argmax_k θ̃_k^T x.
* Baselines: :class:`RandomPolicy` (uniform over the available arms), :class:`FixedPolicy` (the *best fixed* arm:
  best mean quality on the pre-stream pairs), :class:`TablePolicy` (greedy on a fixed score table: the offline
  predictor of chapter 04, trained on the pre-stream pairs; it cannot score an operator it never saw).

Every policy can take an arm at any time (:meth:`Policy.add_arm`): the others' statistics are untouched. Policies
are registered by name in :data:`POLICY_REGISTRY`, which :func:`make_policy` reads.

**Environments.** :func:`run_replay` replays a labels table (offline evaluation: the reward of the chosen arm is its
measured quality for that pair: no merge runs, so many seeds are cheap).
:class:`LiveEnvironment` runs the real merge and evaluation of the chosen arm (in memory, through the same job
function as chapter 03: :func:`simmerge_lib.labels.run_job`), for :func:`run_live`.

**Events** (:func:`make_scenario`): at given times a new operator's arms appear; a new task appears (pairs with an
expert of that task enter the stream); new experts join (their pairs enter). For ``window`` requests after a pair
event, a share ``new_share`` of the requests is drawn from the new pairs, so that the window measures how fast
they are learned. :func:`summarize_runs` reports the regret over the ``window`` requests before and after each event.

**Submodules.** :mod:`~simmerge_lib.bandit.arms` (arms as candidates, their descriptors, contexts,
:class:`ReplayData`), :mod:`~simmerge_lib.bandit.scenarios` (events and request streams),
:mod:`~simmerge_lib.bandit.policies` (the policies and :data:`POLICY_REGISTRY`), :mod:`~simmerge_lib.bandit.replay`
(offline replay and its summary), :mod:`~simmerge_lib.bandit.live` (real merges), :mod:`~simmerge_lib.bandit.synthetic`
(planted-rule problems and tables), :mod:`~simmerge_lib.bandit.tables` (a profile's tables),
:mod:`~simmerge_lib.bandit.cli` (``simmerge bandit``).
"""

from __future__ import annotations

from .arms import (
    TRAIT_NAMES, PARAM_NEUTRAL, DESCRIPTOR_NAMES, Arm, operator_traits, arm_descriptor, shared_features,
    pair_contexts, ContextEncoder, ReplayData, replay_data,
)
from .scenarios import (
    DEFAULT_HORIZON, Event, Scenario, make_scenario, scenario_for, make_stream,
)
from .policies import (
    DEFAULT_ALPHA, DEFAULT_COMPONENTS, Policy, RandomPolicy, FixedPolicy, TablePolicy, Learner, LinUCB, LinearThompson,
    HybridLinUCB, POLICY_REGISTRY, POLICIES,
)
from .replay import (
    best_fixed_arm, predictor_scores, ReplaySetup, prepare_replay, make_policy, warm_observations, run_replay,
    replay_many, crossing_time, summarize_runs,
)
from .live import (
    LiveEnvironment, live_contexts, run_live,
)
from .synthetic import (
    synthetic_problem, SYNTHETIC_GRID, synthetic_tables,
)
from .tables import (
    NEW_OPERATOR, bandit_tables, current_labels, registry_labels_path, registry_labels, stream_tables,
)
from .cli import (
    register,
)

__all__ = [
    "TRAIT_NAMES", "PARAM_NEUTRAL", "DESCRIPTOR_NAMES", "Arm", "operator_traits", "arm_descriptor", "shared_features",
    "pair_contexts", "ContextEncoder", "ReplayData", "replay_data", "DEFAULT_HORIZON", "Event", "Scenario",
    "make_scenario", "scenario_for", "make_stream", "DEFAULT_ALPHA", "DEFAULT_COMPONENTS", "Policy", "RandomPolicy",
    "FixedPolicy", "TablePolicy", "Learner", "LinUCB", "LinearThompson", "HybridLinUCB", "POLICY_REGISTRY", "POLICIES",
    "best_fixed_arm", "predictor_scores", "ReplaySetup", "prepare_replay", "make_policy", "warm_observations",
    "run_replay", "replay_many", "crossing_time", "summarize_runs", "LiveEnvironment", "live_contexts", "run_live",
    "synthetic_problem", "SYNTHETIC_GRID", "synthetic_tables", "NEW_OPERATOR", "bandit_tables", "current_labels",
    "registry_labels_path", "registry_labels", "stream_tables", "register",
]
