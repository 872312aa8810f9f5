"""The models the features read: checkpoint folders or in-memory models (:class:`ModelRef`), and their tensors
one at a time (:class:`TensorReader`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..checkpoint import CheckpointError, quiet_transformers, weight_files
from ..engine import TensorInfo, read_header, read_tensor
from ..tokenizer import build_tokenizer

#: Elements per slice when converting or accumulating a tensor: temporaries stay a few 16 MB buffers whatever the
#: tensor's size (the tensors themselves, three or four at a time, are what a huge pair costs).
_CHUNK = 1 << 22


class TensorReader:
    """Read a checkpoint's tensors one at a time by name (a folder's safetensors shards, or a state dict).

    Files are read with the merge engine's reader (:func:`simmerge_lib.engine.read_header`,
    :func:`simmerge_lib.engine.read_tensor`): ``pread`` into a fresh buffer, each shard opened once and closed by
    :meth:`close`. Not ``safe_open``: its memory map keeps every page read so far in the resident set while the file
    stays open, so the structural features of a large pair would hold far more than the few tensors they work on.
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
        bytes never sit in memory whole beside it.
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
                self.tokenizer = AutoTokenizer.from_pretrained(folder)
            else:
                self.tokenizer = build_tokenizer()
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        return self.tokenizer

    def load_model(self, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The model, ready for a forward pass that returns attentions (eager attention)."""
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
