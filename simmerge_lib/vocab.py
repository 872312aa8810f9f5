"""Vocabulary alignment for ``tokenizer_source`` (chapter 02): the rows of the embedding and output-head matrices
follow the tokenizer, so models whose tokenizers differ must be brought to one output vocabulary before merging.

Semantics (mergekit's), for ``tokenizer_source``:

- ``base``: the output vocabulary is the base model's (the first model's when there is no base);
- a model path: that model's tokenizer;
- ``union``: the base's tokens, then every other model's tokens it lacks (in recipe order), then the added
  (special) tokens of all of them.

Each model's vocabulary matrix is then re-indexed to the output vocabulary: row ``i`` is the model's row for the
token with output id ``i``. A token the model lacks gets a default row from the models merged with it: the only
model that has it, else the base when the base has it, else the mean of the models that have it, else zeros.
When every model already has the output vocabulary in the same order (the usual case: fine-tunes of one base),
nothing is re-indexed and transformers is not even imported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

#: Tensors whose rows follow the tokenizer (embeddings and output heads of the common decoder families).
VOCAB_TENSOR = re.compile(r"(?:^|\.)(?:embed_tokens|lm_head|wte|embed_in|embed_out|word_embeddings)\.weight$")
#: Files that define a tokenizer's vocabulary (byte-identical files mean identical vocabularies).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json",
               "tokenizer_config.json", "special_tokens_map.json")


def is_vocab_tensor(name: str) -> bool:
    """Whether the rows of tensor ``name`` are indexed by token id."""
    return VOCAB_TENSOR.search(name) is not None


@dataclass
class VocabPlan:
    """The output vocabulary and, per model, the row of each output token in that model's matrices (-1: absent).
    ``tokenizer`` is a transformers tokenizer to save with the merge (None: the tokenizer source's files are
    copied)."""

    size: int
    index: dict[str, Tensor]
    tokenizer: Any = None

    def align(self, tensors: list[Tensor], models: Sequence[str], base: str | None) -> list[Tensor]:
        """The tensors of ``models`` (same order) re-indexed to the output vocabulary (see the module docstring
        for the rows of tokens a model lacks)."""
        present = torch.stack([self.index[m] >= 0 for m in models])  # (models, size)
        count = present.sum(0)
        missing = (count < len(models)).nonzero().view(-1)
        default = None
        if len(missing):
            width = tensors[0].shape[1:]
            default = torch.zeros((len(missing), *width), dtype=tensors[0].dtype)
            where = present[:, missing]
            n = count[missing]
            single = n == 1
            use_base = ~single & (n > 1)
            if base in models:
                use_base &= where[list(models).index(base)]
            else:
                use_base &= False
            average = (n > 1) & ~use_base
            for k, (model, x) in enumerate(zip(models, tensors)):
                rows = self.index[model][missing]
                has = where[k]
                take = has & (single | average)
                if base == model:
                    take |= has & use_base
                if take.any():
                    default[take] += x[rows[take]]
            default[average] /= n[average].view(-1, *([1] * len(width))).to(default.dtype)
        out = []
        for model, x in zip(models, tensors):
            rows = self.index[model]
            aligned = x[rows.clamp(min=0)]
            if default is not None:
                aligned[missing] = torch.where(present[list(models).index(model), missing].view(
                    -1, *([1] * (x.dim() - 1))), aligned[missing], default)
            out.append(aligned)
        return out


def _same_files(folders: Sequence[Path]) -> bool:
    first = folders[0]
    for name in VOCAB_FILES:
        contents = {(f / name).read_bytes() if (f / name).is_file() else None for f in folders}
        if len(contents) > 1:
            return False
    return any((first / n).is_file() for n in VOCAB_FILES)


def plan_vocab(recipe: Any, folders: Mapping[str, Path], configs: Mapping[str, Mapping[str, Any]]
               ) -> VocabPlan | None:
    """The vocabulary alignment a recipe asks for, or None when there is nothing to re-index (no
    ``tokenizer_source``, or every merged model shares the output tokenizer)."""
    source = recipe.tokenizer_source
    if source is None:
        return None
    models = list(folders)
    base = recipe.base_model if recipe.base_model in folders else recipe.reference_model()
    out_folder = recipe.tokenizer_folder() if source not in ("base", "union") else folders[base]
    sizes = {m: configs[m].get("vocab_size") for m in models}
    if _same_files([*folders.values(), out_folder]) and len(set(sizes.values())) == 1:
        return None  # one tokenizer everywhere: identity
    from transformers import AutoTokenizer  # only when vocabularies really differ

    toks = {m: AutoTokenizer.from_pretrained(str(folders[m])) for m in models}
    for m in models:
        sizes[m] = int(sizes[m] or len(toks[m]))
    order = [base] + [m for m in models if m != base]
    tokenizer = None
    if source == "union":
        tokenizer = _union(AutoTokenizer.from_pretrained(str(folders[base])), [toks[m] for m in order],
                           [sizes[m] for m in order])
        vocab = tokenizer.get_vocab()
    elif source == "base":
        vocab = {t: i for t, i in toks[base].get_vocab().items() if i < sizes[base]}
    else:
        vocab = AutoTokenizer.from_pretrained(str(out_folder)).get_vocab()
    size = len(vocab)
    if sorted(vocab.values()) != list(range(size)):
        raise ValueError(f"{recipe.source}: the output vocabulary's token ids are not 0..{size - 1}")
    by_id = [""] * size
    for t, i in vocab.items():
        by_id[i] = t
    index = {}
    for m in models:
        own = toks[m].get_vocab()
        index[m] = torch.tensor([own[t] if own.get(t, sizes[m]) < sizes[m] else -1 for t in by_id],
                                dtype=torch.int64)
    identity = torch.arange(size)
    if all(sizes[m] == size and torch.equal(index[m], identity) for m in models) and tokenizer is None:
        return None
    return VocabPlan(size, index, tokenizer)


def _union(result: Any, tokenizers: Sequence[Any], sizes: Sequence[int]) -> Any:
    """``result`` (a fresh copy of the base tokenizer) extended by every token of ``tokenizers`` (base first) it
    lacks: ordinary tokens first, in order of appearance, then added tokens."""
    ordinary: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, size in zip(tokenizers, sizes):
        special = tok.added_tokens_decoder
        names = {info.content for info in special.values()}
        for t, i in tok.get_vocab().items():
            if i < size and t not in names:
                ordinary.setdefault(t, None)
        for i, info in special.items():
            if i < size:
                added.setdefault(info.content, info)
    known = result.get_vocab()
    for t in ordinary:
        if t not in known and t not in added:
            result.add_tokens(t)
    for info in added.values():
        result.add_tokens(info)
    return result
