"""Chapter 01: cheap similarity signals between checkpoints, from a few unlabeled probes.

For an ordered pair of experts ``(a, b)`` (with bases ``base_a``, ``base_b``) and a task ``t`` the kit computes

* **functional** features from one forward pass of each model over ``t``'s probe prompts (:mod:`.probes`):
  how the two models' next-token distributions, hidden states and attention patterns differ;
* **structural** features from the weights, streamed one tensor at a time: how the task vectors
  ``tau_a = theta_a - theta_base_a`` and ``tau_b = theta_b - theta_base_b`` relate.

Every feature is scale-free (a divergence, a cosine, a ratio or a rate), so a predictor trained on the kit's tiny
models can be applied to large ones. Names and one-line definitions are in :data:`FEATURE_DOCS`; one table row
per ordered pair × task is built by :func:`compute_features` (``simmerge features``).

Cost. A model's probe outputs are computed once per probe set and cached (in memory and on disk under
``build/features/probe_cache``, keyed by the checkpoint's path, file sizes and mtimes, and the prompts), so a
catalogue of N models costs N forward passes, not one per pair. Structural features read each pair's four
checkpoints once, holding one tensor of each in memory at a time, so a 111B pair needs no more memory than its
largest tensor (times four).

Models can be checkpoint folders or in-memory models (:class:`ModelRef`): the multi-way planner measures a
running merged model against the next expert without saving it.

Widths. Linear CKA compares representations of different widths, so it is defined for any pair. Hidden-state
cosine compares vectors coordinate by coordinate and is ``NaN`` when the two models' widths differ; structural
features only use tensors whose names and shapes agree in all four checkpoints (``NaN`` when none do). Models with
different depths are compared layer to layer by relative depth. Where one expert left a group of tensors untouched
(its task vector is 0 there), that group's cosine, sign-conflict and overlap are 0 by convention (no shared
direction), so a predictor always sees a value; they are NaN only for a group with no tensors (e.g. the middle third
of a 2-block model).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import struct
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .catalogue import Catalogue
from .checkpoint import CheckpointError, iter_tensors, quiet_transformers, weight_files
from .engine import TensorInfo, read_header, read_tensor
from .kernels import ties_threshold as _ties_threshold
from .paths import build_path
from .probes import N_PROBES, ProbeSet, kit_probes, load_jsonl

#: Bump when a feature's definition changes: cached tables and probe outputs of another version are recomputed.
FEATURE_VERSION = 2
#: Share of each task vector's entries TIES keeps (mergekit's default density).
TIES_DENSITY = 0.2
ID_COLUMNS = ["a", "b", "task", "same_base", "task_of_a"]

FEATURE_DOCS: dict[str, str] = {
    # --- functional: next-token distributions at every non-pad prompt position -------------------------------
    "fn_kl_mean": "mean over probe positions of KL(p_a || p_b) = sum_v p_a(v) log(p_a(v)/p_b(v)) (nats)",
    "fn_kl_median": "median over probe positions of KL(p_a || p_b)",
    "fn_kl_q10": "10th percentile over probe positions of KL(p_a || p_b)",
    "fn_kl_q90": "90th percentile over probe positions of KL(p_a || p_b)",
    "fn_js_mean": "mean Jensen-Shannon divergence 1/2 KL(p_a||m) + 1/2 KL(p_b||m), m = (p_a+p_b)/2, in bits (0..1)",
    "fn_top1_agree": "share of probe positions where argmax p_a = argmax p_b",
    "fn_entropy_gap": "(mean H(p_a) - mean H(p_b)) / log V: signed entropy difference as a share of the maximum",
    # --- functional: hidden states (embedding output + every block), layer by layer -------------------------
    "fn_cka_mean": "mean over layers of linear CKA(H_a, H_b) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), centred",
    "fn_cka_min": "minimum over layers of linear CKA",
    "fn_cka_slope": "least-squares slope of linear CKA against relative depth (0 = embeddings, 1 = last layer)",
    "fn_hidden_cos_mean": "mean over layers of the mean per-position cosine of hidden states (NaN if widths differ)",
    "fn_hidden_cos_min": "minimum over layers of the mean per-position hidden-state cosine (NaN if widths differ)",
    "fn_hidden_cos_slope": "slope of the per-layer hidden-state cosine against relative depth (NaN if widths differ)",
    # --- functional: attention patterns ------------------------------------------------------------------------
    "fn_attn_cos_mean": "mean over layers of the cosine of head-averaged attention weights over valid (query, key)",
    "fn_attn_cos_min": "minimum over layers of the head-averaged attention-pattern cosine",
    # --- functional: where the answer starts (each probe's last position), relative to the bases ---------------
    "fn_kl_answer": "mean over probes of KL(p_a || p_b) at the position that predicts the answer's first token",
    "fn_top1_answer": "share of probes whose first answer token is the same argmax under a and b",
    "fn_a_base_kl": "mean KL(p_a || p_base_a) at the answer position: how far a's task vector moves this task's "
                    "outputs",
    "fn_b_base_kl": "mean KL(p_b || p_base_b) at the answer position: how far b's task vector moves them",
    "fn_delta_cos": "cosine of the two moves, (log p_a - log p_base_a) and (log p_b - log p_base_b), over the answer "
                    "positions × vocabulary: do the task vectors push this task's outputs the same way?",
    "fn_base_entropy": "mean entropy of p_base_a at the answer position / log V: how unsure the base is on this task "
                       "(describes the task, compares nothing)",
    # --- structural: task vectors tau = theta_expert - theta_own_base, all shared tensors -------------------
    "st_tv_cos": "cosine of the task vectors <tau_a, tau_b> / (||tau_a|| ||tau_b||), over all shared tensors",
    "st_tv_dist": "||tau_a - tau_b|| / (||tau_a|| + ||tau_b||): normalised L2 distance (0 = equal, 1 = opposite)",
    "st_tv_norm_ratio": "||tau_a|| / ||tau_b||",
    "st_tv_norm_balance": "min(||tau_a||, ||tau_b||) / max(||tau_a||, ||tau_b||) (symmetric, 0..1)",
    "st_rel_norm_a": "||tau_a|| / ||theta_base_a||: how far a moved from its base, relative to the base's size",
    "st_rel_norm_b": "||tau_b|| / ||theta_base_b||",
    "st_sign_conflict": "share of entries, among those where both tau are non-zero, whose signs differ",
    "st_support_overlap": "Jaccard overlap of the supports (non-zero entries) of tau_a and tau_b: did they train the "
                          "same parameters?",
    "st_topk_jaccard": "Jaccard overlap |K_a ∩ K_b| / |K_a ∪ K_b| of the per-tensor top-20% magnitude masks TIES "
                       "keeps",
    "st_ties_conflict": "share of entries kept by both TIES masks whose signs differ (what TIES's sign election drops)",
    "st_tv_cos_attn": "task-vector cosine over attention tensors",
    "st_tv_cos_mlp": "task-vector cosine over MLP tensors",
    "st_tv_cos_embed": "task-vector cosine over embedding and output-head tensors",
    "st_tv_cos_early": "task-vector cosine over the first third of the blocks",
    "st_tv_cos_mid": "task-vector cosine over the middle third of the blocks",
    "st_tv_cos_late": "task-vector cosine over the last third of the blocks",
    "st_layer_cos_mean": "mean over blocks of the per-block task-vector cosine",
    "st_layer_cos_min": "minimum over blocks of the per-block task-vector cosine",
    "st_layer_cos_std": "standard deviation over blocks of the per-block task-vector cosine",
    "st_layer_cos_slope": "slope of the per-block task-vector cosine against relative depth",
    "st_layer_conflict_max": "maximum over blocks of the per-block sign-conflict rate",
    "st_weight_cos": "cosine of the full weights <theta_a, theta_b> / (||theta_a|| ||theta_b||)",
    "st_base_cos": "cosine of the two bases' weights (1 when a and b share their base)",
    "st_base_dist": "||theta_base_a - theta_base_b|| / (||theta_base_a|| + ||theta_base_b||) (0 when shared)",
    "st_shared_frac": "share of a's parameters in tensors whose name and shape agree in all four checkpoints",
}
FEATURE_COLUMNS = list(FEATURE_DOCS)
#: Features that describe the task (through the base's behaviour on its probes) without comparing two models.
DESCRIPTOR_COLUMNS = ["fn_base_entropy"]
FUNCTIONAL_COLUMNS = [c for c in FEATURE_COLUMNS if c.startswith("fn_")]
STRUCTURAL_COLUMNS = [c for c in FEATURE_COLUMNS if c.startswith("st_")]
# Structural features that change under swapping a and b; every other one is symmetric.
_SWAP_INVERT = {"st_tv_norm_ratio"}
_SWAP_EXCHANGE = {"st_rel_norm_a": "st_rel_norm_b", "st_rel_norm_b": "st_rel_norm_a"}

NAN = float("nan")


# ===================================================================================================== primitives
# The feature arithmetic runs in NumPy float64: these are small matrices (positions × width), for which torch's
# thread pool costs more than the arithmetic on a busy CPU; inputs may be tensors or arrays.
def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def kl_rows(logp: torch.Tensor | np.ndarray, logq: torch.Tensor | np.ndarray) -> np.ndarray:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)) for each row of two log-probability matrices (nats, >= 0)."""
    logp, logq = _np(logp), _np(logq)
    return np.maximum((np.exp(logp) * (logp - logq)).sum(-1), 0.0)


def js_rows(logp: torch.Tensor | np.ndarray, logq: torch.Tensor | np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence per row, in bits: 1/2 KL(p||m) + 1/2 KL(q||m) with m = (p+q)/2; in [0, 1]."""
    logp, logq = _np(logp), _np(logq)
    logm = np.logaddexp(logp, logq) - math.log(2.0)
    return (0.5 * kl_rows(logp, logm) + 0.5 * kl_rows(logq, logm)) / math.log(2.0)


def entropy_rows(logp: torch.Tensor | np.ndarray) -> np.ndarray:
    """Shannon entropy H(p) = -sum_v p(v) log p(v) per row (nats)."""
    logp = _np(logp)
    return -(np.exp(logp) * logp).sum(-1)


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA (Kornblith et al., 2019) of two representations ``x: [n, p]``, ``y: [n, q]`` of the same inputs.

    With column-centred X, Y: CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), equal to the normalised HSIC of the
    linear kernels <K, L>_F / (||K||_F ||L||_F) with K = X X^T, L = Y Y^T. Widths p and q may differ. CKA is 1 for
    x against itself and invariant to orthogonal transforms and isotropic scaling of either side; NaN when one
    side is constant.
    """
    x, y = _np(x), _np(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same inputs on both sides; got {x.shape[0]} and {y.shape[0]} rows")
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    if x.shape[0] < min(x.shape[1], y.shape[1]):  # the n x n kernel form is the cheaper one for wide models
        k, l_ = x @ x.T, y @ y.T
        num, den = float((k * l_).sum()), float(np.linalg.norm(k) * np.linalg.norm(l_))
    else:
        num = float(np.linalg.norm(y.T @ x) ** 2)
        den = float(np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    return num / den if den > 0 else NAN


def cosine(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """<x, y> / (||x|| ||y||) of two flattened tensors of equal size; NaN if either is zero."""
    x, y = _np(x).ravel(), _np(y).ravel()
    den = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / den if den > 0 else NAN


def row_cosine(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> np.ndarray:
    """Cosine of each row of ``x`` with the same row of ``y`` (0 where a row is zero)."""
    x, y = _np(x), _np(y)
    den = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    return np.divide((x * y).sum(-1), den, out=np.zeros_like(den), where=den > 0)


def depth_slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against relative depth ``i / (L - 1)`` in [0, 1]; NaN for fewer than 2."""
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v)
    if ok.sum() < 2:
        return NAN
    depth = np.linspace(0.0, 1.0, len(v))[ok]
    return float(np.polyfit(depth, v[ok], 1)[0])


#: Below this hidden width the functional features run their matrix products on one BLAS thread: for small
#: matrices a second thread only adds synchronisation, which costs 20x on a busy CPU (measured on 2 shared cores).
SMALL_WIDTH = 1024


def _blas_threads_for(outputs: Iterable[ProbeOutputs]) -> contextlib.AbstractContextManager[Any]:
    from threadpoolctl import threadpool_limits

    widths = [h.shape[-1] for out in outputs for h in out.hidden[:1]]
    return threadpool_limits(1) if widths and max(widths) <= SMALL_WIDTH else contextlib.nullcontext()


def _nanstat(values: Sequence[float], fn: Any) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(fn(v)) if v.size else NAN


# ========================================================================================================= models
class TensorReader:
    """Read a checkpoint's tensors one at a time by name (a folder's safetensors shards, or a state dict).

    Files are read with the merge engine's reader (:func:`.engine.read_header`, :func:`.engine.read_tensor`):
    ``pread`` into a fresh buffer, each shard opened once and closed by :meth:`close`. Not ``safe_open``: its
    memory map keeps every page read so far in the resident set while the file stays open. Measured on layer 0 of
    three full-width 111B-shaped checkpoints (q/o projections and norms, 1.8 GB of bf16): the structural features
    peaked at 3901 MiB RSS through ``safe_open`` against 2632 MiB for the TIES merge of the same checkpoints;
    2243 MiB through ``pread`` with the slice-wise float32 conversion of :meth:`get`.
    """

    def __init__(self, ref: ModelRef):
        self._fds: dict[Path, int] = {}
        self._headers: dict[Path, dict[str, TensorInfo]] = {}
        if ref.path is not None and ref.state_dict is None:
            self._files: dict[str, Path] | None = weight_files(ref.path)
            self._state: Mapping[str, torch.Tensor] | None = None
        else:
            self._files = None
            self._state = ref.get_state_dict()

    def names(self) -> list[str]:
        return list(self._files) if self._files is not None else list(self._state or {})

    def __contains__(self, name: str) -> bool:
        return name in (self._files if self._files is not None else self._state or {})

    def info(self, name: str) -> TensorInfo:
        """Where a file-backed tensor lives (dtype, shape, file offset); its shard's header is read and checked on
        first use, so a truncated or corrupt shard raises :class:`CheckpointError` naming the file."""
        if self._files is None:
            raise ValueError("an in-memory model has no tensor files")
        path = self._files[name]
        if path not in self._headers:
            self._headers[path] = read_header(path)
        try:
            return self._headers[path][name]
        except KeyError:
            raise CheckpointError(f"{path}: index names tensor {name!r} but the shard does not hold it") from None

    def shape(self, name: str) -> tuple[int, ...]:
        if self._files is not None:
            return self.info(name).shape
        return tuple(self._state[name].shape)  # type: ignore[index]

    @property
    def owns_tensors(self) -> bool:
        """Whether :meth:`get` returns fresh tensors (read from files) that the caller may modify in place."""
        return self._files is not None

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            try:
                self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot open ({exc.strerror or exc})") from None
        return self._fds[path]

    def get_stored(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype (a fresh tensor for a file; the state dict's own for an in-memory model)."""
        if self._files is None:
            return self._state[name]  # type: ignore[index]
        info = self.info(name)
        return read_tensor(self._fd(info.path), info)

    def get(self, name: str) -> torch.Tensor:
        """The tensor as float32 (task vectors are differences: subtract in full precision).

        A file tensor stored in another floating dtype is read slice by slice into its float32 copy, so the stored
        bytes never sit in memory whole beside it (a whole bf16 copy cost 213 MiB more peak RSS in the run above).
        """
        if self._files is None:
            return self._state[name].detach().to("cpu", torch.float32)  # type: ignore[index]
        info = self.info(name)
        if info.dtype == torch.float32 or not info.dtype.is_floating_point:
            return read_tensor(self._fd(info.path), info).to(torch.float32)  # float32: as read, no second copy
        out = torch.empty(info.shape, dtype=torch.float32)
        flat, size = out.view(-1), info.dtype.itemsize
        for start in range(0, flat.numel(), _CHUNK):
            n = min(_CHUNK, flat.numel() - start)
            piece = TensorInfo(info.path, info.dtype, (n,), info.offset + start * size, n * size)
            flat[start:start + n] = read_tensor(self._fd(info.path), piece)
        return out

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(eq=False)
class ModelRef:
    """A model the features can read: a checkpoint folder, or an in-memory model and/or state dict.

    Build one with :meth:`folder`, :meth:`memory` or :func:`as_ref` (which also accepts a path, an ``nn.Module``
    or a ``(model, state_dict)`` tuple). ``key`` identifies the weights: for a folder, its resolved path plus the
    size and mtime of every weight file (so a rewritten checkpoint is never served stale outputs); for an
    in-memory model a fresh id per ref (outputs are cached in memory only, for as long as the ref is reused).
    An in-memory ref given only a state dict builds its model from ``like``'s config when a forward pass is needed;
    given a model *and* a state dict, the model is a skeleton the state dict is loaded into before the pass.
    """

    name: str
    path: Path | None = None
    model: torch.nn.Module | None = None
    state_dict: Mapping[str, torch.Tensor] | None = None
    tokenizer: Any = None
    like: Path | None = None
    key: str = ""

    def __post_init__(self) -> None:
        if self.path is None and self.model is None and self.state_dict is None:
            raise ValueError(f"model {self.name!r}: give a checkpoint folder, a model or a state dict")
        if not self.key:
            self.key = _folder_key(self.path) if self.path is not None and self.state_dict is None and \
                self.model is None else f"mem:{uuid.uuid4().hex}"

    @classmethod
    def folder(cls, path: str | os.PathLike[str], name: str | None = None) -> ModelRef:
        path = Path(path)
        weight_files(path)  # fail early, naming the folder, if it is not a checkpoint
        return cls(name=name or path.name, path=path)

    @classmethod
    def memory(cls, model: torch.nn.Module | None = None, state_dict: Mapping[str, torch.Tensor] | None = None,
               name: str = "merged", tokenizer: Any = None, like: str | os.PathLike[str] | None = None) -> ModelRef:
        return cls(name=name, model=model, state_dict=state_dict, tokenizer=tokenizer,
                   like=Path(like) if like is not None else None)

    @property
    def on_disk(self) -> bool:
        return not self.key.startswith("mem:")

    def tensors(self) -> TensorReader:
        return TensorReader(self)

    def get_state_dict(self) -> Mapping[str, torch.Tensor]:
        if self.state_dict is not None:
            return self.state_dict
        if self.model is not None:
            return self.model.state_dict()
        raise ValueError(f"model {self.name!r} is a folder; read it with .tensors()")

    def get_tokenizer(self) -> Any:
        if self.tokenizer is None:
            folder = self.path or self.like
            if folder is not None and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(folder)
            else:
                from .tokenizer import build_tokenizer

                self.tokenizer = build_tokenizer()
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        return self.tokenizer

    def load_model(self, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The model, ready for a forward pass that returns attentions (eager attention)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.model is not None:
            if self.state_dict is not None:  # a reusable skeleton and the weights to run (as evaluate_state_dict)
                self.model.load_state_dict(dict(self.state_dict), strict=False)
            return self.model
        if self.state_dict is not None:
            template = self.like or self.path
            if template is None:
                raise ValueError(f"model {self.name!r}: a state dict alone needs like=<checkpoint folder> "
                                 "for its config")
            config = AutoConfig.from_pretrained(template)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
            missing, unexpected = model.load_state_dict(dict(self.state_dict), strict=False)
            if unexpected or [k for k in missing if "lm_head" not in k]:
                raise ValueError(f"model {self.name!r}: state dict does not fit {template} "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            if hasattr(model, "tie_weights"):
                model.tie_weights()
            return model.to(device).eval()
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(self.path, attn_implementation="eager", dtype=dtype)
        return model.to(device).eval()


def _folder_key(path: Path) -> str:
    path = Path(path).resolve()
    parts = [str(path)]
    for file in sorted(set(weight_files(path).values())) + [path / "config.json"]:
        if file.exists():
            st = file.stat()
            parts.append(f"{file.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


ModelLike = ModelRef | str | os.PathLike | torch.nn.Module | tuple


def as_ref(x: ModelLike, name: str | None = None) -> ModelRef:
    """A :class:`ModelRef` from a ref, a checkpoint folder, an ``nn.Module`` or a ``(model, state_dict)`` tuple."""
    if isinstance(x, ModelRef):
        return x
    if isinstance(x, (str, os.PathLike)):
        return ModelRef.folder(x, name)
    if isinstance(x, torch.nn.Module):
        return ModelRef.memory(model=x, name=name or "merged")
    if isinstance(x, tuple) and len(x) == 2:
        model, state = x
        return ModelRef.memory(model=model, state_dict=state, name=name or "merged")
    raise TypeError(f"cannot read a model from {type(x).__name__}; "
                    "give a folder, a ModelRef, a model or (model, state_dict)")


# ================================================================================================= probe outputs
@dataclass
class ProbeOutputs:
    """What one model computes on one task's probes, at every non-pad prompt position.

    ``logprobs``: [n_positions, V] log-softmax of the next-token logits; ``hidden``: per layer (embedding output,
    then each block) [n_positions, width]; ``attention``: per block, the head-averaged attention weights of every
    valid (query, key <= query) pair, flattened in prompt order; ``input_ids``: the tokens at those positions (two
    models are only comparable when these agree); ``last``: True at each prompt's last position, whose next-token
    distribution is the answer's first token.
    """

    logprobs: torch.Tensor
    hidden: list[torch.Tensor]
    attention: list[torch.Tensor]
    input_ids: torch.Tensor
    last: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        return {"logprobs": self.logprobs, "hidden": self.hidden, "attention": self.attention,
                "input_ids": self.input_ids, "last": self.last}


@torch.no_grad()
def run_probes(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], batch_size: int = 32) -> ProbeOutputs:
    """One forward pass over ``prompts`` (in batches) returning the :class:`ProbeOutputs` of one model and task."""
    device = next(model.parameters()).device
    restore = None
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        restore = model.config._attn_implementation  # only eager attention returns attention weights
        model.set_attn_implementation("eager")
    was_training = model.training
    model.eval()
    logps, ids, lasts = [], [], []
    hidden: list[list[torch.Tensor]] = []
    attn: list[list[torch.Tensor]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True)
            mask = enc["attention_mask"].bool()
            # positions count real tokens only, so a prompt's outputs do not depend on its batch's padding
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                        position_ids=position_ids.to(device), output_hidden_states=True, output_attentions=True)
            mask_d = mask.to(device)
            logps.append(torch.log_softmax(out.logits.float()[mask_d], dim=-1).cpu())
            ids.append(enc["input_ids"][mask])
            lengths = mask.sum(1, keepdim=True)
            lasts.append((position_ids == lengths - 1)[mask])
            if not hidden:
                hidden = [[] for _ in out.hidden_states]
                attn = [[] for _ in out.attentions]
            for i, h in enumerate(out.hidden_states):
                hidden[i].append(h.float()[mask_d].cpu())
            pair = mask_d[:, :, None] & mask_d[:, None, :] & torch.ones(
                mask.shape[1], mask.shape[1], dtype=torch.bool, device=device).tril()
            for i, a in enumerate(out.attentions):
                attn[i].append(a.float().mean(1)[pair].cpu())
    finally:
        if restore is not None:
            model.set_attn_implementation(restore)
        model.train(was_training)
    return ProbeOutputs(torch.cat(logps), [torch.cat(h) for h in hidden], [torch.cat(a) for a in attn], torch.cat(ids),
                        torch.cat(lasts))


class ProbeCache:
    """Probe outputs per (model, task prompts), in memory and, for checkpoint folders, on disk.

    ``forward_passes`` counts the (model, task) outputs actually computed, and ``model_loads`` the models loaded
    to do so: a whole catalogue table costs one load and one pass per model and task, whatever the number of pairs.
    """

    def __init__(self, disk_dir: str | os.PathLike[str] | None = "default", device: str | None = None,
                 dtype: torch.dtype = torch.float32, batch_size: int = 32, memory: bool = True):
        self.disk_dir = build_path("features", "probe_cache", "x").parent if disk_dir == "default" else (
            Path(disk_dir) if disk_dir is not None else None)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.batch_size = batch_size
        self.memory = memory
        self._mem: dict[tuple[str, str], ProbeOutputs] = {}
        self._skeletons: dict[str, torch.nn.Module] = {}
        self._tokenizers: dict[str, Any] = {}
        self.forward_passes = 0
        self.model_loads = 0

    #: Checkpoints up to this size are loaded into a cached skeleton of their architecture instead of through
    #: ``from_pretrained``, whose fixed cost dominates for the kit's small models.
    SKELETON_MAX_BYTES = 256 * 2**20

    def _load(self, ref: ModelRef) -> torch.nn.Module:
        if ref.path is None or ref.model is not None or ref.state_dict is not None:
            return ref.load_model(self.device, self.dtype)
        files = set(weight_files(ref.path).values())
        config_file = ref.path / "config.json"
        if sum(f.stat().st_size for f in files) > self.SKELETON_MAX_BYTES or not config_file.is_file():
            return ref.load_model(self.device, self.dtype)
        from transformers import AutoConfig, AutoModelForCausalLM

        key = config_file.read_text()
        if key not in self._skeletons:
            config = AutoConfig.from_pretrained(ref.path)
            with quiet_transformers():
                skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=self.dtype)
            self._skeletons[key] = skeleton.to(self.device).eval()
        model = self._skeletons[key]
        state = {name: t.to(self.dtype) if t.is_floating_point() else t for name, t in iter_tensors(ref.path)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        if unexpected or (missing and not (tied and all("lm_head" in k for k in missing))):
            return ref.load_model(self.device, self.dtype)  # not a plain state dict of this class: the slow path
        return model

    def _tokenizer(self, ref: ModelRef) -> Any:
        """The ref's tokenizer, shared between checkpoints whose tokenizer files are identical."""
        if ref.tokenizer is None and ref.path is not None:
            files = [ref.path / f for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
            key = "|".join(f.read_text() if f.is_file() else "" for f in files)
            if key.strip("|") and key in self._tokenizers:
                ref.tokenizer = self._tokenizers[key]
            else:
                self._tokenizers[key] = ref.get_tokenizer()
        return ref.get_tokenizer()

    def _file(self, ref: ModelRef, task_key: str) -> Path | None:
        if self.disk_dir is None or not ref.on_disk:
            return None
        dtype = str(self.dtype).replace("torch.", "")
        return self.disk_dir / ref.key / f"{task_key}-{dtype}-v{FEATURE_VERSION}.pt"

    def _lookup(self, ref: ModelRef, key: str) -> ProbeOutputs | None:
        if (ref.key, key) in self._mem:
            return self._mem[(ref.key, key)]
        file = self._file(ref, key)
        if file is not None and file.is_file():
            try:
                out = ProbeOutputs(**torch.load(file, weights_only=True))
            except Exception:  # a corrupt or foreign cache file is recomputed, never trusted
                return None
            if self.memory:
                self._mem[(ref.key, key)] = out
            return out
        return None

    def outputs(self, ref: ModelRef, probes: ProbeSet, tasks: Sequence[str]) -> dict[str, ProbeOutputs]:
        """Outputs of ``ref`` on each task's probes, loading the model once for all tasks not cached yet."""
        result: dict[str, ProbeOutputs] = {}
        missing = []
        for task in tasks:
            found = self._lookup(ref, probes.task_key(task))
            if found is None:
                missing.append(task)
            else:
                result[task] = found
        if missing:
            model = self._load(ref)
            if ref.model is None:
                self.model_loads += 1
            tokenizer = self._tokenizer(ref)
            for task in missing:
                out = run_probes(model, tokenizer, probes[task], self.batch_size)
                self.forward_passes += 1
                key = probes.task_key(task)
                if self.memory:
                    self._mem[(ref.key, key)] = out
                file = self._file(ref, key)
                if file is not None:
                    file.parent.mkdir(parents=True, exist_ok=True)
                    tmp = file.with_name(file.name + f".{os.getpid()}.tmp")
                    torch.save(out.to_dict(), tmp)
                    os.replace(tmp, file)
                result[task] = out
            del model
        return result


# ========================================================================================== functional features
def _align_layers(n_a: int, n_b: int) -> list[tuple[int, int]]:
    """Layer pairs matched by relative depth (identity when the depths agree)."""
    if n_a == n_b:
        return [(i, i) for i in range(n_a)]
    return [(i, round(i * (n_b - 1) / max(n_a - 1, 1))) for i in range(n_a)]


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
    cka, hcos = [], []
    for i, j in _align_layers(len(out_a.hidden), len(out_b.hidden)):
        ha, hb = _np(out_a.hidden[i]), _np(out_b.hidden[j])
        cka.append(linear_cka(ha, hb))
        if ha.shape[-1] == hb.shape[-1]:
            hcos.append(float(row_cosine(ha, hb).mean()))
        else:
            hcos.append(NAN)
    feats.update({"fn_cka_mean": _nanstat(cka, np.mean), "fn_cka_min": _nanstat(cka, np.min),
                  "fn_cka_slope": depth_slope(cka), "fn_hidden_cos_mean": _nanstat(hcos, np.mean),
                  "fn_hidden_cos_min": _nanstat(hcos, np.min), "fn_hidden_cos_slope": depth_slope(hcos)})
    att = [cosine(out_a.attention[i], out_b.attention[j])
           for i, j in _align_layers(len(out_a.attention), len(out_b.attention))]
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


# ========================================================================================== structural features
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def tensor_group(name: str) -> str | None:
    """The layer group of a tensor name: ``attn``, ``mlp``, ``embed`` (embeddings and output head) or None."""
    low = name.lower()
    if "embed" in low or "lm_head" in low or low.startswith(("wte", "wpe")) or ".wte." in low or ".wpe." in low:
        return "embed"
    if "attn" in low or "attention" in low:
        return "attn"
    if "mlp" in low or "feed_forward" in low or "ffn" in low or "experts" in low:
        return "mlp"
    return None


def layer_index(name: str) -> int | None:
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def depth_third(layer: int, n_layers: int) -> int:
    """0, 1 or 2 (early, middle, late) by relative depth, round(2 * layer / (n_layers - 1)): the first and last
    blocks are always early and late (a 2-block model has no middle)."""
    return 0 if n_layers <= 1 else min(2, round(2 * layer / (n_layers - 1)))


@dataclass
class _Acc:
    """Running sums over the entries of a set of tensors; every structural feature is a ratio of these."""

    dot: float = 0.0  # <tau_a, tau_b>
    na: float = 0.0  # ||tau_a||^2
    nb: float = 0.0
    diff: float = 0.0  # ||tau_a - tau_b||^2
    both_nz: int = 0
    either_nz: int = 0
    conflict: int = 0
    inter: int = 0  # |K_a ∩ K_b| of the TIES masks
    union: int = 0
    kept_conflict: int = 0
    tensors: int = 0

    def add(self, o: _Acc) -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, getattr(self, f) + getattr(o, f))

    # An expert that left a group untouched (tau = 0 there) shares no direction with the other: cosine 0 and no
    # sign conflicts, rather than NaN, so a predictor sees a value; NaN only for a group with no tensors at all.
    def cos(self) -> float:
        den = math.sqrt(self.na * self.nb)
        return self.dot / den if den > 0 else (0.0 if self.tensors else NAN)

    def conflict_rate(self) -> float:
        return self.conflict / self.both_nz if self.both_nz else (0.0 if self.tensors else NAN)

    def jaccard(self) -> float:
        return self.inter / self.union if self.union else (0.0 if self.tensors else NAN)

    def kept_conflict_rate(self) -> float:
        return self.kept_conflict / self.inter if self.inter else (0.0 if self.tensors else NAN)


#: Elements per slice when accumulating a tensor's statistics: temporaries stay a few 16 MB buffers whatever the
#: tensor's size (the tensors themselves, three or four at a time, are what a huge pair costs).
_CHUNK = 1 << 22


def _dot64(x: torch.Tensor, y: torch.Tensor, subtract: bool = False) -> float:
    """<x, y> (or ||x - y||^2 with ``subtract``) accumulated in float64 slice by slice, with no full-size temporary."""
    x, y = x.flatten(), y.flatten()
    total = 0.0
    for start in range(0, x.numel(), _CHUNK):
        a, b = x[start:start + _CHUNK].double(), y[start:start + _CHUNK].double()
        total += float(torch.dot(a - b, a - b) if subtract else torch.dot(a, b))
    return total


def _tensor_acc(ta: torch.Tensor, tb: torch.Tensor, density: float) -> _Acc:
    ta, tb = ta.flatten(), tb.flatten()
    th_a, th_b = _ties_threshold(ta, density), _ties_threshold(tb, density)
    acc = _Acc(dot=_dot64(ta, tb), na=_dot64(ta, ta), nb=_dot64(tb, tb), diff=_dot64(ta, tb, subtract=True),
               tensors=1)
    for start in range(0, ta.numel(), _CHUNK):
        a, b = ta[start:start + _CHUNK], tb[start:start + _CHUNK]
        sa, sb = torch.sign(a), torch.sign(b)
        both = (sa != 0) & (sb != 0)
        opposite = both & (sa != sb)
        ka = (a.abs() >= th_a) & (sa != 0)
        kb = (b.abs() >= th_b) & (sb != 0)
        acc.add(_Acc(both_nz=int(both.sum()), either_nz=int(((sa != 0) | (sb != 0)).sum()),
                     conflict=int(opposite.sum()), inter=int((ka & kb).sum()), union=int((ka | kb).sum()),
                     kept_conflict=int((ka & kb & opposite).sum())))
    return acc


def structural_features(a: ModelLike, b: ModelLike, base_a: ModelLike, base_b: ModelLike,
                        density: float = TIES_DENSITY) -> dict[str, float]:
    """The ``st_*`` features of :data:`FEATURE_DOCS`, streamed one tensor at a time from the four checkpoints.

    ``tau_a = theta_a - theta_base_a`` and ``tau_b = theta_b - theta_base_b``: across bases each expert's task
    vector is taken against its own base. Only tensors whose name and shape agree in all four are used.
    """
    a, b, base_a, base_b = as_ref(a), as_ref(b), as_ref(base_a), as_ref(base_b)
    shared_base = base_a.key == base_b.key
    groups: dict[str, _Acc] = {g: _Acc() for g in ("all", "attn", "mlp", "embed", "early", "mid", "late")}
    layers: dict[int, _Acc] = {}
    w_dot = w_na = w_nb = 0.0  # expert weights
    b_dot = b_na = b_nb = b_diff = 0.0  # base weights
    shared = total = 0
    with contextlib.ExitStack() as stack:
        ra, rb, rba = (stack.enter_context(r.tensors()) for r in (a, b, base_a))
        rbb = rba if shared_base else stack.enter_context(base_b.tensors())
        names = ra.names()
        depths = [i for i in map(layer_index, names) if i is not None]
        n_layers = max(depths) + 1 if depths else 0
        for name in names:
            numel = math.prod(ra.shape(name))
            total += numel
            if not all(name in r for r in (rb, rba, rbb)):
                continue
            shape = ra.shape(name)
            if not (rb.shape(name) == rba.shape(name) == rbb.shape(name) == shape):
                continue
            shared += numel
            xa, xba = ra.get(name), rba.get(name)
            xb = rb.get(name)
            xbb = xba if shared_base else rbb.get(name)
            w_dot += _dot64(xa, xb)
            w_na += _dot64(xa, xa)
            w_nb += _dot64(xb, xb)
            b_na += _dot64(xba, xba)
            if not shared_base:
                b_nb += _dot64(xbb, xbb)
                b_dot += _dot64(xba, xbb)
                b_diff += _dot64(xba, xbb, subtract=True)
            # Task vectors overwrite the experts' fresh copies where we own them, so no fifth full-size tensor is
            # allocated (four are alive here across bases, three for a shared base).
            ta = xa.sub_(xba) if ra.owns_tensors else xa - xba
            tb = xb.sub_(xbb) if rb.owns_tensors else xb - xbb
            del xa, xb, xba, xbb
            acc = _tensor_acc(ta, tb, density)
            del ta, tb
            groups["all"].add(acc)
            group = tensor_group(name)
            if group is not None:
                groups[group].add(acc)
            depth = layer_index(name)
            if depth is not None:
                groups[("early", "mid", "late")[depth_third(depth, n_layers)]].add(acc)
                layers.setdefault(depth, _Acc()).add(acc)
    g = groups["all"]
    norm_a, norm_b = math.sqrt(g.na), math.sqrt(g.nb)
    if shared_base:
        b_nb, b_dot, b_diff = b_na, b_na, 0.0
    layer_cos = [layers[i].cos() for i in sorted(layers)]

    def ratio(num: float, den: float) -> float:
        return num / den if den > 0 else NAN

    return {
        "st_tv_cos": g.cos(),
        "st_tv_dist": ratio(math.sqrt(g.diff), norm_a + norm_b),
        "st_tv_norm_ratio": ratio(norm_a, norm_b),
        "st_tv_norm_balance": ratio(min(norm_a, norm_b), max(norm_a, norm_b)),
        "st_rel_norm_a": ratio(norm_a, math.sqrt(b_na)),
        "st_rel_norm_b": ratio(norm_b, math.sqrt(b_nb)),
        "st_sign_conflict": g.conflict_rate(),
        "st_support_overlap": ratio(g.both_nz, g.either_nz),
        "st_topk_jaccard": g.jaccard(),
        "st_ties_conflict": g.kept_conflict_rate(),
        **{f"st_tv_cos_{k}": groups[k].cos() for k in ("attn", "mlp", "embed", "early", "mid", "late")},
        "st_layer_cos_mean": _nanstat(layer_cos, np.mean),
        "st_layer_cos_min": _nanstat(layer_cos, np.min),
        "st_layer_cos_std": _nanstat(layer_cos, np.std),
        "st_layer_cos_slope": depth_slope(layer_cos),
        "st_layer_conflict_max": _nanstat([layers[i].conflict_rate() for i in sorted(layers)], np.max),
        "st_weight_cos": ratio(w_dot, math.sqrt(w_na * w_nb)),
        "st_base_cos": ratio(b_dot, math.sqrt(b_na * b_nb)),
        "st_base_dist": ratio(math.sqrt(b_diff), math.sqrt(b_na) + math.sqrt(b_nb)),
        "st_shared_frac": ratio(shared, total),
    }


def swap_structural(feats: Mapping[str, float]) -> dict[str, float]:
    """Structural features of (b, a) from those of (a, b): exact, without reading the weights again."""
    out = dict(feats)
    for k in _SWAP_INVERT:
        out[k] = 1.0 / feats[k] if feats[k] not in (0.0,) and math.isfinite(feats[k]) else NAN
    for k, other in _SWAP_EXCHANGE.items():
        out[k] = feats[other]
    return out


# ============================================================================================ pairs and tables
def task_owner(tasks_a: Sequence[str] | None, tasks_b: Sequence[str] | None, task: str) -> float:
    """``task_of_a``: which parent was fine-tuned on ``task`` — 1 if only a, 0 if only b, 0.5 if both or neither,
    NaN when a model's tasks are unknown (no card). Known without merging or evaluating (a catalogue fact), and what
    tells a predictor that weight w on a is the share of the task's own expert (w) or of the other one (1 - w)."""
    if tasks_a is None or tasks_b is None:
        return NAN
    in_a, in_b = task in tasks_a, task in tasks_b
    return 0.5 if in_a == in_b else float(in_a)


def add_task_owner(frame: pd.DataFrame, catalogue: Catalogue) -> pd.DataFrame:
    """``frame`` (rows a, b, task) with its ``task_of_a`` column (:func:`task_owner`) filled from the catalogue's
    model entries: for tables written before the column existed."""
    def tasks(name: str) -> list[str] | None:
        try:
            return list(catalogue.entry(name).tasks)
        except KeyError:
            return None

    out = frame.copy()
    out["task_of_a"] = [task_owner(tasks(a), tasks(b), t) for a, b, t in zip(out.a, out.b, out.task)]
    return out


def _card_tasks(ref: ModelRef) -> list[str] | None:
    if ref.path is None:
        return None
    from .checkpoint import read_card

    card = read_card(ref.path)
    return list(card["tasks"]) if isinstance(card.get("tasks"), list) else None


def pair_features(a: ModelLike, b: ModelLike, base_a: ModelLike, base_b: ModelLike, tasks: str | Sequence[str],
                  probes: ProbeSet | None = None, n_probes: int = N_PROBES["default"], cache: ProbeCache | None = None,
                  density: float = TIES_DENSITY, functional: bool = True, structural: bool = True) -> pd.DataFrame:
    """Feature rows of one ordered pair, one per task, with the columns of :func:`compute_features`.

    Any model may be a checkpoint folder or an in-memory model (see :func:`as_ref`), so the planner can measure a
    running merged model against the next expert without saving it. Pass one ``cache`` across calls to reuse
    probe outputs. Disabled feature kinds are NaN.
    """
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    ra, rb = as_ref(a, "a"), as_ref(b, "b")
    rba, rbb = as_ref(base_a, "base_a"), as_ref(base_b, "base_b")
    probes = probes or kit_probes(tasks, n_probes)
    cache = cache or ProbeCache(disk_dir=None)
    st = structural_features(ra, rb, rba, rbb, density) if structural else dict.fromkeys(STRUCTURAL_COLUMNS, NAN)
    rows = []
    outs_a = cache.outputs(ra, probes, tasks) if functional else {}
    outs_b = cache.outputs(rb, probes, tasks) if functional else {}
    outs_ba = cache.outputs(rba, probes, tasks) if functional else {}
    outs_bb = cache.outputs(rbb, probes, tasks) if functional else {}
    with _blas_threads_for([*outs_a.values(), *outs_b.values()]):
        for task in tasks:
            fn = functional_features(outs_a[task], outs_b[task], outs_ba[task], outs_bb[task]) if functional else \
                dict.fromkeys(FUNCTIONAL_COLUMNS, NAN)
            rows.append({"a": ra.name, "b": rb.name, "task": task, "same_base": int(rba.key == rbb.key),
                         "task_of_a": task_owner(_card_tasks(ra), _card_tasks(rb), task), **fn, **st})
    return pd.DataFrame(rows, columns=ID_COLUMNS + FEATURE_COLUMNS)


def _pair_tasks(catalogue: Catalogue, a: str, b: str, tasks: Literal["parents", "all"]) -> list[str]:
    if tasks == "all":
        return list(catalogue.tasks)
    if tasks != "parents":
        raise ValueError(f"tasks must be 'parents' or 'all', got {tasks!r}")
    wanted = set(catalogue.entry(a).tasks) | set(catalogue.entry(b).tasks)
    return [t for t in catalogue.tasks if t in wanted]


def compute_features(catalogue: Catalogue, n_probes: int = N_PROBES["default"],
                     pairs: Sequence[tuple[str, str]] | None = None, tasks: Literal["parents", "all"] = "parents",
                     progress: bool = True, probes: ProbeSet | None = None, cache: ProbeCache | None = None,
                     density: float = TIES_DENSITY) -> pd.DataFrame:
    """The features table: one row per ordered pair × task.

    ``pairs`` defaults to every ordered pair of experts, same-task pairs included
    (``catalogue.pairs("all", ordered=True, distinct_tasks=False)``); ``tasks`` is
    ``"parents"`` (the tasks of a and b) or ``"all"`` (every catalogue task). Columns: ``a, b, task, same_base,
    task_of_a`` (:func:`task_owner`), then :data:`FEATURE_COLUMNS`. Probe outputs are computed once per model (and
    cached on disk by default); structural features once per unordered pair.
    """
    pairs = list(pairs) if pairs is not None else catalogue.pairs("all", ordered=True, distinct_tasks=False)
    if not pairs:
        raise ValueError(f"catalogue {catalogue.name!r}: no pairs of experts to compute features for")
    pair_tasks = {p: _pair_tasks(catalogue, *p, tasks) for p in pairs}
    needed: dict[str, list[str]] = {}
    for (a, b), ts in pair_tasks.items():
        for m in (a, b, catalogue.base_of(a).name, catalogue.base_of(b).name):
            needed.setdefault(m, [])
            needed[m] += [t for t in ts if t not in needed[m]]
    probes = probes or kit_probes(sorted({t for ts in pair_tasks.values() for t in ts}), n_probes)
    cache = cache or ProbeCache()
    order = {m.name: i for i, m in enumerate(catalogue.models)}  # catalogue order keeps the work deterministic
    refs = {m: ModelRef.folder(catalogue.path(m), m) for m in sorted(needed, key=order.__getitem__)}
    unordered = sorted({tuple(sorted(p, key=order.__getitem__)) for p in pairs},
                       key=lambda p: (order[p[0]], order[p[1]]))
    bar = tqdm(total=len(needed) + len(unordered) + len(pair_tasks), desc="features", disable=not progress,
               unit="step")
    outputs: dict[str, dict[str, ProbeOutputs]] = {}
    for m, ts in sorted(needed.items(), key=lambda item: order[item[0]]):
        bar.set_postfix_str(f"probes {m}")
        outputs[m] = cache.outputs(refs[m], probes, ts)
        bar.update()
    structural: dict[tuple[str, str], dict[str, float]] = {}
    for a, b in unordered:
        bar.set_postfix_str(f"weights {a} × {b}")
        st = structural_features(refs[a], refs[b], refs[catalogue.base_of(a).name], refs[catalogue.base_of(b).name],
                                 density)
        structural[(a, b)], structural[(b, a)] = st, swap_structural(st)
        bar.update()
    bar.set_postfix_str("comparing outputs")
    rows = []
    with _blas_threads_for(o for per_task in outputs.values() for o in per_task.values()):
        for (a, b), ts in pair_tasks.items():
            base_a, base_b = catalogue.base_of(a).name, catalogue.base_of(b).name
            same = int(base_a == base_b)
            for t in ts:
                fn = functional_features(outputs[a][t], outputs[b][t], outputs[base_a][t], outputs[base_b][t])
                rows.append({"a": a, "b": b, "task": t, "same_base": same,
                             "task_of_a": task_owner(catalogue.entry(a).tasks, catalogue.entry(b).tasks, t),
                             **fn, **structural[(a, b)]})
            bar.update()
    bar.close()
    return pd.DataFrame(rows, columns=ID_COLUMNS + FEATURE_COLUMNS)


# ============================================================================================ views for chapter 01
def describe_features() -> pd.DataFrame:
    """:data:`FEATURE_DOCS` as a table: feature, kind (functional / structural), definition."""
    return pd.DataFrame([{"feature": k, "kind": "functional" if k.startswith("fn_") else "structural",
                          "definition": v} for k, v in FEATURE_DOCS.items()])


def layer_profile(out_a: ProbeOutputs, out_b: ProbeOutputs) -> pd.DataFrame:
    """Per-layer signals behind the ``fn_*`` aggregates: relative depth, linear CKA, hidden-state cosine and
    attention cosine (NaN for the embedding layer, which has no attention)."""
    rows = []
    pairs = _align_layers(len(out_a.hidden), len(out_b.hidden))
    att = _align_layers(len(out_a.attention), len(out_b.attention))
    for k, (i, j) in enumerate(pairs):
        ha, hb = _np(out_a.hidden[i]), _np(out_b.hidden[j])
        rows.append({"layer": i, "depth": i / max(len(pairs) - 1, 1), "cka": linear_cka(ha, hb),
                     "hidden_cos": float(row_cosine(ha, hb).mean()) if ha.shape[-1] == hb.shape[-1] else NAN,
                     "attn_cos": cosine(out_a.attention[att[k - 1][0]], out_b.attention[att[k - 1][1]])
                     if k > 0 else NAN})
    return pd.DataFrame(rows)


def similarity_matrix(table: pd.DataFrame, column: str, diagonal: float | None = None) -> pd.DataFrame:
    """Model × model matrix of one feature, averaged over tasks and over the two orders (a, b) and (b, a).

    ``diagonal`` fills the self-similarity (1 for cosines and CKA, 0 for divergences); default: the column's
    value for identical models where known (``cos``/``cka``/``agree``/``jaccard`` → 1, else 0).
    """
    if column not in table.columns:
        raise KeyError(f"no feature column {column!r} in the table")
    mean = table.groupby(["a", "b"])[column].mean().unstack()
    names = sorted(set(mean.index) | set(mean.columns))
    mean = mean.reindex(index=names, columns=names)
    sym = (mean + mean.T) / 2
    sym = sym.fillna(mean).fillna(mean.T)
    if diagonal is None:
        diagonal = 1.0 if any(k in column for k in ("cos", "cka", "agree", "jaccard", "balance")) else 0.0
    values = sym.to_numpy(copy=True)
    np.fill_diagonal(values, diagonal)
    return pd.DataFrame(values, index=names, columns=names)


# ======================================================================================= files and the command
def features_path(profile: str) -> Path:
    """Where chapter 01 writes the features table of a profile: ``build/features/<profile>.parquet``."""
    return build_path("features", f"{profile}.parquet")


def write_table(df: pd.DataFrame, path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> Path:
    """Write a features table as Parquet atomically, with an optional JSON sidecar ``<path>.meta.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    if meta is not None:
        side = path.with_name(path.name + ".meta.json")
        tmp_meta = side.with_name(side.name + ".tmp")
        tmp_meta.write_text(json.dumps(dict(meta), indent=2) + "\n")
        os.replace(tmp_meta, side)
    return path


def _table_meta(catalogue: Catalogue, n_probes: int, tasks: str, density: float) -> dict[str, Any]:
    models = {m.name: ModelRef.folder(catalogue.path(m.name)).key for m in catalogue.models}
    return {"feature_version": FEATURE_VERSION, "catalogue": str(catalogue.root.resolve()),
            "recipe_hash": catalogue.recipe_hash, "n_probes": n_probes, "tasks": tasks, "density": density,
            "models": models}


def load_or_compute(catalogue: Catalogue, profile: str, n_probes: int | None = None,
                    tasks: Literal["parents", "all"] = "parents", density: float = TIES_DENSITY,
                    force: bool = False, progress: bool = True) -> pd.DataFrame:
    """The features table of ``profile`` from ``build/features/<profile>.parquet``, computed (and written) when
    missing or made from other checkpoints, probes or feature definitions."""
    n_probes = n_probes or N_PROBES.get(profile, N_PROBES["default"])
    path = features_path(profile)
    meta = _table_meta(catalogue, n_probes, tasks, density)
    side = path.with_name(path.name + ".meta.json")
    if not force and path.is_file() and side.is_file():
        try:
            if json.loads(side.read_text()) == meta:
                cached = pd.read_parquet(path)
                if "task_of_a" not in cached.columns:
                    # written before the column existed: a catalogue fact, added without recomputing anything, and
                    # written back so that readers of the file (chapters 05, 06, 08) see it too
                    cached = add_task_owner(cached, catalogue)
                    write_table(cached, path, meta)
                return cached
        except json.JSONDecodeError:
            pass
    df = compute_features(catalogue, n_probes=n_probes, tasks=tasks, progress=progress, density=density)
    write_table(df, path, meta)
    return df


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "features", help="compute the pair features table of a catalogue",
        description="Functional (probe) and structural (weight) similarity features, one row per ordered pair of "
                    "experts × task, written as Parquet.")
    p.add_argument("catalogue", help="catalogue folder or catalogue.json")
    p.add_argument("--out", required=True, help="output .parquet file")
    p.add_argument("--profile", choices=sorted(N_PROBES), default="default", help="sets the default --n-probes")
    p.add_argument("--n-probes", type=int, default=None, help="probe prompts per task (default: by profile)")
    p.add_argument("--probes", default=None, help='JSONL file of {"task": ..., "prompt": ...} to use instead')
    p.add_argument("--pairs", choices=["all", "same_base", "cross_base"], default="all", help="which expert pairs")
    p.add_argument("--tasks", choices=["parents", "all"], default="parents", help="tasks per pair")
    p.add_argument("--density", type=float, default=TIES_DENSITY, help="TIES density for the top-k overlap")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the on-disk probe-output cache")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    catalogue = Catalogue.load(args.catalogue)
    n_probes = args.n_probes or N_PROBES[args.profile]
    if not 0 < args.density <= 1:
        raise ValueError(f"--density must be in (0, 1], got {args.density}")
    probes = load_jsonl(args.probes, n_probes if args.n_probes else None) if args.probes else None
    if probes is not None:
        missing = sorted(set(catalogue.tasks) - set(probes.tasks))
        if missing:
            raise ValueError(f"{args.probes}: no prompts for task(s) {', '.join(missing)} of the catalogue")
    cache = ProbeCache(disk_dir=None) if args.no_cache else ProbeCache()
    df = compute_features(catalogue, n_probes=n_probes,
                          pairs=catalogue.pairs(args.pairs, ordered=True, distinct_tasks=False),
                          tasks=args.tasks, probes=probes, cache=cache, density=args.density)
    out = write_table(df, args.out, _table_meta(catalogue, n_probes, args.tasks, args.density))
    print(f"wrote {len(df)} rows × {len(FEATURE_COLUMNS)} features to {out} "
          f"({cache.forward_passes} probe passes, {cache.model_loads} model loads)")
    return 0
