"""Every committed chapter follows the course conventions (DESIGN.md): checked statically, without running it."""

from __future__ import annotations

import ast

import nbformat
import pytest

from simmerge_lib.runner import course_notebooks

NOTEBOOKS = course_notebooks()


def test_chapters_exist_and_are_numbered():
    assert NOTEBOOKS, "no notebooks found"
    assert NOTEBOOKS[0].name.startswith("00_")
    numbers = [nb.name[:2] for nb in NOTEBOOKS]
    assert len(set(numbers)) == len(numbers)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_conventions(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "committed with outputs"
    assert nb.cells[0].cell_type == "markdown", "a chapter opens with what the reader will learn"
    assert code[0].source.startswith("# NBVAL_IGNORE_OUTPUT"), "first code cell prints versions, output ignored"
    params = code[1]
    assert "parameters" in params.metadata.get("tags", []), "second code cell must be tagged 'parameters'"
    tree = ast.parse(params.source)
    for node in tree.body:
        assert isinstance(node, ast.Assign), f"parameters cell holds assignments only: {ast.unparse(node)}"
        ast.literal_eval(node.value)  # literals only: derived values belong in the next cell
    assert "PROFILE" in {t.id for n in tree.body for t in n.targets}
    for line in params.source.splitlines():  # papermill cannot parse a parameter whose comment holds "="
        assert "=" not in line.partition("#")[2], f"'=' in a parameter comment: {line}"
    text = "\n".join(c.source for c in nb.cells)
    assert "sys.path" not in text, "notebooks import the installed library, no path tricks"
    assert "try it" in text.lower(), "a chapter closes with a 'try it' list"
