"""Reading a labels table: merge quality per job, keeping the better parent, win shares by operator or family,
best fixed candidate and the oracle's gap over it, and whether that gap is real (split-half, noise-only null)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..operators import candidate_key
from .jobs import _LATER_COLUMNS, family


PAIR_COLUMNS = ["a", "b", "base_a", "base_b", "same_base"]


def merge_quality(labels: pd.DataFrame) -> pd.DataFrame:
    """One row per pair × method × setting (× seed): quality = mean norm_score over the parent tasks.

    Columns: job_key, a, b, base_a, base_b, same_base, method, setting, seed, tasks (parent tasks, comma-joined),
    quality, quality_even, quality_odd (the same on each half of the evaluation examples; NaN without them),
    mean_score (raw), seconds."""
    parents = labels[labels.parent_task.astype(bool)]
    for column in _LATER_COLUMNS:
        if column not in parents.columns:
            parents = parents.assign(**{column: np.nan})
    keys = ["job_key", *PAIR_COLUMNS, "method", "setting", "seed"]
    grouped = parents.groupby(keys, sort=False, dropna=False)
    frame = grouped.agg(tasks=("task", lambda s: ",".join(sorted(s))), quality=("norm_score", "mean"),
                        quality_even=("norm_even", "mean"), quality_odd=("norm_odd", "mean"),
                        mean_score=("score", "mean"), seconds=("seconds", "first")).reset_index()
    return frame


def best_per_method(quality: pd.DataFrame) -> pd.DataFrame:
    """Each pair's best quality per operator (max over its settings): rows pair × method, with the setting."""
    q = quality.dropna(subset=["quality"]).copy()
    idx = q.groupby(["a", "b", "method"], sort=False).quality.idxmax()
    return q.loc[idx].reset_index(drop=True)


def pair_winners(quality: pd.DataFrame, tol: float = 0.01, level: str = "method") -> pd.DataFrame:
    """Per pair: the winning operator (``level="family"``: operator family, :func:`family`), or ``"tie"`` when no
    operator's best beats every other's by more than tol.

    Columns: a, b, same_base, tasks, winner, best, runner_up, margin (best - runner-up)."""
    if level == "family":
        quality = quality.assign(method=quality.method.map(family))
    elif level != "method":
        raise ValueError(f"level must be 'method' or 'family', got {level!r}")
    best = best_per_method(quality)
    rows = []
    for (a, b), group in best.groupby(["a", "b"], sort=False):
        ordered = group.sort_values("quality", ascending=False, kind="stable")
        top = ordered.iloc[0]
        runner = float(ordered.iloc[1].quality) if len(ordered) > 1 else -np.inf
        margin = float(top.quality) - runner
        rows.append({"a": a, "b": b, "same_base": bool(top.same_base), "tasks": top.tasks,
                     "winner": top.method if margin > tol else "tie", "best": float(top.quality),
                     "runner_up": runner, "margin": margin})
    return pd.DataFrame(rows, columns=["a", "b", "same_base", "tasks", "winner", "best", "runner_up", "margin"])


def win_shares(quality: pd.DataFrame, tol: float = 0.01, same_base_only: bool = True,
               level: str = "method") -> pd.DataFrame:
    """Share of pairs each operator (``level="family"``: each family) wins, by a margin > ``tol`` over every other
    one's best candidate.

    One row per operator (all operators present, zero wins included) plus a ``tie`` row. Columns: method, wins,
    share (wins / all pairs; the shares and the tie share sum to 1), share_decided (wins / pairs not tied)."""
    q = quality[quality.same_base] if same_base_only else quality
    winners = pair_winners(q, tol, level)
    methods = list(dict.fromkeys(q.method if level == "method" else q.method.map(family)))
    counts = winners.winner.value_counts()
    n, decided = len(winners), int((winners.winner != "tie").sum())
    rows = [{"method": m, "wins": int(counts.get(m, 0))} for m in [*methods, "tie"]]
    frame = pd.DataFrame(rows, columns=["method", "wins"])
    frame["share"] = frame.wins / n if n else np.nan
    frame["share_decided"] = np.where(frame.method == "tie", np.nan, frame.wins / decided if decided else np.nan)
    return frame


def max_win_share(shares: pd.DataFrame) -> float:
    """The largest operator share of all pairs (ties excluded): above ~0.6 the choice is nearly trivial."""
    ops = shares[shares.method != "tie"]
    return float(ops.share.max()) if len(ops) else float("nan")


def best_fixed(quality: pd.DataFrame, level: str = "setting") -> tuple[str, str | None]:
    """The (method, setting) with the best mean quality over the pairs (``level="method"``: each method at its best
    setting per pair, setting None)."""
    if level == "method":
        means = best_per_method(quality).groupby("method").quality.mean().dropna()
        if means.empty:
            raise ValueError("best_fixed: no pair has a quality (all normalized scores are NaN)")
        return str(means.idxmax()), None
    means = quality.groupby(["method", "setting"]).quality.mean().dropna()
    if means.empty:
        raise ValueError("best_fixed: no pair has a quality (all normalized scores are NaN)")
    method, setting = means.idxmax()
    return str(method), str(setting)


def oracle_vs_fixed(quality: pd.DataFrame, fixed: tuple[str, str | None] | None = None) -> pd.DataFrame:
    """Per pair: oracle (best method × setting in hindsight) vs the best fixed choice (given, or :func:`best_fixed`
    on these pairs). Columns: a, b, same_base, tasks, oracle, oracle_method, oracle_setting, fixed, gap
    (= oracle - fixed, the regret of always using the fixed choice)."""
    q = quality.dropna(subset=["quality"])
    method, setting = fixed or best_fixed(q)
    rows = []
    for (a, b), group in q.groupby(["a", "b"], sort=False):
        top = group.loc[group.quality.idxmax()]
        chosen = group[(group.method == method) & ((group.setting == setting) if setting else True)]
        fixed_q = float(chosen.quality.max()) if len(chosen) else np.nan
        rows.append({"a": a, "b": b, "same_base": bool(top.same_base), "tasks": top.tasks,
                     "oracle": float(top.quality), "oracle_method": top.method, "oracle_setting": top.setting,
                     "fixed": fixed_q, "gap": float(top.quality) - fixed_q})
    return pd.DataFrame(rows)


def keep_parent(labels: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Per pair of ``labels``: the quality of keeping one expert alone (no merge), scored like a merge.

    For parent p of the pair, q_p = mean over the parent tasks t of score(p, t) / ref(t), with the same normalizer
    ref(t) as the labels (the best parent's own score on t) and the reference table's scores at the labels' n_eval.
    Columns: a, b, same_base, keep_a, keep_b, keep_parent (= max of the two: *keep the better parent*), kept."""
    scores = {(r.model, r.task, int(r.n_eval)): float(r.score) for r in reference.itertuples(index=False)}
    rows = []
    parents = labels[labels.parent_task.astype(bool)]
    for (a, b), pair in parents.groupby(["a", "b"], sort=False):
        n = int(pair.n_eval.iloc[0])
        # a task's normalizer is the row's score / norm_score (the same for every job of the pair)
        ref = (pair.score / pair.norm_score).groupby(pair.task).median()
        keep = {}
        for p in (a, b):
            values = [scores.get((p, t, n), np.nan) / ref[t] if ref[t] > 0 else np.nan for t in ref.index]
            keep[p] = float(np.nanmean(values)) if not np.all(np.isnan(values)) else np.nan
        best = max(keep, key=lambda p: -np.inf if np.isnan(keep[p]) else keep[p])
        rows.append({"a": a, "b": b, "same_base": bool(pair.same_base.iloc[0]), "keep_a": keep[a],
                     "keep_b": keep[b], "keep_parent": keep[best], "kept": best})
    return pd.DataFrame(rows, columns=["a", "b", "same_base", "keep_a", "keep_b", "keep_parent", "kept"])


def _candidate_table(quality: pd.DataFrame, column: str = "quality") -> pd.DataFrame:
    """Pairs × candidates (``method|setting``, :func:`~simmerge_lib.operators.candidate_key`) of one quality
    column."""
    q = quality.assign(candidate=candidate_key(quality.method, quality.setting))
    return q.pivot_table(index=["a", "b"], columns="candidate", values=column, aggfunc="mean", sort=False)


def split_half_gain(quality: pd.DataFrame) -> float:
    """What choosing each pair's candidate is worth on held-out examples, against the best fixed candidate.

    Choose on one half of the evaluation examples (each pair's best candidate, and the best fixed candidate over the
    pairs), score both choices on the other half: gain = mean over pairs of q_other(chosen) - q_other(fixed). The
    mean of both directions (even → odd, odd → even). NaN when the table has no halves."""
    gains = []
    for pick, score in (("quality_even", "quality_odd"), ("quality_odd", "quality_even")):
        chooser, scorer = _candidate_table(quality, pick), _candidate_table(quality, score)
        chooser, scorer = chooser.dropna(how="any"), scorer.dropna(how="any")
        common = chooser.index.intersection(scorer.index)
        if not len(common) or chooser.shape[1] < 2:
            return float("nan")
        chooser, scorer = chooser.loc[common], scorer.loc[common, chooser.columns]
        fixed = chooser.mean().idxmax()
        chosen = chooser.to_numpy().argmax(axis=1)
        held_out = scorer.to_numpy()[np.arange(len(common)), chosen]
        gains.append(float((held_out - scorer[fixed].to_numpy()).mean()))
    return float(np.mean(gains))


def noise_gap(labels: pd.DataFrame, n_sim: int = 200, seed: int = 0) -> float:
    """The oracle - fixed gap that evaluation noise alone would produce: a null-model simulation.

    For each pair, every candidate is given the same true accuracy per parent task, p_t = mean over candidates of
    the measured score; scores are redrawn as Binomial(n_eval, p_t) / n_eval, normalized like the labels, and
    averaged over the tasks. The mean over pairs and draws of max_c q(c) - q(c_0) is the gap an oracle would show
    over a fixed choice even if no candidate were better than another. Pessimistic: in the real table the
    candidates of a pair share their examples, so their errors are correlated and the real noise gap is smaller
    (:func:`split_half_gain` is the honest test)."""
    rng = np.random.default_rng(seed)
    rows = labels[labels.parent_task.astype(bool)].dropna(subset=["norm_score"])
    gaps = []
    for _, pair in rows.groupby(["a", "b"], sort=False):
        score = pair.pivot_table(index=["method", "setting"], columns="task", values="score", aggfunc="mean")
        norm = pair.pivot_table(index=["method", "setting"], columns="task", values="norm_score", aggfunc="mean")
        if len(score) < 2:
            continue
        factor = (norm / score.where(score > 0)).mean().fillna(0.0).to_numpy()  # 1 / ref(t), shared by candidates
        p = score.mean().to_numpy().clip(0, 1)
        n = int(pair.n_eval.iloc[0]) if "n_eval" in pair else 50
        draws = rng.binomial(n, p, size=(n_sim, len(score), len(p))) / n * factor
        q = draws.mean(axis=2)
        gaps.append(float((q.max(axis=1) - q[:, 0]).mean()))
    return float(np.mean(gaps)) if gaps else float("nan")


def summarize(labels: pd.DataFrame, tol: float = 0.01, reference: pd.DataFrame | None = None) -> dict[str, Any]:
    """The headline numbers of a labels table (same-base pairs unless named otherwise): jobs, rows, seconds,
    family win shares with ``max_win_share`` / ``min_family_win_share``, best fixed, the oracle - best fixed gap
    with its split-half and noise-only counterparts, best-merge quality on same- and cross-base pairs and, given
    the ``reference`` table, keeping the better parent and how often the best merge beats it."""
    quality = merge_quality(labels)
    shares = win_shares(quality, tol, level="family")
    ops = shares[shares.method != "tie"]
    same = quality[quality.same_base].dropna(subset=["quality"])
    cross = quality[~quality.same_base].dropna(subset=["quality"])
    fixed = best_fixed(same) if len(same) else (None, None)
    gaps = oracle_vs_fixed(same, fixed) if len(same) else pd.DataFrame({"gap": [], "oracle": []})
    per_job = labels.drop_duplicates("job_key").seconds
    out: dict[str, Any] = {
        "jobs": int(labels.job_key.nunique()), "rows": int(len(labels)),
        "seconds_total": round(float(per_job.sum()), 2),
        "seconds_per_job": round(float(per_job.mean()), 4) if len(per_job) else None,
        "pairs_same_base": int(same.groupby(["a", "b"]).ngroups),
        "pairs_cross_base": int(cross.groupby(["a", "b"]).ngroups),
        "win_share": {r.method: round(float(r.share), 4) for r in shares.itertuples()},
        "max_win_share": round(max_win_share(shares), 4),
        "min_family_win_share": round(float(ops.share.min()), 4) if len(ops) else None,
        "best_fixed": "/".join(str(x) for x in fixed),
        "mean_best_quality_same_base": round(float(gaps.oracle.mean()), 4) if len(gaps) else None,
        "mean_best_quality_cross_base": (round(float(cross.groupby(["a", "b"]).quality.max().mean()), 4)
                                         if len(cross) else None),
        "oracle_minus_best_fixed": round(float(gaps.gap.mean()), 4) if len(gaps) else None,
        "split_half_gain": round(split_half_gain(same), 4) if len(same) else None,
        "noise_gap": round(noise_gap(labels[labels.same_base.astype(bool)]), 4) if len(same) else None,
    }
    if reference is not None:
        for kind, frame in (("", same), ("_cross_base", cross)):
            if not len(frame):
                continue
            best = frame.groupby(["a", "b"]).quality.max()
            keep = keep_parent(labels.merge(best.reset_index()[["a", "b"]]), reference).set_index(["a", "b"])
            keep = keep.loc[best.index]
            if not kind:
                out["mean_keep_parent_quality"] = round(float(keep.keep_parent.mean()), 4)
            out[f"frac_merge_beats_parent{kind}"] = round(float((best > keep.keep_parent).mean()), 4)
    return out
