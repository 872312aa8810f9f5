"""Persistence with skops (refusing any type outside :data:`TRUSTED_TYPES`) and the profile's tables
(:func:`load_tables`: catalogue, features, labels and reference of chapters 00, 01 and 03)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sklearn
import skops
import skops.io as sio

from .. import __version__, zoo
from ..catalogue import Catalogue
from ..features import features_path, load_or_compute
from ..labels import collect_labels, labels_path, load_labels, make_jobs, profile_settings, reference_path
from ..paths import build_path
from ..probes import profile_n_probes
from .model import PREDICTOR_FORMAT, Predictor


#: Types (beyond skops' defaults) a predictor file may contain; anything else makes :func:`load_predictor` refuse.
TRUSTED_TYPES = [
    "numpy.dtype", "numpy.ndarray", "numpy.float64", "numpy.int64", "numpy.random.mtrand.RandomState",
    "numpy.random._pcg64.PCG64", "numpy.random._mt19937.MT19937", "builtins.slice", "builtins.object",
    "sklearn.tree._tree.Tree", "sklearn.utils._bunch.Bunch", "collections.OrderedDict",
]


def predictor_path(profile: str) -> Path:
    """Where a profile's predictor lives: ``build/predictor/<profile>.skops``."""
    return build_path("predictor", f"{profile}.skops")


def catalogue_predictor(catalogue: Catalogue, path: str | os.PathLike[str] | None = None) -> Predictor:
    """The predictor to use on ``catalogue``: the file ``path``, else its profile's
    (:func:`predictor_path` of the catalogue's name, a transfer catalogue using its training profile's)."""
    return load_predictor(path or predictor_path(catalogue.name.removeprefix("transfer-")))


def _versions() -> dict[str, str]:
    return {"sklearn": sklearn.__version__, "skops": skops.__version__, "numpy": np.__version__,
            "pandas": pd.__version__, "simmerge_lib": __version__}


def save_predictor(predictor: Predictor, path: str | os.PathLike[str]) -> Path:
    """Write the predictor with skops, atomically; metadata includes feature names, candidates and versions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": PREDICTOR_FORMAT, "family": predictor.family, "feature_names": list(predictor.feature_names),
             "candidates": list(predictor.candidates), "advantage": predictor.advantage, "level": predictor.level,
             "fixed": predictor.fixed, "margin": float(predictor.margin),
             "task_conditioned": bool(predictor.task_conditioned), "constant": json.dumps(predictor.constant),
             "classifier": predictor.classifier, "vote_weight": float(predictor.vote_weight),
             "metadata": json.dumps({**predictor.metadata, "versions": _versions()})}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        sio.dump(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_predictor(path: str | os.PathLike[str]) -> Predictor:
    """Load a predictor saved by :func:`save_predictor`, refusing any type outside skops' defaults and
    :data:`TRUSTED_TYPES` (so a tampered file cannot run code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictor file (train and save one with chapter 04, "
                                "notebooks/04_predictor_training.ipynb)")
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # noqa: BLE001 - a corrupt file surfaces as many exception types
        raise ValueError(f"{path}: not a skops predictor file ({type(exc).__name__}: {exc})") from None
    refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if refused:
        raise ValueError(f"{path}: refusing to load untrusted type(s) {refused}")
    state = sio.load(path, trusted=list(untrusted))
    if not isinstance(state, dict) or state.get("format") != PREDICTOR_FORMAT:
        raise ValueError(f"{path}: not a simmerge predictor of format {PREDICTOR_FORMAT} (retrain it with chapter 04)")
    return Predictor(family=state["family"], feature_names=list(state["feature_names"]),
                     candidates=list(state["candidates"]), advantage=state["advantage"], level=state["level"],
                     fixed=state["fixed"], margin=float(state["margin"]),
                     task_conditioned=bool(state["task_conditioned"]), constant=json.loads(state["constant"]),
                     classifier=state["classifier"], vote_weight=float(state["vote_weight"]),
                     metadata=json.loads(state["metadata"]))


def load_tables(profile: str, transfer: bool = False, build: bool = True, progress: bool = True
                ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, Any]:
    """(features, labels, reference, catalogue) of a profile's catalogue, or of its transfer catalogue
    (``transfer=True``): read from ``build/`` when present; otherwise, with ``build``, trained / computed /
    collected with the profile's settings (chapters 00, 01 and 03), else FileNotFoundError."""
    name = f"transfer-{profile}" if transfer else profile
    fpath, lpath = features_path(name), labels_path(name)
    if not build and not (fpath.is_file() and lpath.is_file()):
        missing = [str(p) for p in (fpath, lpath) if not p.is_file()]
        raise FileNotFoundError(f"{', '.join(missing)}: missing (run chapters 00, 01 and 03 for profile {name!r})")
    if not build:
        catalogue = Catalogue.load(zoo.catalogue_dir(name))
    else:
        catalogue = (zoo.build_transfer_catalogue(profile, progress=progress) if transfer
                     else zoo.build_catalogue(profile, progress=progress))
    features = load_or_compute(catalogue, name, n_probes=profile_n_probes(profile), progress=progress)
    jobs = make_jobs(catalogue, **profile_settings(profile))
    if lpath.is_file() and not build:
        labels = load_labels(lpath)
    else:
        labels = collect_labels(catalogue, jobs, lpath, progress=progress)
    reference = pd.read_parquet(reference_path(lpath))
    return features, labels, reference, catalogue
