"""Held-out splits of the evaluation protocol: leave-one-task-out, leave-one-expert-out with siblings, the
inner grouped folds, and :func:`check_split`, which proves nothing held out reaches training."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Split:
    """One held-out group: the pairs trained on and the pairs tested on (keys ``"a|b"``)."""

    name: str
    kind: str  # "task" or "expert"
    held_out: tuple[str, ...]  # the task, or the expert and its siblings
    train: tuple[str, ...]
    test: tuple[str, ...]


def _pairs(table: pd.DataFrame) -> pd.DataFrame:
    """Per pair: a, b, the set of its tasks and its two experts' (task, base) identities."""
    info = table.groupby("pair", sort=False).agg(a=("a", "first"), b=("b", "first"), base=("base_a", "first"),
                                                 tasks=("task", frozenset))
    return info


def expert_tasks(table: pd.DataFrame) -> dict[str, str]:
    """Each expert's task: the task of the rows it owns."""
    return dict(zip(table.owner, table.task))


def siblings(table: pd.DataFrame) -> dict[str, set[str]]:
    """Each expert's siblings and itself: the experts of the same task on the same base."""
    task_of = expert_tasks(table)
    base_of = {**dict(zip(table.a, table.base_a)), **dict(zip(table.b, table.base_b))}
    groups: dict[tuple[str, str], set[str]] = {}
    for e, t in task_of.items():
        groups.setdefault((t, base_of[e]), set()).add(e)
    return {e: groups[(t, base_of[e])] for e, t in task_of.items()}


def leave_one_task_out(table: pd.DataFrame) -> list[Split]:
    """One split per task t: test = the pairs with t among their tasks; train = every other pair (so t's rows,
    features and pairs never reach training)."""
    info = _pairs(table)
    splits = []
    for task in sorted(table.task.unique()):
        has = info.tasks.map(lambda ts, t=task: t in ts)
        splits.append(Split(f"task={task}", "task", (task,), tuple(info.index[~has]), tuple(info.index[has])))
    return splits


def leave_one_expert_out(table: pd.DataFrame) -> list[Split]:
    """One split per expert e: test = the pairs with e; train = the pairs with neither e nor any sibling of e (the
    same task on the same base: a near-duplicate that would let a per-task lookup pass for a prediction)."""
    info = _pairs(table)
    sib = siblings(table)
    splits = []
    for expert in sorted(sib):
        held = sib[expert]
        touches = info.a.isin(held) | info.b.isin(held)
        test = info.a.eq(expert) | info.b.eq(expert)
        splits.append(Split(f"expert={expert}", "expert", tuple(sorted(held)), tuple(info.index[~touches]),
                            tuple(info.index[test])))
    return splits


def grouped_folds(table: pd.DataFrame, kind: str, k: int = 3, seed: int = 0) -> list[Split]:
    """``k`` folds of held-out groups for the inner cross-validation: tasks (``kind="task"``) or expert sibling
    groups (``"expert"``), each fold built like the outer splits."""
    rng = np.random.default_rng(seed)
    info = _pairs(table)
    if kind == "task":
        groups = [frozenset([t]) for t in sorted(table.task.unique())]
    else:
        groups = sorted({frozenset(s) for s in siblings(table).values()}, key=sorted)
    if len(groups) < 2:
        return []
    order = rng.permutation(len(groups))
    folds = [[groups[i] for i in order[j::k]] for j in range(min(k, len(groups)))]
    splits = []
    for j, fold in enumerate(folds):
        held = frozenset().union(*fold)
        if kind == "task":
            test = info.tasks.map(lambda ts, h=held: bool(ts & h))
            train = ~test
        else:
            test = info.a.isin(held) | info.b.isin(held)
            train = ~test
        splits.append(Split(f"fold{j}", kind, tuple(sorted(held)), tuple(info.index[train]), tuple(info.index[test])))
    return [s for s in splits if s.train and s.test]


def check_split(table: pd.DataFrame, split: Split) -> None:
    """Raise AssertionError if anything held out reaches training: a shared pair, a held-out task among a
    training pair's tasks, or a held-out expert or sibling in a training pair."""
    train, test = set(split.train), set(split.test)
    assert not train & test, f"{split.name}: pairs in both train and test"
    rows = table[table.pair.isin(train)]
    if split.kind == "task":
        assert not rows.task.isin(split.held_out).any(), f"{split.name}: held-out task in training rows"
        assert not rows.owner.map(expert_tasks(table)).isin(split.held_out).any() and \
            not rows.other.map(expert_tasks(table)).isin(split.held_out).any(), f"{split.name}: held-out task's expert"
    else:
        assert not (rows.a.isin(split.held_out) | rows.b.isin(split.held_out)).any(), \
            f"{split.name}: held-out expert or sibling in a training pair"
