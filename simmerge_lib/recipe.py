"""Merge recipes in mergekit's YAML format, so that a recipe moves between SimMerge and mergekit unchanged.

Supported schema (a subset of mergekit's; any other key is an error, never silently ignored)::

    merge_method: ties                 # a name in simmerge_lib.operators.OPERATORS
    base_model: ../zoo/base0           # local folder; relative paths are relative to the recipe file
    models:
      - model: ../zoo/base0-reverse
        parameters: {weight: 0.5, density: [0.2, 0.8]}          # per-model: scalar, gradient, filters
      - model: ../zoo/base0-sort
        parameters: {weight: [{filter: mlp, value: 0.7}, {value: 0.3}]}
    parameters: {lambda: 1.0, normalize: true}                   # global (and defaults for per-model ones)
    dtype: bfloat16                    # output dtype (computation is always float32)
    out_dtype: bfloat16                # optional, overrides dtype for the output
    tokenizer_source: base             # base (default) or a model path; its tokenizer files are copied
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .operators import get_operator

TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
#: mergekit keys SimMerge does not implement (named in the error so the user knows it is a known key).
UNSUPPORTED_MERGEKIT_KEYS = {"slices", "modules", "tokenizer", "chat_template"}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64,
}


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file (when known) and the problem."""


@dataclass
class ModelSpec:
    """One input model of a recipe and its own parameters."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """A parsed, validated merge recipe (see the module docstring for the schema)."""

    merge_method: str
    models: list[ModelSpec]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    #: Folder that relative model paths are relative to (the recipe file's folder); None = current directory.
    root: Path | None = None
    source: str = "<recipe>"

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike[str]) -> Recipe:
        """Parse a recipe file (or YAML text containing a newline); model paths resolve against its folder."""
        text_given = isinstance(path_or_text, str) and "\n" in path_or_text
        if text_given:
            text, root, source = str(path_or_text), None, "<recipe>"
        else:
            path = Path(path_or_text)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: recipe file not found")
            text, root, source = path.read_text(), path.resolve().parent, str(path)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            problem = str(exc).replace("\n", " ")
            raise RecipeError(f"{source}: not valid YAML ({problem})") from None
        return cls.from_dict(data, root=root, source=source)

    @classmethod
    def from_dict(cls, data: Any, root: str | os.PathLike[str] | None = None, source: str = "<recipe>") -> Recipe:
        """Validate a recipe given as a dict (mergekit's schema)."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{source}: a recipe must be a mapping, got {type(data).__name__}")
        unknown = set(data) - TOP_LEVEL_KEYS
        if unknown & UNSUPPORTED_MERGEKIT_KEYS:
            raise RecipeError(f"{source}: mergekit key(s) {sorted(unknown & UNSUPPORTED_MERGEKIT_KEYS)} are not "
                              f"supported by simmerge (use 'models' with per-model parameters)")
        if unknown:
            raise RecipeError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: {sorted(TOP_LEVEL_KEYS)}")
        if "merge_method" not in data:
            raise RecipeError(f"{source}: missing 'merge_method'")
        raw_models = data.get("models")
        if not isinstance(raw_models, list) or not raw_models:
            raise RecipeError(f"{source}: 'models' must be a non-empty list")
        models = []
        for i, entry in enumerate(raw_models):
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, Mapping) or "model" not in entry:
                raise RecipeError(f"{source}: models[{i}] must be a mapping with a 'model' key")
            extra = set(entry) - {"model", "parameters"}
            if extra:
                raise RecipeError(f"{source}: models[{i}] has unknown key(s) {sorted(extra)}")
            params = entry.get("parameters") or {}
            if not isinstance(params, Mapping):
                raise RecipeError(f"{source}: models[{i}].parameters must be a mapping")
            models.append(ModelSpec(model=str(entry["model"]), parameters=dict(params)))
        params = data.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise RecipeError(f"{source}: 'parameters' must be a mapping")
        recipe = cls(merge_method=str(data["merge_method"]), models=models,
                     base_model=None if data.get("base_model") is None else str(data["base_model"]),
                     parameters=dict(params), dtype=data.get("dtype"), out_dtype=data.get("out_dtype"),
                     tokenizer_source=data.get("tokenizer_source"),
                     root=Path(root) if root is not None else None, source=source)
        recipe.validate()
        return recipe

    # --- validation ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check method, parameter names and shapes, dtypes and the number of models."""
        src = self.source
        try:
            op = get_operator(self.merge_method)
        except ValueError as exc:
            raise RecipeError(f"{src}: {exc}") from None
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise RecipeError(f"{src}: {key} {value!r} not supported (one of {sorted(DTYPES)})")
        if self.tokenizer_source == "union":
            raise RecipeError(f"{src}: tokenizer_source 'union' is not supported (use 'base' or a model path)")
        allowed_global = set(op.global_params) | set(op.model_params)
        for key, setting in self.parameters.items():
            if key not in allowed_global:
                raise RecipeError(f"{src}: parameter {key!r} is not used by {self.merge_method} "
                                  f"(it takes {sorted(allowed_global)})")
            _check_setting(setting, f"{src}: parameters.{key}")
        for i, spec in enumerate(self.models):
            for key, setting in spec.parameters.items():
                if key not in op.model_params:
                    where = "a global parameter" if key in op.global_params else "not used"
                    raise RecipeError(f"{src}: models[{i}].parameters.{key}: {where} for {self.merge_method} "
                                      f"(per-model parameters: {sorted(op.model_params) or 'none'})")
                _check_setting(setting, f"{src}: models[{i}].parameters.{key}")
        for key, default in op.global_params.items():
            if default is None and key not in self.parameters:
                raise RecipeError(f"{src}: {self.merge_method} needs the global parameter {key!r}")
        if op.needs_base and self.base_model is None:
            raise RecipeError(f"{src}: {self.merge_method} needs a base_model")
        n = len(self.merge_inputs()[0])
        if n < op.min_models or (op.max_models is not None and n > op.max_models):
            want = f"exactly {op.min_models}" if op.min_models == op.max_models else f"at least {op.min_models}"
            raise RecipeError(f"{src}: {self.merge_method} needs {want} model(s) besides the base, got {n}")

    # --- derived views ------------------------------------------------------------------------------------
    def resolve_path(self, model: str) -> Path:
        """A model path as a folder on disk (relative paths are relative to the recipe's folder)."""
        path = Path(model).expanduser()
        if not path.is_absolute() and self.root is not None:
            path = self.root / path
        return path

    def merge_inputs(self) -> tuple[list[ModelSpec], ModelSpec | None]:
        """(inputs besides the base, base) as the operators see them, following mergekit: the base listed among
        ``models`` is the base, not an input (except for linear, where every listed model is averaged, and a
        base_model that is not listed joins the average with the global parameters)."""
        op = get_operator(self.merge_method)
        base_spec = None
        if self.base_model is not None:
            listed = [m for m in self.models if m.model == self.base_model]
            base_spec = listed[0] if listed else ModelSpec(self.base_model)
        if not op.needs_base:
            inputs = list(self.models)
            if base_spec is not None and base_spec not in inputs:
                inputs.append(base_spec)
            return inputs, None
        return [m for m in self.models if m.model != self.base_model], base_spec

    def output_dtype(self) -> torch.dtype | None:
        """The dtype written (out_dtype, else dtype); None keeps each tensor's input dtype."""
        name = self.out_dtype or self.dtype
        return DTYPES[name] if name else None

    def tokenizer_folder(self) -> Path:
        """Where the tokenizer (and config) files are copied from."""
        src = self.tokenizer_source
        if src in (None, "base"):
            return self.resolve_path(self.base_model or self.models[0].model)
        return self.resolve_path(src)

    def folders(self) -> list[Path]:
        """Every input folder the recipe reads."""
        names = [m.model for m in self.models] + ([self.base_model] if self.base_model else [])
        return [self.resolve_path(n) for n in dict.fromkeys(names)]

    # --- serialization ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The recipe as mergekit's schema (paths as written, defaults omitted)."""
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            out["base_model"] = self.base_model
        out["models"] = [{"model": m.model, **({"parameters": m.parameters} if m.parameters else {})}
                         for m in self.models]
        if self.parameters:
            out["parameters"] = self.parameters
        for key in ("dtype", "out_dtype", "tokenizer_source"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """YAML text (mergekit-readable); also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def with_paths_resolved(self) -> Recipe:
        """A copy whose model paths are absolute (for writing the recipe somewhere else)."""
        def fix(p: str) -> str:
            return str(self.resolve_path(p).resolve())

        tok = self.tokenizer_source
        return Recipe(merge_method=self.merge_method,
                      models=[ModelSpec(fix(m.model), dict(m.parameters)) for m in self.models],
                      base_model=fix(self.base_model) if self.base_model else None,
                      parameters=dict(self.parameters), dtype=self.dtype, out_dtype=self.out_dtype,
                      tokenizer_source=tok if tok in (None, "base") else fix(tok), root=None, source=self.source)


def _check_setting(setting: Any, where: str) -> None:
    scalar = (bool, int, float, str)
    if isinstance(setting, scalar):
        return
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, list) and setting:
        if all(isinstance(v, scalar) for v in setting):
            return
        for cond in setting:
            if not isinstance(cond, Mapping) or "value" not in cond or set(cond) - {"value", "filter"}:
                raise RecipeError(f"{where}: each entry must be a number or a {{filter, value}} mapping")
            _check_setting(cond["value"], where)
        return
    raise RecipeError(f"{where}: expected a number, a list of numbers (gradient) or filters, got {setting!r}")
