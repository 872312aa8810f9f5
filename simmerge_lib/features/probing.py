"""Probe outputs: one forward pass of a model over a task's probe prompts (:func:`run_probes`), cached per model
and prompts in memory and on disk (:class:`ProbeCache`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..checkpoint import iter_tensors, quiet_transformers, weight_files
from ..paths import build_path
from ..probes import ProbeSet
from .columns import PROBE_VERSION
from .refs import ModelRef


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
        return self.disk_dir / ref.key / f"{task_key}-{dtype}-v{PROBE_VERSION}.pt"

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
