"""The streaming merge engine (chapter 02): carries a recipe out on checkpoints of any size, in one process or
spread over workers (chapter 07).

Design, and why:

- **One tensor at a time.** Input shards are never memory-mapped or loaded whole: each tensor's bytes are read
  with ``pread`` into a fresh buffer (page cache is not resident set), rounded to the recipe's compute dtype and
  merged in float32 working copies (:mod:`simmerge_lib.operators`), cast to the output dtype and written with
  ``pwrite`` at its planned offset. The output's safetensors headers are computed before any data is merged (all
  shapes are known from the input headers), so tensors can finish in any order.
- **Recipes as mergekit reads them.** A ``models`` recipe merges every tensor by name; a ``slices`` recipe builds
  the output layer by layer from the sources' layer ranges, renumbering tensor names and writing the new
  ``num_hidden_layers`` (passthrough slices stack layers); ``tokenizer_source`` re-indexes vocabulary rows
  (:mod:`simmerge_lib.vocab`).
- **Bounded memory.** A tensor in flight costs about ``(inputs + 1) x its float32 size``; tensors are admitted
  while the total stays under ``(inputs + 2) x the largest tensor's float32 size``, so peak RSS stays under that
  plus the interpreter, whatever the model size. Tensors merge in parallel threads (torch and pread/pwrite
  release the GIL), small ones beside the largest; ``device="cuda"`` runs the arithmetic on a GPU.
- **Atomic and resumable.** Everything is written into ``OUT.partial``; a shard is renamed from ``*.tmp`` to its
  final name once all its tensors are written; ``resume=True`` keeps finished shards whose size and header match
  the plan (same recipe, same input files); ``OUT`` appears only when complete, and an existing one is replaced
  only with ``force``. Inputs are opened read-only.
- **Errors before work.** Architectures, tensor names, shapes, headers (truncation), index entries outside the
  folder, free disk space and ``OUT`` overlapping an input are checked before anything is written; NaN/Inf in an
  input is checked on every tensor read.
- **Spread over workers.** :func:`merge_distributed` deals the output shards of the same plan to worker processes
  or Ray tasks; the output is byte-identical to :func:`merge`'s.

Submodules, in the order a merge runs through them:

- :mod:`.files`: safetensors headers, ``pread`` / ``pwrite`` of one tensor, shard sizes and the greedy shard grouping;
- :mod:`.layout`: :func:`plan_merge`, every output tensor a :class:`TensorJob` placed in a :class:`ShardLayout`;
- :mod:`.execute`: :func:`run_shards` (threads, memory budget, reused buffers) and :func:`merge_in_memory`;
- :mod:`.driver`: the one merge driver (resume, free disk, index, side files) and :func:`merge`, :func:`merge_multi`;
- :mod:`.distributed`: :func:`merge_distributed`, its workers (:func:`run_worker`) and :func:`assign_shards`;
- :mod:`.cli`: ``simmerge merge``, ``simmerge merge-distributed`` and ``python -m simmerge_lib.engine``.
"""

from __future__ import annotations

from ..recipe import Recipe
from .cli import main, register
from .distributed import BACKENDS, assign_shards, merge_distributed, run_worker
from .driver import (PLAN_FILE, TOKENIZER_FILES, MergeOutput, check_output_location, copy_side_files, merge,
                     merge_multi, output_config, prepare_output, shard_finished, write_output)
from .execute import BufferPool, JobRunner, Lease, merge_in_memory, merge_job, run_shards, to_work
from .files import (DTYPE_NAMES, SAFETENSORS_DTYPES, TensorInfo, header_bytes, parse_size, read_header, read_tensor,
                    shard_groups, tensor_bytes, write_all)
from .layout import InputModel, Shard, ShardLayout, TensorJob, load_input, plan_merge

__all__ = [
    "BACKENDS", "DTYPE_NAMES", "PLAN_FILE", "SAFETENSORS_DTYPES", "TOKENIZER_FILES", "BufferPool", "InputModel",
    "JobRunner", "Lease", "MergeOutput", "Recipe", "Shard", "ShardLayout", "TensorInfo", "TensorJob",
    "assign_shards", "check_output_location", "copy_side_files", "header_bytes", "load_input", "main", "merge",
    "merge_distributed", "merge_in_memory", "merge_job", "merge_multi", "output_config", "parse_size",
    "plan_merge", "prepare_output", "read_header", "read_tensor", "register", "run_shards", "run_worker",
    "shard_finished", "shard_groups", "tensor_bytes", "to_work", "write_all", "write_output",
]
