"""Merge operators (chapter 02): tensor-wise functions over the stack of one tensor from every input model.

Every operator sees, for one tensor name, working copies of that tensor in each input model (and the base model's,
for the methods that have one), the parameters resolved for that tensor, and returns the merged tensor. The same
functions serve the in-memory path (:func:`merge_state_dicts`, small models, many merges) and the streaming engine
(:mod:`simmerge_lib.engine`, one tensor at a time from disk).

**Compute dtype.** As in mergekit, a recipe's ``dtype`` is the dtype the merge is *computed* in (``out_dtype`` the
one written). Working copies are float32 (float64 for a float64 merge) holding values of the compute dtype; an
operator rounds its intermediate results to the compute dtype wherever mergekit's computation in that dtype rounds
(:func:`~simmerge_lib.kernels.round_`), so a float16 recipe gives float16's tensors in both tools, while the
arithmetic runs at float32 speed. The caller rounds the returned tensor to the compute dtype, then casts it to the
output dtype.

**The registry.** Each operator is one function plus one :func:`operator` decorator that registers everything the
rest of the kit needs: its parameters (:class:`Param`: per-model or global, default, the range searched), whether it
takes a base model, how many models, its *traits* (what kind of merge it is, for the bandit of chapter 06) and its
default label grid (order-free settings: swapping the two models of a pair never changes a result). Labels,
planner, search and bandit read them through :func:`get_operator` and :func:`default_grid`, so registering a
function adds an operator everywhere.

Parameters follow mergekit's recipe semantics so that a recipe means the same in both tools:

- a scalar (``weight: 0.5``);
- a *gradient*: a list of numbers interpolated across the decoder layers, ``t = layer / (n_layers - 1)`` for
  tensors inside layer ``layer`` (counted within the recipe's slice) and ``t = 0`` for the others (embeddings,
  final norm, head);
- a *filter*: ``{filter: "self_attn", value: ...}`` (or a list of them, first match wins; a filter matches when
  it is a substring of the tensor name, and a missing filter or ``"*"`` matches everything).

A model's own parameters take precedence over its slice's, which take precedence over the recipe's global ones.

Submodules: :mod:`.registry` (:class:`Operator`, :class:`Param`, :func:`operator`, :class:`Candidate`),
:mod:`.sparsify` (task vectors, trims, drops and the fused combine pass), :mod:`.methods` (the registered operators,
each with its formula) and :mod:`.resolve` (parameter resolution, :func:`merge_tensor`, :func:`merge_state_dicts`).
Layer indices of tensor names come from :mod:`simmerge_lib.checkpoint` (:func:`layer_index` is re-exported here).
"""

from __future__ import annotations

from ..checkpoint import layer_index
from .methods import (breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della, della_linear, linear,
                      model_stock, nuslerp, nuslerp_tensors, passthrough, slerp, slerp_tensors, task_arithmetic, ties)
from .registry import (CHUNK, OPERATORS, REQUIRED, TRAITS, Candidate, Operator, OperatorFn, Param, Params,
                       candidate_key, default_grid, get_operator, operator, param_range, setting_label,
                       setting_parameters)
from .resolve import (check_inputs, compute_dtype, evaluate_setting, infer_layer_count, layer_t, merge_state_dicts,
                      merge_tensor, resolve, resolve_params, with_layer, work_dtype)
from .sparsify import dare_, della_, outlier_trim_, trim_

__all__ = [
    "CHUNK", "OPERATORS", "REQUIRED", "TRAITS", "Candidate", "Operator", "OperatorFn", "Param", "Params",
    "breadcrumbs", "breadcrumbs_ties", "candidate_key", "check_inputs", "compute_dtype", "dare_", "dare_linear",
    "dare_ties", "default_grid", "della", "della_", "della_linear", "evaluate_setting", "get_operator",
    "infer_layer_count", "layer_index", "layer_t", "linear", "merge_state_dicts", "merge_tensor", "model_stock",
    "nuslerp", "nuslerp_tensors", "operator", "outlier_trim_", "param_range", "passthrough", "resolve",
    "resolve_params", "setting_label", "setting_parameters", "slerp", "slerp_tensors", "task_arithmetic", "ties",
    "trim_", "with_layer", "work_dtype",
]
