"""Probe sets: a few unlabeled prompts per task on which two checkpoints are compared (chapter 01).

A probe is a prompt drawn from a task's input distribution, without its answer: the features of chapter 01 only
look at what the models *compute* on it, never at whether they are right, so probes cost no labels. The kit's probe
prompts are the first ``n`` of each task's fixed ``probe`` split (:meth:`simmerge_lib.tasks.Task.split`), disjoint
from the ``eval`` split that labels are measured on, and deterministic: the same ``n`` always gives the same prompts,
and a smaller ``n`` is a prefix of a larger one.

A researcher with their own checkpoints supplies their own prompts as JSON lines, one object per line::

    {"task": "summarise", "prompt": "Summarise: the cat sat on the mat."}

(:func:`load_jsonl`). Blank lines are skipped; anything else that is not such an object is an error naming the file
and the line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .profiles import PROFILES, settings
from .tasks import get_task

#: Probes per task when none is given: the ``default`` profile's (:mod:`simmerge_lib.profiles`, section ``probes``).
DEFAULT_N_PROBES = settings("probes", "default")["n_probes"]


def profile_n_probes(profile: str) -> int:
    """Probes per task of ``profile`` (:mod:`simmerge_lib.profiles`, section ``probes``); a name that is not a
    profile (a transfer or user catalogue's table) gets the default profile's."""
    return settings("probes", profile if profile in PROFILES else "default")["n_probes"]


@dataclass(frozen=True)
class ProbeSet:
    """Unlabeled prompts per task. ``source`` says where they came from (``"kit:n=32"`` or a file path)."""

    prompts: Mapping[str, tuple[str, ...]]
    source: str

    @property
    def tasks(self) -> list[str]:
        return list(self.prompts)

    def __getitem__(self, task: str) -> tuple[str, ...]:
        try:
            return self.prompts[task]
        except KeyError:
            raise KeyError(f"probe set {self.source!r} has no prompts for task {task!r}; "
                           f"it covers {', '.join(self.prompts) or 'no tasks'}") from None

    def key(self) -> str:
        """A content hash of the prompts (what a cache of probe outputs is keyed by), 16 hex digits."""
        payload = json.dumps({t: list(p) for t, p in sorted(self.prompts.items())}, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def task_key(self, task: str) -> str:
        """Content hash of one task's prompts (so adding a task does not invalidate the others' cached outputs)."""
        payload = json.dumps([task, list(self[task])], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def subset(self, tasks: Iterable[str]) -> ProbeSet:
        return ProbeSet({t: self[t] for t in tasks}, self.source)


def kit_probes(tasks: Iterable[str], n: int = DEFAULT_N_PROBES) -> ProbeSet:
    """The first ``n`` prompts of each kit task's ``probe`` split (deterministic; at most 128 a task)."""
    if n < 1:
        raise ValueError(f"n_probes must be at least 1, got {n}")
    prompts = {t: tuple(ex.prompt for ex in get_task(t).split("probe", n)) for t in tasks}
    return ProbeSet(prompts, f"kit:n={n}")


def load_jsonl(path: str | os.PathLike[str], n: int | None = None) -> ProbeSet:
    """Prompts from a JSONL file of ``{"task": ..., "prompt": ...}`` objects, in file order, at most ``n`` a task."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such probe file")
    prompts: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected an object with 'task' and 'prompt', "
                                 f"got {type(row).__name__}")
            missing = [k for k in ("task", "prompt") if k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}")
            task, prompt = row["task"], row["prompt"]
            if not isinstance(task, str) or not task:
                raise ValueError(f"{path}:{lineno}: 'task' must be a non-empty string")
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{path}:{lineno}: 'prompt' must be a non-empty string")
            prompts.setdefault(task, []).append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no probe prompts in the file")
    return ProbeSet({t: tuple(p[:n] if n else p) for t, p in prompts.items()}, str(path))


def write_jsonl(probes: ProbeSet, path: str | os.PathLike[str]) -> Path:
    """Write a probe set as JSONL (the format :func:`load_jsonl` reads), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for task, prompts in probes.prompts.items():
            for prompt in prompts:
                handle.write(json.dumps({"task": task, "prompt": prompt}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
