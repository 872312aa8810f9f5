"""Imports point down the layers of DESIGN.md (io -> catalogue -> merging -> signals -> selection -> search/scale
-> cli), at module level: a module never imports one of a higher layer when it is loaded."""

from __future__ import annotations

import ast

from simmerge_lib.paths import PROJECT_ROOT

LAYERS = {
    "io": ["paths", "checkpoint", "course"],
    "catalogue": ["tasks", "tokenizer", "catalogue", "probes", "evaluate", "zoo"],
    "merging": ["kernels", "operators", "vocab", "recipe", "engine"],
    "signals": ["features", "labels"],
    "selection": ["predictor", "planner", "bandit"],
    "search_scale": ["search", "scale"],
    "cli": ["cli", "runner"],
}
RANK = {module: i for i, modules in enumerate(LAYERS.values()) for module in modules}


def _module_level_imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:  # module level only: in-function imports are loaded on demand
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found |= {alias.name for alias in node.names}
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in (PROJECT_ROOT / "simmerge_lib").glob("*.py") if p.stem != "__init__"}
    assert modules <= set(RANK), modules - set(RANK)


def test_imports_point_down():
    for path in (PROJECT_ROOT / "simmerge_lib").glob("*.py"):
        if path.stem == "__init__":
            continue
        for target in _module_level_imports(path):
            if target in RANK:
                assert RANK[target] <= RANK[path.stem], f"{path.stem} imports {target} (a higher layer)"
