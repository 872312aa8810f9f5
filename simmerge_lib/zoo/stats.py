"""What a built catalogue looks like: how much of each skill its bases hold, and its experts' task vectors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..catalogue import Catalogue
from ..checkpoint import load_state_dict


def base_skill_ratio(catalogue: Catalogue) -> float:
    """How much of each skill the bases already hold: the mean over bases and tasks of
    score(base, t) / mean score of that base's experts of t on t (DESIGN.md: 0.2-0.7 makes merges realistic)."""
    ratios = []
    for base in catalogue.bases():
        for task in catalogue.tasks:
            own = [e.scores[task] for e in catalogue.experts(base.name) if task in e.tasks and task in e.scores]
            if own and np.mean(own) > 0 and task in base.scores:
                ratios.append(base.scores[task] / float(np.mean(own)))
    return float(np.mean(ratios)) if ratios else float("nan")


def task_vector_stats(catalogue: Catalogue) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Norms of every expert's task vector and the pairwise cosine matrix (experts × experts, NaN across bases).

    ``||tau||_2`` with tau = theta_expert - theta_base over all tensors, and the relative size
    ``||tau|| / ||theta_base||``; cos(a, b) = <tau_a, tau_b> / (||tau_a|| ||tau_b||) for experts of the same base."""
    vectors: dict[str, torch.Tensor] = {}
    base_norms: dict[str, float] = {}
    bases = {b.name: load_state_dict(catalogue.path(b.name)) for b in catalogue.bases()}
    for name, state in bases.items():
        base_norms[name] = float(torch.cat([v.float().flatten() for v in state.values()]).norm())
    for e in catalogue.experts():
        sd = load_state_dict(catalogue.path(e.name))
        base = bases[e.base or ""]
        vectors[e.name] = torch.cat([(sd[k].float() - base[k].float()).flatten() for k in sorted(sd)])
    names = list(vectors)
    norms = pd.DataFrame({"expert": names, "base": [catalogue.entry(n).base for n in names],
                          "task": [catalogue.entry(n).tasks[0] for n in names],
                          "style": [catalogue.entry(n).recipe.get("style") for n in names],
                          "tv_norm": [float(vectors[n].norm()) for n in names]})
    norms["relative_norm"] = norms.tv_norm / norms.base.map(base_norms)
    cos = pd.DataFrame(float("nan"), index=names, columns=names)
    for a in names:
        for b in names:
            if catalogue.entry(a).base == catalogue.entry(b).base:
                cos.loc[a, b] = float(torch.nn.functional.cosine_similarity(vectors[a], vectors[b], dim=0))
    return norms, cos
