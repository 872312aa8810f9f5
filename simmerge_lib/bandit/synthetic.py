"""Synthetic replay problems and tables with a planted rule, for tests and teaching."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..operators import setting_label
from .arms import ReplayData


def synthetic_problem(n_pairs: int = 200, n_features: int = 6, n_arms: int = 4, noise: float = 0.02,
                      seed: int = 0) -> ReplayData:
    """A linear-reward replay problem: contexts u ~ N(0, I), quality_k = 0.6 + 0.15 u^T θ_k + noise, θ_k ~ N(0, I/d).
    The best arm varies with the context, so a contextual policy can beat every fixed arm."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(n_pairs, n_features))
    theta = rng.normal(size=(n_features, n_arms)) / np.sqrt(n_features)
    quality = 0.6 + 0.15 * raw @ theta + rng.normal(0, noise, size=(n_pairs, n_arms))
    return ReplayData.from_arrays(quality, raw)


SYNTHETIC_GRID: dict[str, list[dict[str, float]]] = {
    "linear": [{"weight": 0.3}, {"weight": 0.5}, {"weight": 0.7}], "slerp": [{"t": 0.5}],
    "task_arithmetic": [{"lambda": 1.0}], "ties": [{"density": 0.2}, {"density": 0.5}],
    "dare_ties": [{"density": 0.2}, {"density": 0.5}]}


def _planted_quality(method: str, setting: Mapping[str, float], same_base: bool, c: float, h: float, w_star: float
                     ) -> float:
    """The planted merge quality of :func:`synthetic_tables` (its docstring gives the formulas), before noise."""
    if not same_base:
        return 0.3 + 0.05 * (method == "linear")
    if method == "linear":
        return 0.55 + 0.35 * c - 0.6 * (setting["weight"] - w_star) ** 2
    if method == "slerp":
        return 0.6 + 0.3 * c
    if method == "task_arithmetic":
        return 0.7 - 0.2 * c
    if method == "ties":
        return 0.78 - 0.25 * c - 0.3 * h - 0.2 * abs(setting["density"] - 0.3)
    return 0.72 + 0.6 * (h - 0.4) - 0.2 * abs(setting["density"] - 0.2)


def synthetic_tables(n_bases: int = 2, tasks: Sequence[str] = ("reverse", "sort", "max", "min"),
                     experts_per_task: int = 2, cross_base_pairs: int = 8, noise: float = 0.02,
                     seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A features table and a labels table (the columns of chapters 01 and 03) with a planted rule, for tests and
    the notebook when no measured tables exist.

    Each expert has a random task-vector direction u and size s. For a same-base pair, c = cos(u_a, u_b) and
    h = sign conflict; quality: linear (weight w) 0.55 + 0.35 c - 0.6 (w - w*)^2 with w* = 0.5 + 0.4 (s_a - s_b)
    / (s_a + s_b); slerp 0.6 + 0.3 c; task arithmetic 0.7 - 0.2 c; TIES (density d) 0.78 - 0.25 c - 0.3 h
    - 0.2 |d - 0.3|; DARE-TIES 0.72 + 0.6 (h - 0.4) - 0.2 |d - 0.2|. Cross-base pairs: everything scores about
    0.3. Features include c, h, the size ratio and noise."""
    rng = np.random.default_rng(seed)
    experts = [(f"base{b}-{t}{'' if i == 0 else i + 1}", f"base{b}", t)
               for b in range(n_bases) for i in range(experts_per_task) for t in tasks]
    u = {e: rng.normal(size=8) for e, _, _ in experts}
    size = {e: float(rng.uniform(0.5, 1.5)) for e, _, _ in experts}
    pairs = [(i, j) for i in range(len(experts)) for j in range(i + 1, len(experts))
             if experts[i][2] != experts[j][2]]
    same = [p for p in pairs if experts[p[0]][1] == experts[p[1]][1]]
    cross = [p for p in pairs if experts[p[0]][1] != experts[p[1]][1]]
    picked = sorted(rng.choice(len(cross), size=min(cross_base_pairs, len(cross)), replace=False)) if cross else []
    frows, lrows = [], []
    for i, j in same + [cross[k] for k in picked]:
        (a, ba, ta), (b, bb, tb) = experts[i], experts[j]
        sb = ba == bb
        c = float(u[a] @ u[b] / np.linalg.norm(u[a]) / np.linalg.norm(u[b])) if sb else 0.0
        h = float(np.clip(0.45 - 0.4 * c + rng.normal(0, 0.05), 0, 1)) if sb else 0.5
        w_star = 0.5 + 0.4 * (size[a] - size[b]) / (size[a] + size[b])
        parents = [t for t in tasks if t in (ta, tb)]
        for first, second in ((a, b), (b, a)):
            flip = first != a
            for t in parents:
                owns = (ta if first == a else tb) == t
                frows.append({"a": first, "b": second, "task": t, "same_base": int(sb), "task_of_a": float(owns),
                              "st_tv_cos": c,
                              "st_sign_conflict": h, "st_tv_norm_ratio": (size[b] / size[a]) if flip else
                              size[a] / size[b], "st_base_cos": 1.0 if sb else 0.1,
                              "fn_js_mean": 0.5 - 0.4 * c + rng.normal(0, 0.03),
                              "fn_cka_mean": 0.6 + 0.3 * c + rng.normal(0, 0.05),
                              "fn_top1_agree": float(rng.uniform(0.3, 0.9))})
        for method, settings in SYNTHETIC_GRID.items():
            for setting in settings:
                q = _planted_quality(method, setting, sb, c, h, w_star)
                label = setting_label(setting)
                for t in tasks:
                    parent = t in parents
                    lrows.append({"job_key": f"{a}|{b}|{method}|{label}", "a": a, "b": b, "base_a": ba,
                                  "base_b": bb, "same_base": sb, "method": method, "setting": label,
                                  "parameters": json.dumps(setting, sort_keys=True), "task": t,
                                  "parent_task": parent, "score": np.nan, "seed": 0, "n_eval": 0, "seconds": 0.0,
                                  "norm_score": float(q + rng.normal(0, noise)) if parent else 0.1,
                                  "norm_even": np.nan, "norm_odd": np.nan, "char_score": np.nan,
                                  "versions": "{}", "recipe": ""})
    return pd.DataFrame(frows), pd.DataFrame(lrows)
