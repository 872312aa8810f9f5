"""Carrying a :class:`~.layout.ShardLayout` out: tensor jobs merged in threads under a memory budget, buffers
reused from tensor to tensor, each tensor written with ``pwrite`` at its planned offset; and the same jobs in
memory (:func:`merge_in_memory`)."""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import CheckpointError, load_state_dict
from ..kernels import is_exact, round_
from ..operators import merge_tensor, resolve_params, work_dtype
from ..recipe import Recipe
from .files import TensorInfo, read_tensor, tensor_bytes, write_all
from .layout import ShardLayout, TensorJob, plan_merge

class _Budget:
    """Admit tensor jobs while the bytes in flight stay under a limit (always admit one when nothing is in flight)."""

    def __init__(self, limit: int):
        self.limit, self.used, self.cond = limit, 0, threading.Condition()
        self.failed = False

    def acquire(self, n: int) -> bool:
        with self.cond:
            while not self.failed and self.used and self.used + n > self.limit:
                self.cond.wait()
            if self.failed:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()


def _new(nbytes: int, dtype: torch.dtype, shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device=device)


class BufferPool:
    """Buffers reused from tensor to tensor. A fresh buffer costs its first touch of every page (page faults, which can
    cost more than reading the bytes from the page cache) and glibc maps every allocation above 32 MB afresh, so a
    merge that allocated per tensor paid that on most of its bytes. A job takes its buffers through a :class:`Lease`
    and gives them back when its tensor is written; buffers in use and free ones together stay under ``limit`` bytes
    (the plan's memory bound) whenever the jobs' own do, so reuse adds nothing to peak memory."""

    def __init__(self, limit: int):
        self.limit, self.free, self.lock = limit, [], threading.Lock()
        self.held = 0  # bytes of the buffers taken and not given back

    def take(self, nbytes: int) -> Tensor:
        with self.lock:
            fits = [i for i, b in enumerate(self.free) if nbytes <= b.numel() <= 2 * nbytes + (1 << 20)]
            buf = self.free.pop(min(fits, key=lambda i: self.free[i].numel())) if fits else None
            if buf is None:
                # room for a new buffer: drop free ones that no job can use before the total passes the limit
                while self.free and self.held + nbytes + sum(b.numel() for b in self.free) > self.limit:
                    self.free.pop(min(range(len(self.free)), key=lambda i: self.free[i].numel()))
            self.held += buf.numel() if buf is not None else max(nbytes, 1)
        return buf if buf is not None else torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def give(self, buffers: Sequence[Tensor]) -> None:
        with self.lock:
            self.free.extend(buffers)
            self.held -= sum(b.numel() for b in buffers)
            while self.free and self.held + sum(b.numel() for b in self.free) > self.limit:
                self.free.pop(min(range(len(self.free)), key=lambda i: self.free[i].numel()))

    def lease(self) -> Lease:
        return Lease(self)


class Lease:
    """The buffers one job took from a :class:`BufferPool`, all given back when the lease closes."""

    def __init__(self, pool: BufferPool):
        self.pool, self.taken = pool, []

    def __call__(self, nbytes: int, dtype: torch.dtype, shape: Sequence[int]) -> Tensor:
        buf = self.pool.take(nbytes)
        self.taken.append(buf)
        return buf[:nbytes].view(dtype).view(tuple(shape))

    def release(self, tensor: Tensor) -> None:
        """Give back early the buffer ``tensor`` was taken in (a read buffer once converted)."""
        for i, buf in enumerate(self.taken):
            if buf.data_ptr() == tensor.data_ptr():
                self.pool.give([self.taken.pop(i)])
                return

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.give(self.taken)
        self.taken = []


def _check_finite(x: Tensor, info: TensorInfo | Path, name: str) -> None:
    if x.numel() and x.is_floating_point():
        lo, hi = torch.aminmax(x)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            where = info.path if isinstance(info, TensorInfo) else info
            raise CheckpointError(f"{where}: tensor {name!r} contains NaN or Inf")


def to_work(raw: Tensor, compute: torch.dtype, alloc: Any = _new) -> Tensor:
    """A stored tensor as a working copy: rounded to the compute dtype (as mergekit casts it on loading), held in
    float32 (float64 for a float64 merge). Reuses ``raw``'s memory when it already is a float32 tensor; else the
    copy goes into ``alloc(nbytes, dtype, shape)``."""
    work = work_dtype(compute)
    if raw.dtype == work:
        return round_(raw, compute)
    out = alloc(raw.numel() * work.itemsize, work, raw.shape).copy_(raw)
    if raw.dtype == compute or is_exact(compute) or raw.dtype.itemsize < compute.itemsize:
        return out  # exact: no rounding needed
    return round_(out, compute)


def _cast(x: Tensor, dtype: torch.dtype, alloc: Any) -> Tensor:
    return x if x.dtype == dtype else alloc(x.numel() * dtype.itemsize, dtype, x.shape).copy_(x)


def merge_job(plan: ShardLayout, job: TensorJob, load: Any, alloc: Any = _new) -> Tensor:
    """The merged tensor of ``job`` in its output dtype, from ``load(info, name) -> stored tensor`` (owned by the
    caller's loader; it may be modified), new tensors from ``alloc(nbytes, dtype, shape)``. Shared by the
    streaming engine (which reuses buffers) and the in-memory path."""
    infos = job.inputs + ([job.base] if job.base is not None else [])
    names = job.input_names + ([job.base_name] if job.base is not None else [])
    if job.compute is None:  # not floating point: copied from the base (or the first input)
        return load(job.base, job.base_name) if job.base is not None else load(job.inputs[0], names[0])
    if plan.op.identity is not None and not job.vocab and plan.op.identity(*resolve_params(
            plan.op, job.name, job.settings, plan.recipe.parameters, job.t, job.input_names,
            job.slice_settings)):  # a copy (passthrough): cast the stored tensor, no float32 working copy
        raw = load(infos[0], names[0])
        out = _cast(_cast(raw, job.compute, alloc), job.out_dtype, alloc)
        if out.dtype.itemsize < raw.dtype.itemsize:
            _check_finite(out, plan.reference.folder, f"{job.name} (cast to {job.out_dtype})")
        return out
    work = []
    for info, name in zip(infos, names):
        raw = load(info, name)
        work.append(to_work(raw, job.compute, alloc))
        if work[-1].data_ptr() != raw.data_ptr() and hasattr(alloc, "release"):
            alloc.release(raw)  # the stored copy is no longer needed: the next read reuses it
        del raw
    if job.vocab:
        assert plan.vocab is not None
        work = plan.vocab.align(work, job.models, job.models[-1] if job.base is not None else
                                plan.recipe.base_model)
    base = work.pop() if job.base is not None else None
    merged = merge_tensor(plan.op, job.name, work, base, job.settings, plan.recipe.parameters, job.t,
                          dtype=job.compute, input_names=job.input_names, slice_settings=job.slice_settings)
    del work, base
    if job.out_dtype != job.compute:  # a cast straight to the compute dtype rounds on the way
        round_(merged, job.compute)
    out = _cast(merged, job.out_dtype, alloc)
    del merged
    if out.numel():
        lo, hi = torch.aminmax(out)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise CheckpointError(f"{plan.reference.folder}: merged tensor {job.name!r} is Inf/NaN in "
                                  f"{job.out_dtype} (overflow)")
    return out


class JobRunner:
    """Carries out the tensor jobs of one :class:`ShardLayout` into ``partial`` (one instance per :func:`run_shards`
    call): holds the input and output file descriptors, writes each shard's header when the shard is opened, merges
    and writes one tensor per :meth:`run_job` (thread-safe) and renames a shard to its final name when its last
    tensor is written. Public so that tests can inject faults into :meth:`run_job` (a crash mid-merge)."""

    def __init__(self, plan: ShardLayout, partial: Path, device: torch.device, progress: Any):
        self.plan, self.partial, self.device, self.progress = plan, partial, device, progress
        self.pool = BufferPool(plan.memory_bound)
        self.fds: dict[Path, int] = {}
        self.out_fds: dict[int, int] = {}
        self.remaining: dict[int, int] = {}
        self.lock = threading.Lock()

    def open_inputs(self) -> None:
        for model in self.plan.inputs.values():
            for info in model.tensors.values():
                if info.path not in self.fds:
                    self.fds[info.path] = os.open(info.path, os.O_RDONLY)

    def open_shard(self, index: int) -> None:
        shard = self.plan.shards[index]
        tmp = self.partial / (shard.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, shard.size)  # a full disk shows up now, not half-way through
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.ENOSPC:
                raise CheckpointError(f"{tmp}: disk full (needs {shard.size} bytes)") from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise CheckpointError(f"{tmp}: cannot allocate ({exc.strerror})") from None
            fd = os.open(tmp, os.O_RDWR)
        write_all(fd, memoryview(shard.header), 0, tmp)
        with self.lock:
            self.out_fds[index] = fd
            self.remaining[index] = len(shard.jobs)

    def load(self, info: TensorInfo, name: str, alloc: Any = _new) -> Tensor:
        raw = read_tensor(self.fds[info.path], info, alloc(info.nbytes, info.dtype, info.shape))
        if self.device.type != "cpu":
            raw = raw.to(self.device, non_blocking=False)
        _check_finite(raw, info, name)
        return raw

    def run_job(self, job: TensorJob) -> None:
        shard = self.plan.shards[job.shard]
        with torch.no_grad(), self.pool.lease() as lease:
            alloc = lease if self.device.type == "cpu" else functools.partial(_new, device=self.device)
            out = merge_job(self.plan, job, lambda info, name: self.load(info, name, lease), alloc)
            if out.device.type != "cpu":
                out = out.cpu()
            write_all(self.out_fds[job.shard], tensor_bytes(out), job.offset, self.partial / (shard.name + ".tmp"))
            del out
        with self.lock:
            self.remaining[job.shard] -= 1
            done = self.remaining[job.shard] == 0
            if done:
                os.close(self.out_fds.pop(job.shard))
        if done:
            os.replace(self.partial / (shard.name + ".tmp"), self.partial / shard.name)
        self.progress.update(job.nbytes)

    def close(self) -> None:
        for fd in list(self.fds.values()) + list(self.out_fds.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        self.out_fds.clear()


def run_shards(plan: ShardLayout, partial_dir: Path, device: torch.device, shards: Sequence[int], threads: int,
               bar: Any = None, budget_limit: int | None = None) -> None:
    """Write the given output shards of ``plan`` into ``partial_dir`` with ``threads`` merge threads.

    Tensors in flight are bounded by ``budget_limit`` bytes (default: :attr:`ShardLayout.memory_bound`), which is
    what bounds peak memory; the first error stops queuing, lets running tensors finish, and is raised. Within a
    shard the largest tensors start first, so that small ones fill the other threads while a large one runs.
    Torch's own intra-op threads are set to 1 meanwhile: the merge threads are the parallelism, and thousands of
    small block operations each forking a thread team would wait on one another whenever the machine is busy.
    Used by :func:`~.driver.merge` and by the distributed workers (:mod:`.distributed`), each writing its own
    shards."""
    shards = list(shards)
    if not shards:
        return
    limit = budget_limit or plan.memory_bound
    runner = JobRunner(plan, partial_dir, device, bar if bar is not None else _NullBar())
    budget = _Budget(limit)
    errors: list[BaseException] = []

    def run(job: TensorJob) -> None:
        try:
            if not budget.failed:
                runner.run_job(job)
        except BaseException as exc:
            errors.append(exc)
            budget.fail()
            raise
        finally:
            budget.release(job.cost)

    intra_op = torch.get_num_threads()
    try:
        runner.open_inputs()
        torch.set_num_threads(1)  # before the pool's threads start: each takes the setting when it first runs an op
        with ThreadPoolExecutor(threads, thread_name_prefix="simmerge") as pool:
            for i in shards:
                try:
                    runner.open_shard(i)
                except BaseException:
                    budget.fail()  # queued tensors are skipped; running ones finish
                    raise
                for job in sorted(plan.shards[i].jobs, key=lambda j: -j.cost):
                    if not budget.acquire(job.cost):
                        break
                    pool.submit(run, job)
                if budget.failed:
                    break
        if errors:
            raise errors[0]
    finally:
        torch.set_num_threads(intra_op)
        runner.close()


class _NullBar:
    def update(self, n: int) -> None:
        pass


def merge_in_memory(recipe: Recipe, compute_dtype: str | None = None) -> dict[str, Tensor]:
    """The recipe's result as a state dict, loading the inputs whole (small models): the same plan and operator
    code as the streaming engine, without its reader and writer."""
    plan = plan_merge(recipe, "1TB", compute_dtype)
    states = {folder: load_state_dict(folder) for folder in plan.inputs}
    by_path = {info.path: folder for folder, m in plan.inputs.items() for info in m.tensors.values()}

    def load(info: TensorInfo, name: str) -> Tensor:
        x = states[by_path[info.path]][name].clone()
        _check_finite(x, info.path, name)
        return x

    with torch.no_grad():
        return {j.name: merge_job(plan, j, load) for j in plan.jobs}
