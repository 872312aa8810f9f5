"""Multi-document recipes (chapter 05's plans): one mergekit-format YAML document per merge step, ``---``-separated.

A document may carry a ``name`` (default ``step<i>``) and name an earlier document's result as a model with
``"@" + name`` (:data:`REF_PREFIX`) in ``models``, ``base_model`` or ``tokenizer_source``. mergekit reads each
document as an ordinary recipe; :func:`simmerge_lib.engine.merge_multi` executes them in order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .paths import map_model_names

#: How a recipe document names an earlier step's result: ``"@" + name``.
REF_PREFIX = "@"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def write_documents(docs: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], comment: str = "") -> Path:
    """Write recipe documents as one YAML file (atomically), ``comment`` as ``#`` lines on top."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    text = head + yaml.safe_dump_all([dict(d) for d in docs], sort_keys=False, explicit_start=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def read_documents(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The documents of a (multi-document) recipe file, checked: names unique and well-formed, every ``@name``
    reference naming an earlier document. A single document without ``name`` is returned as is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: recipe file not found")
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({str(exc).replace(chr(10), ' ')})") from None
    if not docs:
        raise ValueError(f"{path}: no recipe document")
    seen: list[str] = []
    for i, doc in enumerate(docs, start=1):
        if not isinstance(doc, Mapping):
            raise ValueError(f"{path}: document {i} is not a mapping")
        name = doc.get("name", f"step{i}" if len(docs) > 1 else None)
        if name is not None and (not isinstance(name, str) or not _NAME_RE.match(name)):
            raise ValueError(f"{path}: document {i} has an invalid name {name!r} (letters, digits, _ . -)")
        if name in seen:
            raise ValueError(f"{path}: document {i} repeats the name {name!r}")
        for ref in _references(doc):
            if ref not in seen:
                raise ValueError(f"{path}: document {i} names {REF_PREFIX}{ref}, which is not an earlier document "
                                 f"(earlier: {seen or 'none'})")
        seen.append(name)
    return [dict(d) for d in docs]


def _references(doc: Mapping[str, Any]) -> list[str]:
    names = [m.get("model") if isinstance(m, Mapping) else m for m in doc.get("models") or []]
    names += [doc.get("base_model"), doc.get("tokenizer_source")]
    return [n[len(REF_PREFIX):] for n in names if isinstance(n, str) and n.startswith(REF_PREFIX)]


def is_multi_document(path: str | os.PathLike[str]) -> bool:
    """Whether a recipe file holds several documents (or a named one): then :func:`merge_multi` runs it."""
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except (OSError, yaml.YAMLError):
        return False  # let the single-recipe path report the problem
    return len(docs) > 1 or (len(docs) == 1 and isinstance(docs[0], Mapping) and "name" in docs[0])


def resolve_references(doc: Mapping[str, Any], outputs: Mapping[str, str]) -> dict[str, Any]:
    """``doc`` with every ``@name`` replaced by the output folder of that earlier document (``outputs[name]``)."""
    return map_model_names(doc, lambda n: outputs[n[len(REF_PREFIX):]] if n.startswith(REF_PREFIX) else n)
