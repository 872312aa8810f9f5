"""The library's layer order, checked on its source: every import of ``simmerge_lib`` (at module level and inside
functions) points down the layers or stays inside its layer without a cycle, and imports inside functions are kept
for optional or heavy third-party packages, each with a comment saying why.

Layers, bottom to top (DESIGN.md and the README's layout): io → catalogue → merging → signals → selection → search
and scale → runner and CLI. A module's layer is that of its top-level name (``simmerge_lib.labels.jobs`` is in
``labels``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import simmerge_lib

PACKAGE = Path(simmerge_lib.__file__).parent
LAYERS: list[tuple[str, set[str]]] = [
    ("io", {"paths", "checkpoint", "course"}),
    ("catalogue", {"profiles", "tasks", "tokenizer", "catalogue", "probes", "evaluate", "zoo"}),
    ("merging", {"kernels", "vocab", "operators", "recipe", "documents", "engine"}),
    ("signals", {"features", "labels"}),
    ("selection", {"predictor", "planner", "bandit"}),
    ("search and scale", {"search", "scale"}),
    ("runner and CLI", {"runner", "cli"}),
]
LAYER_OF = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}
#: Third-party packages that may be imported inside a function: optional extras (ray, mergekit), heavy ones kept
#: off the start of ``simmerge merge`` (transformers) and of the course's first cell (IPython; seaborn, which pulls
#: in matplotlib and pandas, is imported by ``course.set_theme`` only, so the first cell and the runner stay light),
#: optuna (only the search needs it), and ipykernel, whose import makes tqdm.auto draw notebook widgets instead of
#: terminal bars in the importing process.
LAZY_ALLOWED = {"ray", "optuna", "mergekit", "transformers", "IPython", "seaborn", "ipykernel"}


def _modules() -> dict[str, Path]:
    out = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = file.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(("simmerge_lib",) + parts)] = file
    return out


def _imports(module: str, file: Path) -> list[tuple[str, int, bool]]:
    """(absolute imported module, line, inside a function) for every import statement of the file."""
    tree = ast.parse(file.read_text(), str(file))
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in inside) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # from . import x, y: each name is a module or a package attribute
                    found += [(f"{target}.{a.name}", node.lineno, id(node) in inside) for a in node.names]
                    continue
            else:
                target = node.module or ""
            found.append((target, node.lineno, id(node) in inside))
    return found


def _component(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "simmerge_lib" and len(parts) > 1 else None


def _edges() -> list[tuple[str, str, str, int, bool]]:
    out = []
    for module, file in _modules().items():
        for target, line, lazy in _imports(module, file):
            out.append((module, target, str(file.relative_to(PACKAGE.parent)), line, lazy))
    return out


def test_every_module_has_a_layer():
    unplaced = sorted({c for m in _modules() if (c := _component(m)) and c not in LAYER_OF and c != "__main__"})
    assert not unplaced, f"modules with no layer (add them to LAYERS and the README's layout): {unplaced}"


def test_imports_point_down_the_layers():
    upward = [f"{where}:{line} {source} imports {target}" for source, target, where, line, _ in _edges()
              if (a := _component(source)) in LAYER_OF and (b := _component(target)) in LAYER_OF
              and LAYER_OF[b] > LAYER_OF[a]]
    assert not upward, "imports pointing up the layer order:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for source, target, *_ in _edges():
        a, b = _component(source), _component(target)
        if a and b and a != b:
            graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else nxt)
            if not state.get(nxt):
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [node])


def test_imports_inside_functions_are_optional_or_heavy_third_party_with_a_reason():
    bad = []
    for source, target, where, line, lazy in _edges():
        if not lazy:
            continue
        root = target.split(".")[0]
        text = (PACKAGE.parent / where).read_text().splitlines()
        commented = "#" in text[line - 1] or text[line - 2].strip().startswith("#")
        if root == "simmerge_lib" or root not in LAZY_ALLOWED or not commented:
            bad.append(f"{where}:{line} imports {target} inside a function")
    assert not bad, ("imports inside functions (allowed: " + ", ".join(sorted(LAZY_ALLOWED))
                     + ", each with a comment saying why):\n" + "\n".join(bad))


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The walk above must see a lazy relative import (else the layer test would pass vacuously)."""
    lazy = [(t, lazy) for t, _, lazy in _imports("simmerge_lib.x", _write(tmp_path))]
    assert ("simmerge_lib.engine", True) in lazy and ("simmerge_lib.paths", False) in lazy


def _write(tmp_path: Path) -> Path:
    file = tmp_path / "x.py"
    file.write_text("from .paths import build_path\n\ndef f():\n    from .engine import merge\n")
    return file
