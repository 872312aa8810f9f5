"""The one merge driver: everything around the tensors of a merge, shared by the single-process engine
(:func:`merge`) and distributed merging (:mod:`.distributed`).

:func:`prepare_output` refuses an existing ``OUT`` (unless ``force``), plans the merge, refuses an ``OUT`` that
overlaps an input, keeps the shards of an interrupted run whose plan fingerprint matches (``resume``) and checks the
free disk space; :func:`write_output` writes the missing shards through a caller's function into ``OUT.partial``,
checks that every shard is finished, writes the safetensors index and the side files (config, tokenizer, recipe,
card) and renames ``OUT.partial`` to ``OUT``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..checkpoint import CARD_FILE, INDEX_FILE, CheckpointError, atomic_folder, write_json_atomic
from ..documents import read_documents, resolve_references
from ..recipe import Recipe
from .execute import run_shards
from .layout import Shard, ShardLayout, plan_merge

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
#: Written into ``OUT.partial`` while a merge runs: the plan's fingerprint, which resuming compares.
PLAN_FILE = ".simmerge_plan.json"


@dataclass
class MergeOutput:
    """An output folder being written: its plan and the shards an interrupted run already finished."""

    out: Path
    plan: ShardLayout
    done: set[int] = field(default_factory=set)

    @property
    def partial(self) -> Path:
        return self.out.with_name(self.out.name + ".partial")

    @property
    def pending(self) -> list[int]:
        """The shards still to write, in order."""
        return [i for i in range(len(self.plan.shards)) if i not in self.done]


def prepare_output(recipe: Recipe, out: str | os.PathLike[str], shard_size: str | int = "2GB",
                   compute_dtype: str | None = None, resume: bool = False, force: bool = False,
                   tool: str = "merge") -> MergeOutput:
    """Plan ``recipe`` into ``out`` and check everything before work (see the module docstring); ``tool`` names
    the command in messages."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (pass --force to overwrite)")
    plan = plan_merge(recipe, shard_size, compute_dtype)
    check_output_location(out, plan)
    target = MergeOutput(out, plan)
    target.done = _resumable_shards(target, resume, tool)
    needed = sum(plan.shards[i].size for i in target.pending)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise CheckpointError(f"{out.parent}: not enough disk space ({free} bytes free, {needed} needed)")
    return target


def _resumable_shards(target: MergeOutput, resume: bool, tool: str) -> set[int]:
    """The finished shards of an interrupted run with the same plan (``resume``); every other file of an earlier
    ``OUT.partial`` is removed (the whole folder when its plan differs or when not resuming)."""
    partial, plan = target.partial, target.plan
    plan_file = partial / PLAN_FILE
    if not partial.exists():
        if resume:
            print(f"simmerge {tool}: nothing to resume in {partial}; starting afresh")
        return set()
    previous = json.loads(plan_file.read_text()).get("fingerprint") if resume and plan_file.is_file() else None
    if not (resume and previous == plan.fingerprint):
        if resume and previous is not None:
            print(f"simmerge {tool}: {partial} was made by another recipe or other inputs; starting afresh")
        shutil.rmtree(partial)
        return set()
    done = {i for i, s in enumerate(plan.shards) if shard_finished(partial / s.name, s)}
    keep = {plan.shards[i].name for i in done}
    for p in partial.iterdir():
        if p.name.endswith(".tmp") or (p.suffix == ".safetensors" and p.name not in keep):
            p.unlink()
    return done


def write_output(target: MergeOutput, write_shards: Callable[[Path, list[int]], None], force: bool = False
                 ) -> Path:
    """Write the pending shards with ``write_shards(partial_dir, shards)``, then the index and the side files,
    and rename ``OUT.partial`` to ``OUT`` (:func:`~simmerge_lib.checkpoint.atomic_folder`)."""
    plan = target.plan
    with atomic_folder(target.out, force=force) as partial_dir:
        plan_file = partial_dir / PLAN_FILE
        write_json_atomic(plan_file, {"fingerprint": plan.fingerprint})
        write_shards(partial_dir, target.pending)
        missing = [s.name for s in plan.shards if not shard_finished(partial_dir / s.name, s)]
        if missing:
            raise CheckpointError(f"{partial_dir}: shard {missing[0]} was not finished ({len(missing)} missing)")
        write_json_atomic(partial_dir / INDEX_FILE, {
            "metadata": {"total_size": sum(j.nbytes for j in plan.jobs)},
            "weight_map": {j.name: s.name for s in plan.shards for j in s.jobs}})
        copy_side_files(plan, partial_dir)
        plan_file.unlink()
    return target.out


def shard_finished(path: Path, shard: Shard) -> bool:
    """Whether ``path`` is a finished copy of the planned output ``shard``: its final size and the plan's header.

    A shard only gets its final name once all its tensors are written, and the header encodes every tensor's
    name, dtype, shape and offset, so size + header is what resuming (single-process or distributed) checks."""
    if not path.is_file() or path.stat().st_size != shard.size:
        return False
    with open(path, "rb") as fh:
        return fh.read(len(shard.header)) == shard.header


def check_output_location(out: Path, plan: ShardLayout) -> None:
    """Refuse (``ValueError``) an output folder ``out`` (or its ``.partial``) that is, contains, or lies inside
    one of the plan's input folders: replacing it would delete the inputs being read."""
    targets = [out.resolve(), out.resolve().with_name(out.name + ".partial")]
    folders = list(plan.inputs) + [plan.recipe.tokenizer_folder().resolve()]
    for folder in folders:
        for target in targets:
            if target == folder or target in folder.parents or folder in target.parents:
                raise ValueError(f"{out}: output overlaps the input model {folder}; choose another folder")


def output_config(plan: ShardLayout) -> dict[str, Any] | None:
    """The output's ``config.json``: the reference model's, with the output dtype, the number of layers of a
    sliced merge (and per-layer lists such as ``layer_types`` rebuilt layer by layer) and the vocabulary size of
    an aligned vocabulary. None when the reference has no config."""
    cfg_src = plan.reference.folder / "config.json"
    if not cfg_src.is_file():
        return None
    config = json.loads(cfg_src.read_text())
    out_dtype = plan.recipe.output_dtype()
    if out_dtype is not None:
        name = str(out_dtype).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    if plan.recipe.slices is not None and plan.out_layers is not None:
        before = config.get("num_hidden_layers")
        config["num_hidden_layers"] = plan.out_layers
        models = {n: plan.inputs[plan.recipe.resolve_path(n).resolve()].config
                  for n in dict.fromkeys(m for m, _ in plan.layer_sources)}
        for key, value in list(config.items()):
            if isinstance(value, list) and before and len(value) == before and key != "architectures":
                config[key] = [_layer_value(models[m], key, i, value) for m, i in plan.layer_sources]
    if plan.vocab is not None:
        config["vocab_size"] = plan.vocab.size
    return config


def _layer_value(config: Mapping[str, Any], key: str, layer: int, fallback: list[Any]) -> Any:
    values = config.get(key)
    if isinstance(values, list) and layer < len(values):
        return values[layer]
    return fallback[min(layer, len(fallback) - 1)]


def copy_side_files(plan: ShardLayout, partial: Path) -> None:
    """Write everything but the weights into ``partial``: the output config (:func:`output_config`) and the
    reference's ``generation_config.json``, the tokenizer (the aligned vocabulary's, else the files of the
    recipe's tokenizer source), the recipe with absolute paths (``mergekit_config.yml``) and the model card.

    The last step of a merge, single-process or distributed (chapter 07), once all shards are in place."""
    recipe = plan.recipe
    config = output_config(plan)
    if config is not None:
        write_json_atomic(partial / "config.json", config)
    gen = plan.reference.folder / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, partial / gen.name)
    if plan.vocab is not None and plan.vocab.tokenizer is not None:
        plan.vocab.tokenizer.save_pretrained(str(partial))
    else:
        tok = recipe.tokenizer_folder()
        if not tok.is_dir():
            raise FileNotFoundError(f"{tok}: tokenizer_source folder not found")
        for fname in TOKENIZER_FILES:
            if (tok / fname).is_file():
                shutil.copyfile(tok / fname, partial / fname)
    resolved = recipe.with_paths_resolved()
    resolved.to_yaml(partial / "mergekit_config.yml")
    write_json_atomic(partial / CARD_FILE, {"role": "merge", "recipe": resolved.to_dict()})


def merge(recipe: Recipe, out: str | os.PathLike[str], device: str = "cpu", resume: bool = False,
          force: bool = False, shard_size: str | int = "2GB", threads: int | None = None,
          progress: bool = True, compute_dtype: str | None = None) -> Path:
    """Carry ``recipe`` out into the checkpoint folder ``out`` (streaming; see the package docstring).

    ``compute_dtype="float32"`` computes in float32 whatever the recipe's ``dtype`` (which then only sets the
    output dtype): task vectors of fine-tunes are small differences of large weights, which float16 / bfloat16
    resolve to a few bits (a bfloat16 delta of 1e-3 on a weight of 1 keeps 1 significant bit), so a float32
    merge is closer to the exact one; the price is a merge that differs from mergekit's by those roundings."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available")
    target = prepare_output(recipe, out, shard_size, compute_dtype, resume, force)
    plan = target.plan
    n_threads = threads or min(4, max(2, os.cpu_count() or 1))

    def write_shards(partial_dir: Path, shards: list[int]) -> None:
        bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc=f"merge {target.out.name}",
                   disable=not progress, initial=sum(plan.shards[i].size for i in target.done))
        try:
            run_shards(plan, partial_dir, dev, shards, n_threads, bar, plan.memory_bound)
        finally:
            bar.close()

    return write_output(target, write_shards, force)


def merge_multi(path: str | os.PathLike[str], out: str | os.PathLike[str], keep_steps: bool = False,
                force: bool = False, resume: bool = False, **engine_kwargs: Any) -> Path:
    """Execute a multi-document recipe with the streaming engine: each document in order, ``@name`` references
    resolved to the earlier outputs, intermediates under ``.OUT.steps/`` (removed unless ``keep_steps``), the last
    document into ``out``. ``resume`` keeps finished intermediate steps of an interrupted run."""
    path, out = Path(path), Path(out)
    docs = read_documents(path)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (pass --force to overwrite)")
    steps_dir = out.parent / f".{out.name}.steps"
    outputs: dict[str, str] = {}
    for i, doc in enumerate(docs, start=1):
        name = doc.pop("name", f"step{i}")
        resolved = resolve_references(doc, outputs)
        recipe = Recipe.from_dict(resolved, root=path.resolve().parent, source=f"{path} (document {i}: {name})")
        last = i == len(docs)
        target = out if last else steps_dir / name
        if not last and resume and target.is_dir() and (target / "config.json").is_file():
            outputs[name] = str(target.resolve())
            continue
        merge(recipe, target, force=force if last else True, resume=resume, **engine_kwargs)
        outputs[name] = str(target.resolve())
    if not keep_steps and steps_dir.exists():
        shutil.rmtree(steps_dir)
    return out
