"""Merge recipes in mergekit's YAML format, so that a recipe moves between SimMerge and mergekit unchanged.

Supported schema (every key below is honoured; any other key is an error naming it and the nearest supported form,
never silently ignored)::

    merge_method: ties                 # a name in simmerge_lib.operators.OPERATORS
    base_model: ../zoo/base0           # local folder; relative paths are relative to the recipe file
    models:                            # either models ...
      - model: ../zoo/base0-reverse
        parameters: {weight: 0.5, density: [0.2, 0.8]}          # per-model: scalar, gradient, filters
      - model: ../zoo/base0-sort
        parameters: {weight: [{filter: mlp, value: 0.7}, {value: 0.3}]}
    slices:                            # ... or slices: output layers made from layer ranges of the inputs
      - sources:
          - {model: ../zoo/a, layer_range: [0, 24], parameters: {weight: 0.5}}
          - {model: ../zoo/b, layer_range: [0, 24]}
        parameters: {t: [0, 1]}        # the slice's own parameters (between per-source and global)
        base_model: ../zoo/a           # optional, overrides the recipe's base_model for this slice
    parameters: {lambda: 1.0, normalize: true}                   # global (and defaults for per-model ones)
    dtype: float16                     # the dtype the merge is computed in (mergekit's meaning)
    out_dtype: bfloat16                # optional, the dtype written (default: dtype)
    tokenizer_source: base             # base, union, or a model path (embeddings follow the output vocabulary)

With ``slices``, output layers are the slices' layers in order (renumbered from 0); gradients run over each slice's
own layers; tensors outside the layers (embeddings before, final norm and head after) come from the first and the
last slice. ``merge_method: passthrough`` with one source per slice stacks layers (a "frankenmerge").

Keys SimMerge reads differently from mergekit, on purpose and documented: ``int8_mask`` is accepted and has no
effect (in mergekit it only picks the dtype of an internal 0/1 mask); ``seed`` (DARE, DELLA) is a SimMerge
extension that mergekit ignores; a per-model ``weight`` defaults to 1 where mergekit requires it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .operators import Operator, get_operator, merge_state_dicts

TOP_LEVEL_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                  "tokenizer_source")
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "parameters", "base_model")
SOURCE_KEYS = ("model", "layer_range", "parameters")
#: mergekit keys SimMerge refuses, with the nearest supported form (named in the one-line error).
REFUSED_KEYS = {
    "modules": "use 'slices' or 'models' (SimMerge merges single-module models)",
    "tokenizer": "use 'tokenizer_source: base | union | <model path>' (no per-token embedding settings)",
    "chat_template": "the tokenizer_source's chat template is copied; edit tokenizer_config.json after merging",
    "residual_weight": "remove it (mergekit reads it from no merge method either)",
}
#: mergekit methods SimMerge does not implement (named as such in the error).
MERGEKIT_ONLY_METHODS = ("multislerp", "karcher", "sce", "arcee_fusion", "nearswap", "ram", "ramplus_tl")

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
    """One input model of a recipe (or one source of a slice) and its own parameters; ``layer_range`` is the
    half-open range of its decoder layers it contributes (None: all of them)."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None


@dataclass
class SliceSpec:
    """One output slice: layers taken from each source's ``layer_range`` (all of equal length) and merged."""

    sources: list[ModelSpec]
    parameters: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None

    @property
    def length(self) -> int:
        lo, hi = self.sources[0].layer_range or (0, 0)
        return hi - lo


@dataclass
class SliceInputs:
    """A slice as the operator sees it: its inputs besides the base, the base (or None) and its parameters."""

    inputs: list[ModelSpec]
    base: ModelSpec | None
    parameters: dict[str, Any]
    length: int


@dataclass
class Recipe:
    """A parsed, validated merge recipe (see the module docstring for the schema)."""

    merge_method: str
    models: list[ModelSpec] = field(default_factory=list)
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    #: Folder that relative model paths are relative to (the recipe file's folder); None = current directory.
    root: Path | None = None
    source: str = "<recipe>"
    slices: list[SliceSpec] | None = None

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
        _check_keys(data, TOP_LEVEL_KEYS, source, "")
        if "merge_method" not in data:
            raise RecipeError(f"{source}: missing 'merge_method'")
        has_models, has_slices = data.get("models") is not None, data.get("slices") is not None
        if has_models and has_slices and data["slices"] == []:
            has_slices = False  # mergekit reads an empty list as absent
        if has_models == has_slices:
            raise RecipeError(f"{source}: give exactly one of 'models' and 'slices'")
        models, slices = [], None
        if has_models:
            raw = data["models"]
            if not isinstance(raw, list) or not raw:
                raise RecipeError(f"{source}: 'models' must be a non-empty list")
            models = [_model_spec(entry, f"{source}: models[{i}]", MODEL_KEYS) for i, entry in enumerate(raw)]
        else:
            raw = data["slices"]
            if not isinstance(raw, list) or not raw:
                raise RecipeError(f"{source}: 'slices' must be a non-empty list")
            slices = [_slice_spec(entry, f"{source}: slices[{i}]") for i, entry in enumerate(raw)]
        params = data.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise RecipeError(f"{source}: 'parameters' must be a mapping")
        tok = data.get("tokenizer_source")
        recipe = cls(merge_method=str(data["merge_method"]), models=models,
                     base_model=None if data.get("base_model") is None else str(data["base_model"]),
                     parameters=dict(params), dtype=data.get("dtype"), out_dtype=data.get("out_dtype"),
                     tokenizer_source=None if tok is None else str(tok),
                     root=Path(root) if root is not None else None, source=source, slices=slices)
        recipe.validate()
        return recipe

    # --- validation ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check method, parameter names, scopes and shapes, dtypes, slices and the number of models."""
        src = self.source
        op = self.operator()
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise RecipeError(f"{src}: {key} {value!r} not supported (one of {sorted(DTYPES)})")
        per_model = {p.name for p in op.params if p.per_model}
        everything = {p.name for p in op.params}
        _check_params(self.parameters, everything, op, f"{src}: parameters", "global")
        for i, spec in enumerate(self.models):
            _check_params(spec.parameters, per_model, op, f"{src}: models[{i}].parameters", "model")
        for i, sl in enumerate(self.slices or []):
            _check_params(sl.parameters, everything, op, f"{src}: slices[{i}].parameters", "global")
            for j, spec in enumerate(sl.sources):
                _check_params(spec.parameters, per_model, op, f"{src}: slices[{i}].sources[{j}].parameters",
                              "model")
        for p in op.params:
            if p.required and not p.per_model and p.name not in self.parameters:
                if self.slices is None or not all(p.name in sl.parameters for sl in self.slices):
                    raise RecipeError(f"{src}: {self.merge_method} needs the global parameter {p.name!r}")
        for where, inputs, base in self._groups():
            if op.needs_base and base is None:
                hint = (f"add base_model {self._base_of(where)!r} to its sources" if self.slices is not None
                        and self._base_of(where) else "set base_model")
                raise RecipeError(f"{src}: {self.merge_method} needs a base_model{where} ({hint})")
            if not op.count_ok(len(inputs)):
                raise RecipeError(f"{src}: {self.merge_method} needs {op.count_text()} model(s) besides the base"
                                  f"{where}, got {len(inputs)}")
        self._check_scalar_settings(op)

    def _groups(self) -> list[tuple[str, list[ModelSpec], ModelSpec | None]]:
        if self.slices is None:
            inputs, base = self.merge_inputs()
            return [("", inputs, base)]
        return [(f" (slices[{i}])", s.inputs, s.base) for i, s in enumerate(self._slice_inputs())]

    def _base_of(self, where: str) -> str | None:
        if not where or self.slices is None:
            return self.base_model
        i = int(where.split("[")[1].split("]")[0])
        return self.slices[i].base_model or self.base_model

    def _check_scalar_settings(self, op: Operator) -> None:
        """Operator-specific limits that scalar settings already break (DELLA's 0 < density +- epsilon < 1)."""
        if "epsilon" not in {p.name for p in op.params}:
            return
        glob = {k: v for k, v in self.parameters.items() if isinstance(v, (int, float))}
        specs = self.models + [s for sl in (self.slices or []) for s in sl.sources]
        for spec in specs:
            values = {**glob, **{k: v for k, v in spec.parameters.items() if isinstance(v, (int, float))}}
            d, e = float(values.get("density", 1.0)), float(values.get("epsilon", 0.15))
            if d < 1 and not (0 < d - e and d + e < 1):
                raise RecipeError(f"{self.source}: {spec.model}: {self.merge_method} needs 0 < density +- epsilon "
                                  f"< 1, got density {d} and epsilon {e}")

    def operator(self) -> Operator:
        """The recipe's operator (a one-line :class:`RecipeError` for an unknown method)."""
        try:
            return get_operator(self.merge_method)
        except ValueError as exc:
            note = " (a mergekit method SimMerge does not implement)" if self.merge_method in MERGEKIT_ONLY_METHODS \
                else ""
            raise RecipeError(f"{self.source}: {exc}{note}") from None

    # --- derived views ------------------------------------------------------------------------------------
    def resolve_path(self, model: str) -> Path:
        """A model path as a folder on disk (relative paths are relative to the recipe's folder)."""
        path = Path(model).expanduser()
        if not path.is_absolute() and self.root is not None:
            path = self.root / path
        return path

    def merge_states(self, state: Callable[[str], Mapping[str, torch.Tensor]], layer_count: int | None = None
                     ) -> dict[str, torch.Tensor]:
        """Merge a ``models`` recipe in memory: model names resolved by ``state(name) -> state dict``, inputs and
        base read as :meth:`merge_inputs` says (mergekit's reading), the engine's operator code, the recipe's
        compute and output dtypes. The one in-memory merge of the kit (labels, planner, search use it)."""
        specs, base_spec = self.merge_inputs()
        needs_base = base_spec is not None and get_operator(self.merge_method).needs_base
        base = state(base_spec.model) if needs_base else None
        return merge_state_dicts(self.merge_method, [dict(state(s.model)) for s in specs],
                                 dict(base) if base is not None else None, [dict(s.parameters) for s in specs],
                                 self.parameters, layer_count, out_dtype=self.output_dtype(),
                                 dtype=self.compute_dtype())

    def merge_inputs(self) -> tuple[list[ModelSpec], ModelSpec | None]:
        """(inputs besides the base, base) of a ``models`` recipe as the operators see them, following mergekit: a
        base listed among ``models`` is the base, not an input; a base_model that is not listed is added as a
        source (so for linear, which has no base, it joins the average with the global parameters)."""
        if self.slices is not None:
            raise RecipeError(f"{self.source}: the recipe uses slices; see Recipe.slice_inputs()")
        op = get_operator(self.merge_method)
        base_spec = None
        if self.base_model is not None:
            listed = [m for m in self.models if m.model == self.base_model]
            base_spec = listed[0] if listed else ModelSpec(self.base_model)
        if not op.accepts_base:
            inputs = list(self.models)
            if base_spec is not None and base_spec not in inputs:
                inputs.append(base_spec)
            return inputs, None
        return [m for m in self.models if m.model != self.base_model], base_spec

    def _slice_inputs(self) -> list[SliceInputs]:
        op = get_operator(self.merge_method)
        out = []
        for sl in self.slices or []:
            base_name = sl.base_model or self.base_model
            base = next((s for s in sl.sources if s.model == base_name), None) if op.accepts_base else None
            inputs = [s for s in sl.sources if s is not base]
            out.append(SliceInputs(inputs, base, dict(sl.parameters), sl.length))
        return out

    def slice_inputs(self, layer_count: Mapping[str, int] | None = None) -> list[SliceInputs]:
        """The recipe as output slices (a ``models`` recipe is one slice over all layers): each slice's inputs
        besides the base, its base and its parameters. ``layer_count`` maps a model (as written) to its number of
        decoder layers, needed for a ``models`` recipe (whose models must then all have the same count)."""
        if self.slices is not None:
            return self._slice_inputs()
        inputs, base = self.merge_inputs()
        models = inputs + ([base] if base is not None else [])
        counts = {m.model: (layer_count or {}).get(m.model, 0) for m in models}
        if len(set(counts.values())) > 1:
            raise RecipeError(f"{self.source}: the models have different numbers of layers {counts}; use slices "
                              f"with layer_range to choose which layers to merge")
        n = next(iter(counts.values()))
        ranged = {id(m): ModelSpec(m.model, dict(m.parameters), (0, n)) for m in models}
        return [SliceInputs([ranged[id(m)] for m in inputs], ranged[id(base)] if base is not None else None, {}, n)]

    def compute_dtype(self) -> torch.dtype | None:
        """The dtype the merge is computed in (``dtype``); None: each tensor's inputs' own (promoted) dtype."""
        return DTYPES[self.dtype] if self.dtype else None

    def output_dtype(self) -> torch.dtype | None:
        """The dtype written (``out_dtype``, else ``dtype``); None keeps each tensor's compute dtype."""
        name = self.out_dtype or self.dtype
        return DTYPES[name] if name else None

    def reference_model(self) -> str:
        """The model whose config (and, by default, tokenizer) the output takes: the base, else the first input."""
        if self.base_model is not None:
            return self.base_model
        return self.models[0].model if self.slices is None else self.slices[0].sources[0].model

    def tokenizer_folder(self) -> Path:
        """Where the tokenizer files are copied from (``tokenizer_source`` a model path, else the reference)."""
        src = self.tokenizer_source
        if src in (None, "base", "union"):
            return self.resolve_path(self.reference_model())
        return self.resolve_path(src)

    def model_names(self) -> list[str]:
        """Every model the recipe names (as written, first appearance first), the tokenizer source included."""
        names = [m.model for m in self.models]
        for sl in self.slices or []:
            names += [s.model for s in sl.sources] + ([sl.base_model] if sl.base_model else [])
        names += [self.base_model] if self.base_model else []
        if self.tokenizer_source not in (None, "base", "union"):
            names.append(self.tokenizer_source)
        return list(dict.fromkeys(names))

    def folders(self) -> list[Path]:
        """Every input folder the recipe reads."""
        return [self.resolve_path(n) for n in self.model_names()]

    # --- serialization ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The recipe as mergekit's schema (paths as written, defaults omitted)."""
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            out["base_model"] = self.base_model
        if self.slices is None:
            out["models"] = [_spec_dict(m) for m in self.models]
        else:
            out["slices"] = [{"sources": [_spec_dict(s) for s in sl.sources],
                              **({"parameters": sl.parameters} if sl.parameters else {}),
                              **({"base_model": sl.base_model} if sl.base_model else {})} for sl in self.slices]
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

        def fix_spec(m: ModelSpec) -> ModelSpec:
            return ModelSpec(fix(m.model), dict(m.parameters), m.layer_range)

        tok = self.tokenizer_source
        slices = None if self.slices is None else [
            SliceSpec([fix_spec(s) for s in sl.sources], dict(sl.parameters),
                      fix(sl.base_model) if sl.base_model else None) for sl in self.slices]
        return Recipe(merge_method=self.merge_method, models=[fix_spec(m) for m in self.models],
                      base_model=fix(self.base_model) if self.base_model else None,
                      parameters=dict(self.parameters), dtype=self.dtype, out_dtype=self.out_dtype,
                      tokenizer_source=tok if tok in (None, "base", "union") else fix(tok), root=None,
                      source=self.source, slices=slices)


# --- helpers ------------------------------------------------------------------------------------------------------
def _nearest(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], source: str, where: str) -> None:
    for key in data:
        if key in allowed:
            continue
        if key in REFUSED_KEYS:
            raise RecipeError(f"{source}: {where}{key!r} is not supported by simmerge: {REFUSED_KEYS[key]}")
        raise RecipeError(f"{source}: {where}unknown key {key!r} ({_nearest(key, allowed)})")


def _spec_dict(m: ModelSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"model": m.model}
    if m.layer_range is not None:
        out["layer_range"] = list(m.layer_range)
    if m.parameters:
        out["parameters"] = m.parameters
    return out


def _model_spec(entry: Any, where: str, keys: Sequence[str]) -> ModelSpec:
    if isinstance(entry, str) and "layer_range" not in keys:
        entry = {"model": entry}
    if not isinstance(entry, Mapping) or "model" not in entry:
        raise RecipeError(f"{where} must be a mapping with a 'model' key")
    source, _, label = where.rpartition(": ")
    _check_keys(entry, keys, source, f"{label}: ")
    params = entry.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise RecipeError(f"{where}.parameters must be a mapping")
    layer_range = None
    if "layer_range" in keys:
        raw = entry.get("layer_range")
        if (not isinstance(raw, (list, tuple)) or len(raw) != 2 or not all(isinstance(v, int) for v in raw)
                or not 0 <= raw[0] < raw[1]):
            raise RecipeError(f"{where}.layer_range must be [start, end) with 0 <= start < end, got {raw!r}")
        layer_range = (int(raw[0]), int(raw[1]))
    return ModelSpec(model=str(entry["model"]), parameters=dict(params), layer_range=layer_range)


def _slice_spec(entry: Any, where: str) -> SliceSpec:
    if not isinstance(entry, Mapping):
        raise RecipeError(f"{where} must be a mapping with 'sources'")
    source, _, label = where.rpartition(": ")
    _check_keys(entry, SLICE_KEYS, source, f"{label}: ")
    raw = entry.get("sources")
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"{where}.sources must be a non-empty list")
    sources = [_model_spec(s, f"{where}.sources[{j}]", SOURCE_KEYS) for j, s in enumerate(raw)]
    lengths = {s.layer_range[1] - s.layer_range[0] for s in sources if s.layer_range}
    if len(lengths) > 1:
        raise RecipeError(f"{where}: every source must span the same number of layers, got "
                          f"{[list(s.layer_range or ()) for s in sources]}")
    names = [s.model for s in sources]
    if len(set(names)) != len(names):
        raise RecipeError(f"{where}: a model is listed twice among the sources")
    params = entry.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise RecipeError(f"{where}.parameters must be a mapping")
    base = entry.get("base_model")
    return SliceSpec(sources, dict(params), None if base is None else str(base))


def _check_params(params: Mapping[str, Any], allowed: set[str], op: Operator, where: str, scope: str) -> None:
    everything = [p.name for p in op.params]
    for key, setting in params.items():
        if key not in allowed:
            if key in everything:  # a global parameter given per model
                raise RecipeError(f"{where}.{key}: a global parameter for {op.name} (set it under 'parameters'; "
                                  f"per-model parameters: {', '.join(sorted(allowed)) or 'none'})")
            hint = _nearest(key, everything) if everything else "it takes none"
            raise RecipeError(f"{where}: parameter {key!r} is not used by {op.name} ({hint}; it takes "
                              f"{', '.join(everything) or 'none'})")
        _check_setting(setting, f"{where}.{key}")


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
