"""Scoring one split and the headline metrics: SimMerge's choice against every baseline of :data:`BASELINES`,
gap closure with a cluster bootstrap, rank correlations, abstentions (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from .model import Predictor, fit_predictor, similarity_columns
from .splits import Split, check_split
from .training import keep_parent_quality, pair_quality


#: A choice within ``TOL`` of the oracle is a hit; wins and losses need a margin > ``TOL``.
TOL = 0.01


#: The baselines every evaluation reports beside SimMerge (columns of the records, see :func:`evaluate_split`).
BASELINES = ("best_fixed", "keep_parent", "task_pair_lookup", "ablation", "classifier", "oracle")


def task_pair_lookup(train: pd.DataFrame, test: pd.DataFrame, fixed: str) -> pd.Series:
    """Per test pair: the candidate with the best mean quality over the training pairs of the same two tasks
    (``fixed`` where no training pair has them)."""
    def task_pair(frame: pd.DataFrame) -> pd.Series:
        return frame.groupby("pair", sort=False).task.agg(lambda s: "+".join(sorted(s)))

    quality = pair_quality(train)
    by_tasks = quality.groupby(task_pair(train).loc[quality.index].to_numpy()).mean()
    best = by_tasks.idxmax(axis=1)
    return task_pair(test).map(best).fillna(fixed)


def evaluate_split(table: pd.DataFrame, split: Split, family: str = "forest", feature_set: str = "all",
                   margin: float = 0.0, seed: int = 0, baselines: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fit on the split's training pairs, choose for its test pairs.

    Returns (records, candidates): one record per test pair — ``simmerge`` (the chosen candidate's measured
    quality), ``best_fixed``, ``oracle``, ``keep_parent`` (measured), the baselines of :data:`BASELINES`, the
    predicted keep-parent quality and ``abstain`` — and one row per test pair × candidate (predicted, measured)."""
    check_split(table, split)
    train = table[table.pair.isin(split.train)]
    test = table[table.pair.isin(split.test)]
    model = fit_predictor(train, family, feature_set, seed, margin)
    quality = pair_quality(test)
    ranked = model.rank(test)
    advice = model.recommend(test).set_index("pair")
    keep = keep_parent_quality(test)
    picks = {"simmerge": advice.candidate}
    if baselines:
        ablated = fit_predictor(train, family, feature_set, seed, margin, task_conditioned=True,
                                ablate=[c for c in similarity_columns(train) if c in model.feature_names])
        picks.update({"ablation": ablated.rank(test).query("rank == 1").set_index("pair").candidate,
                      "classifier": model.classify(test),
                      "task_pair_lookup": task_pair_lookup(train, test, model.fixed)})
    records = pd.DataFrame(index=quality.index)
    for name, choice in picks.items():
        choice = choice.reindex(quality.index).fillna(model.fixed)
        records[name] = [quality.at[p, c] for p, c in choice.items()]
    records["chosen"] = advice.candidate.reindex(quality.index)
    records["best_fixed"] = quality[model.fixed]
    records["oracle"] = quality.max(axis=1)
    records["keep_parent"] = keep.reindex(quality.index)
    records["keep_predicted"] = advice.keep_predicted.reindex(quality.index)
    records["predicted"] = advice.predicted.reindex(quality.index)
    records["abstain"] = advice.abstain.reindex(quality.index).astype(bool)
    records.insert(0, "split", split.name)
    records["fixed_candidate"] = model.fixed
    measured = quality.stack().rename("quality").reset_index()
    measured.columns = ["pair", "candidate", "quality"]
    cand = ranked.merge(measured, on=["pair", "candidate"], how="left").assign(split=split.name, fixed=model.fixed)
    return records.rename_axis("pair").reset_index(), cand


def transfer_records(predictor: Predictor, train_table: pd.DataFrame, transfer_table: pd.DataFrame
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Apply a predictor unchanged to another catalogue's pairs: the best fixed candidate comes from ``train_table``
    (the catalogue it was trained on); nothing about the new catalogue is used but its features."""
    quality = pair_quality(transfer_table)
    fixed = str(pair_quality(train_table).mean().idxmax())
    advice = predictor.recommend(transfer_table).set_index("pair")
    records = pd.DataFrame(index=quality.index)
    records["split"] = "transfer"
    records["simmerge"] = [quality.at[p, c] for p, c in advice.candidate.reindex(quality.index).items()]
    records["best_fixed"] = quality[fixed] if fixed in quality.columns else np.nan
    records["oracle"] = quality.max(axis=1)
    records["keep_parent"] = keep_parent_quality(transfer_table).reindex(quality.index)
    records["abstain"] = advice.abstain.reindex(quality.index).astype(bool)
    measured = quality.stack().rename("quality").reset_index()
    measured.columns = ["pair", "candidate", "quality"]
    cand = predictor.rank(transfer_table).merge(measured, on=["pair", "candidate"]).assign(split="transfer")
    return records.rename_axis("pair").reset_index(), cand


def gap_closure(records: pd.DataFrame, column: str = "simmerge") -> float:
    """(mean chosen - mean best fixed) / (mean oracle - mean best fixed) over the records (1 = the oracle, 0 = no
    better than the best fixed candidate)."""
    gap = records.oracle.mean() - records.best_fixed.mean()
    return float((records[column].mean() - records.best_fixed.mean()) / gap) if gap > 1e-12 else float("nan")


def cluster_bootstrap_ci(records: pd.DataFrame, stat: Callable[[pd.DataFrame], float] = gap_closure,
                         cluster: str = "split", n_boot: int = 1000, seed: int = 0, level: float = 0.95
                         ) -> tuple[float, float]:
    """Percentile interval of ``stat`` when whole clusters (held-out groups: a task, or an expert) are resampled
    with replacement: pairs of one group are correlated, so they move together."""
    groups = [g for _, g in records.groupby(cluster, sort=False)]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(groups), len(groups))
        draws.append(stat(pd.concat([groups[i] for i in pick], ignore_index=True)))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return float(np.nanpercentile(draws, lo)), float(np.nanpercentile(draws, hi))


def spearman(candidates: pd.DataFrame) -> float:
    """Spearman's ρ of predicted against measured quality over all held-out pairs × candidates."""
    c = candidates.dropna(subset=["predicted", "quality"])
    return float(spearmanr(c.predicted, c.quality).statistic) if len(c) > 2 else float("nan")


def within_pair_spearman(candidates: pd.DataFrame) -> float:
    """The mean over pairs of Spearman's ρ between predicted and measured quality of the pair's candidates."""
    values = []
    for _, g in candidates.dropna(subset=["predicted", "quality"]).groupby(["split", "pair"]):
        if len(g) > 2 and np.ptp(g.quality) > 0 and np.ptp(g.predicted) > 0:
            values.append(spearmanr(g.predicted, g.quality).statistic)
    return float(np.mean(values)) if values else float("nan")


def abstain_precision(records: pd.DataFrame) -> float:
    """Among held-out pairs where the predictor advised keeping a parent, the share where keeping the better parent
    really beat the merge it would have chosen (NaN when it never abstained)."""
    held = records[records.abstain]
    return float((held.keep_parent > held.simmerge).mean()) if len(held) else float("nan")


def selection_metrics(records: pd.DataFrame, candidates: pd.DataFrame, tol: float = TOL) -> dict[str, float]:
    """Headline metrics of an evaluation: qualities of SimMerge and every baseline, gap closures, regret, hit rate,
    Spearman (pooled and within pairs), abstentions."""
    out: dict[str, float] = {"pairs": float(records.pair.nunique()), "records": float(len(records))}
    for col in ["simmerge", *BASELINES]:
        if col in records.columns:
            out[f"quality_{col}"] = float(records[col].mean())
    for col in ["simmerge", "ablation", "classifier", "task_pair_lookup"]:
        if col in records.columns:
            out[f"gap_closure_{col}"] = gap_closure(records, col)
    out["mean_regret"] = float((records.oracle - records.simmerge).mean())
    out["selection_accuracy"] = float((records.simmerge >= records.oracle - tol).mean())
    out["win_rate_vs_fixed"] = float((records.simmerge > records.best_fixed + tol).mean())
    out["loss_rate_vs_fixed"] = float((records.simmerge < records.best_fixed - tol).mean())
    out["spearman"] = spearman(candidates)
    out["spearman_within_pair"] = within_pair_spearman(candidates)
    out["abstain_rate"] = float(records.abstain.mean())
    out["abstain_precision"] = abstain_precision(records)
    out["merge_beats_parent_when_not_abstaining"] = float(
        (records.loc[~records.abstain, "simmerge"] > records.loc[~records.abstain, "keep_parent"]).mean())
    return out
