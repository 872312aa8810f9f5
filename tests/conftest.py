"""Shared fixtures: tiny Llama checkpoints and a tiny catalogue, made in seconds without training."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama(seed: int, hidden: int = 32, layers: int = 2):
    """A random-init Llama over the kit's vocabulary (hidden 32, 2 layers by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from simmerge_lib.tokenizer import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tok


def perturbed(model, seed: int, scale: float = 0.02, only: str | None = None):
    """A copy of ``model`` with a seeded random task vector added (to tensors whose name contains ``only``)."""
    import copy

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if only is None or only in name:
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


@pytest.fixture(scope="session")
def tiny_catalogue(tmp_path_factory) -> Path:
    """Two random bases, three perturbed 'experts' each (tasks reverse, sort, max); returns the catalogue folder."""
    from simmerge_lib.catalogue import Catalogue, ModelEntry
    from simmerge_lib.checkpoint import save_pretrained_atomic

    root = tmp_path_factory.mktemp("tiny_catalogue")
    models = []
    tasks = ["reverse", "sort", "max"]
    for b in range(2):
        base, tok = tiny_llama(seed=100 + b)
        save_pretrained_atomic(base, tok, root / f"base{b}", {"role": "base"})
        models.append(ModelEntry(name=f"base{b}", path=f"base{b}", role="base"))
        for i, task in enumerate(tasks):
            only = [None, "mlp", "self_attn"][i]
            expert = perturbed(base, seed=10 * b + i, only=only)
            name = f"base{b}-{task}"
            save_pretrained_atomic(expert, tok, root / name, {"role": "expert", "base": f"base{b}", "tasks": [task]})
            models.append(ModelEntry(name=name, path=name, role="expert", base=f"base{b}", tasks=[task]))
    Catalogue(root=root, name="tiny", tasks=tasks, models=models).save()
    return root
