"""Merging at 111B scale (chapter 07): plan a merge from a config alone, rehearse it at full width, resume it,
spread it over workers.

- **Estimate** (:func:`plan_from_config`, a :class:`CostEstimate`): the model is built on the ``meta`` device
  (shapes, no weights), which gives the tensor inventory with the real tensor names. From it, for ``n`` input
  checkpoints of dtype ``d_in`` merged into dtype ``d_out``::

      bytes_read    = n * sum_t numel_t * |d_in|          bytes_written = sum_t numel_t * |d_out|
      peak_memory   = (n + 2) * max_t numel_t * 4 + overhead          (float32 work copies, see engine)
      wall_time     = bytes_read / throughput / workers   (throughput measured here: :func:`measure_throughput`)

  and the output shard layout (greedy, in tensor order, as :func:`simmerge_lib.engine.plan_merge` lays it out).
- **Rehearse** (:func:`synthesize_checkpoints`, :func:`rehearse`): sharded checkpoints with the real tensor names
  and full-width shapes for a subset of layers; the streaming merge runs in a child process whose peak RSS
  (``wait4``) is compared with the bound; a second run is killed half-way and resumed, and the result is compared
  tensor by tensor with the operator applied to whole tensors in memory.
- **Spread** (:func:`simmerge_lib.engine.merge_distributed`, re-exported here): the output shards are dealt to
  workers (local processes or Ray tasks), each writes its own shards into the shared ``OUT.partial``, then one
  index is written and the folder renamed. Distributed merging belongs to the merging layer
  (:mod:`simmerge_lib.engine.distributed`); the rehearsal runs it.

Submodules: :mod:`.estimate` (tensor inventory, :class:`CostEstimate`, :func:`peak_bound`), :mod:`.synthesize`
(full-width stand-in checkpoints), :mod:`.measure` (measured child processes, comparisons, throughput),
:mod:`.rehearsal` (:func:`rehearse`) and :mod:`.cli` (``simmerge plan-merge``, ``python -m simmerge_lib.scale``).
"""

from __future__ import annotations

from ..engine import assign_shards, merge_distributed, run_worker
from .cli import register
from .estimate import (DENSE_111B, GB, MB, OVERHEAD_BYTES, CostEstimate, TensorSpec, load_config, peak_bound,
                       plan_from_config, shard_layout, tensor_inventory)
from .measure import (RunResult, baseline_rss, baseline_run, compare_with_in_memory, files_identical,
                      finished_shards, io_floor, largest_numel, measure_throughput, merge_command,
                      python_module_command, run_measured)
from .rehearsal import Rehearsal, rehearsal_dict, rehearsal_plan, rehearse
from .synthesize import synthesize_checkpoints, ties_recipe, zlib_crc

__all__ = [
    "DENSE_111B", "GB", "MB", "OVERHEAD_BYTES", "CostEstimate", "Rehearsal", "RunResult", "TensorSpec",
    "assign_shards", "baseline_rss", "baseline_run", "compare_with_in_memory", "files_identical",
    "finished_shards", "io_floor", "largest_numel", "load_config", "measure_throughput", "merge_command",
    "merge_distributed", "peak_bound", "plan_from_config", "python_module_command", "register", "rehearsal_dict",
    "rehearsal_plan", "rehearse", "run_measured", "run_worker", "shard_layout", "synthesize_checkpoints",
    "tensor_inventory", "ties_recipe", "zlib_crc",
]
