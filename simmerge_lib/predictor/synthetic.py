"""Synthetic features, labels and reference tables with a planted rule, for tests and teaching."""

from __future__ import annotations

import numpy as np
import pandas as pd


def synthetic_tables(n_tasks: int = 4, n_bases: int = 2, seed: int = 0, noise: float = 0.01
                     ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Features, labels and reference tables with a planted rule, for tests and teaching.

    Per base, two experts per task (siblings); expert e has a direction d_e (a random share of one shared direction
    plus noise) and a size s_e. Same-base pair (a, b): ``st_tv_cos`` = cos(d_a, d_b); on the owner's task, the
    owner keeps q = 0.9 - 0.1 s_other under every candidate, plus: task arithmetic (lambda 1) + 0.08 (1 - 2 cos),
    TIES - 0.08 (1 - 2 cos), linear 0: task arithmetic wins when the task vectors are nearly orthogonal, TIES when
    they align. ``fn_b_base_kl`` = s_other (the other expert's size, seen on the owner's probes); the other expert
    alone keeps 0.5 of the task. Cross-base pairs get features but no labels."""
    rng = np.random.default_rng(seed)
    tasks = ["reverse", "sort", "max", "min", "double", "shift"][:n_tasks]
    shared = rng.normal(size=8)
    experts = [(f"base{b}-{t}" + ("" if k == 0 else "-2"), f"base{b}", t)
               for b in range(n_bases) for k in range(2) for t in tasks]
    direction = {e: rng.uniform(0, 2.5) * shared + rng.normal(size=8) for e, _, _ in experts}
    size = {e: float(rng.uniform(0, 1)) for e, _, _ in experts}
    grid = [("linear", "weight=0.5", '{"weight": 0.5}'), ("task_arithmetic", "lambda=1", '{"lambda": 1.0}'),
            ("ties", "density=0.5", '{"density": 0.5}')]
    frows, lrows, rrows = [], [], []
    for i, (a, ba, ta) in enumerate(experts):
        rrows += [{"model": a, "task": t, "n_eval": 100, "score": 1.0 if t == ta else 0.5} for t in tasks]
        for j, (b, bb, tb) in enumerate(experts):
            if i == j or ta == tb:
                continue
            cos = float(direction[a] @ direction[b] / np.linalg.norm(direction[a]) / np.linalg.norm(direction[b]))
            cos = cos if ba == bb else 0.0
            for t in (ta, tb):
                owner_is_a = t == ta
                frows.append({"a": a, "b": b, "task": t, "same_base": int(ba == bb), "task_of_a": float(owner_is_a),
                              "st_tv_cos": cos, "fn_b_base_kl": size[b] + rng.normal(0, 0.02),
                              "fn_a_base_kl": size[a] + rng.normal(0, 0.02), "fn_base_entropy": 0.5})
            if i > j or ba != bb:
                continue  # labels: same-base pairs, in catalogue order
            for method, setting, params in grid:
                bonus = {"linear": 0.0, "task_arithmetic": 0.08, "ties": -0.08}[method] * (1 - 2 * cos)
                for t, other in ((ta, b), (tb, a)):
                    q = 0.9 - 0.1 * size[other] + bonus + rng.normal(0, noise)
                    lrows.append({"job_key": f"{a}|{b}|{method}|{setting}", "a": a, "b": b, "base_a": ba,
                                  "base_b": bb, "same_base": True, "method": method, "setting": setting,
                                  "parameters": params, "task": t, "parent_task": True, "score": q, "norm_score": q,
                                  "norm_even": np.nan, "norm_odd": np.nan, "char_score": np.nan, "seed": 0,
                                  "n_eval": 100, "seconds": 0.0, "versions": "{}", "recipe": ""})
    return pd.DataFrame(frows), pd.DataFrame(lrows), pd.DataFrame(rrows)
