"""The functional ``fn_*`` features: how two models' probe outputs differ (next-token distributions, hidden states
layer by layer, attention patterns, and the answer position relative to the bases)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from .columns import NAN
from .probing import ProbeOutputs
from .stats import _nanstat, _np, cosine, depth_slope, entropy_rows, js_rows, kl_rows, linear_cka, row_cosine

#: Below this hidden width the functional features run their matrix products on one BLAS thread: for small
#: matrices a second thread only adds synchronisation, which dominates the arithmetic on a busy CPU.
SMALL_WIDTH = 1024


def _blas_threads_for(outputs: Iterable[ProbeOutputs]) -> contextlib.AbstractContextManager[Any]:
    widths = [h.shape[-1] for out in outputs for h in out.hidden[:1]]
    return threadpool_limits(1) if widths and max(widths) <= SMALL_WIDTH else contextlib.nullcontext()


def _align_layers(n_a: int, n_b: int) -> list[tuple[int, int]]:
    """Layer pairs matched by relative depth (identity when the depths agree)."""
    if n_a == n_b:
        return [(i, i) for i in range(n_a)]
    return [(i, round(i * (n_b - 1) / max(n_a - 1, 1))) for i in range(n_a)]


def _hidden_similarity(out_a: ProbeOutputs, out_b: ProbeOutputs) -> tuple[list[float], list[float]]:
    """Per hidden layer (matched by relative depth): linear CKA, and the mean per-position cosine of the hidden
    states (NaN where the widths differ)."""
    cka, hcos = [], []
    for i, j in _align_layers(len(out_a.hidden), len(out_b.hidden)):
        ha, hb = _np(out_a.hidden[i]), _np(out_b.hidden[j])
        cka.append(linear_cka(ha, hb))
        hcos.append(float(row_cosine(ha, hb).mean()) if ha.shape[-1] == hb.shape[-1] else NAN)
    return cka, hcos


def _attention_similarity(out_a: ProbeOutputs, out_b: ProbeOutputs) -> list[float]:
    """Per block (matched by relative depth): the cosine of the head-averaged attention patterns."""
    return [cosine(out_a.attention[i], out_b.attention[j])
            for i, j in _align_layers(len(out_a.attention), len(out_b.attention))]


def functional_features(out_a: ProbeOutputs, out_b: ProbeOutputs, base_a: ProbeOutputs | None = None,
                        base_b: ProbeOutputs | None = None) -> dict[str, float]:
    """The ``fn_*`` features of :data:`FEATURE_DOCS` from two models' outputs on the same probes (and their bases'
    outputs, for the features relative to a base: NaN without them)."""
    if out_a.input_ids.shape != out_b.input_ids.shape or not torch.equal(out_a.input_ids, out_b.input_ids):
        raise ValueError("the two models tokenised the probes differently; functional features need one tokenizer")
    if out_a.logprobs.shape[-1] != out_b.logprobs.shape[-1]:
        raise ValueError(f"vocabulary sizes differ ({out_a.logprobs.shape[-1]} vs {out_b.logprobs.shape[-1]})")
    la, lb = _np(out_a.logprobs), _np(out_b.logprobs)
    kl = kl_rows(la, lb)
    q10, median, q90 = np.quantile(kl, [0.1, 0.5, 0.9])
    log_v = math.log(la.shape[-1])
    feats = {
        "fn_kl_mean": float(kl.mean()), "fn_kl_median": float(median), "fn_kl_q10": float(q10),
        "fn_kl_q90": float(q90),
        "fn_js_mean": float(js_rows(la, lb).mean()),
        "fn_top1_agree": float((la.argmax(-1) == lb.argmax(-1)).mean()),
        "fn_entropy_gap": float((entropy_rows(la).mean() - entropy_rows(lb).mean()) / log_v),
    }
    cka, hcos = _hidden_similarity(out_a, out_b)
    feats.update({"fn_cka_mean": _nanstat(cka, np.mean), "fn_cka_min": _nanstat(cka, np.min),
                  "fn_cka_slope": depth_slope(cka), "fn_hidden_cos_mean": _nanstat(hcos, np.mean),
                  "fn_hidden_cos_min": _nanstat(hcos, np.min), "fn_hidden_cos_slope": depth_slope(hcos)})
    att = _attention_similarity(out_a, out_b)
    feats.update({"fn_attn_cos_mean": _nanstat(att, np.mean), "fn_attn_cos_min": _nanstat(att, np.min)})
    feats.update(answer_features(out_a, out_b, base_a, base_b))
    return feats


def answer_features(out_a: ProbeOutputs, out_b: ProbeOutputs, base_a: ProbeOutputs | None = None,
                    base_b: ProbeOutputs | None = None) -> dict[str, float]:
    """The answer-position features (``fn_kl_answer`` … ``fn_base_entropy``) of :data:`FEATURE_DOCS`."""
    last = _np(out_a.last).astype(bool)
    la, lb = _np(out_a.logprobs)[last], _np(out_b.logprobs)[last]
    feats = {"fn_kl_answer": float(kl_rows(la, lb).mean()),
             "fn_top1_answer": float((la.argmax(-1) == lb.argmax(-1)).mean())}
    nan = dict.fromkeys(["fn_a_base_kl", "fn_b_base_kl", "fn_delta_cos", "fn_base_entropy"], NAN)
    if base_a is None or base_b is None:
        return {**feats, **nan}
    for base in (base_a, base_b):
        if base.input_ids.shape != out_a.input_ids.shape or not torch.equal(base.input_ids, out_a.input_ids):
            raise ValueError("a base tokenised the probes differently from its expert")
    pa, pb = _np(base_a.logprobs)[last], _np(base_b.logprobs)[last]
    delta_a, delta_b = la - pa, lb - pb
    feats.update({"fn_a_base_kl": float(kl_rows(la, pa).mean()), "fn_b_base_kl": float(kl_rows(lb, pb).mean()),
                  "fn_delta_cos": cosine(delta_a.ravel(), delta_b.ravel()),
                  "fn_base_entropy": float(entropy_rows(pa).mean() / math.log(pa.shape[-1]))})
    return feats


def layer_profile(out_a: ProbeOutputs, out_b: ProbeOutputs) -> pd.DataFrame:
    """Per-layer signals behind the ``fn_*`` aggregates: relative depth, linear CKA, hidden-state cosine and
    attention cosine (NaN for the embedding layer, which has no attention)."""
    pairs = _align_layers(len(out_a.hidden), len(out_b.hidden))
    cka, hcos = _hidden_similarity(out_a, out_b)
    att = _attention_similarity(out_a, out_b)
    return pd.DataFrame([{"layer": i, "depth": i / max(len(pairs) - 1, 1), "cka": cka[k], "hidden_cos": hcos[k],
                          "attn_cos": att[k - 1] if k > 0 else NAN} for k, (i, _) in enumerate(pairs)])
