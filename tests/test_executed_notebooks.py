"""What a learner reads in an executed run: no cell writes a warning or a stray progress bar to stderr.

Runs over the notebooks the last ``python -m simmerge_lib.runner --out DIR`` executed (its ``DIR/.logs/run.json``),
with ``SIMMERGE_EXECUTED=DIR``; ``make test-notebooks`` sets it after executing every chapter on the smoke profile.
Without the variable there is nothing executed to check, and the tests skip.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pytest

from simmerge_lib.runner import manifest_path

#: A warning as Python, a library logger or tqdm writes it.
WARNING = re.compile(r"\b\w*Warning\b|\bWARNING\b")
#: A text progress bar: tqdm's "42%|###", "3/8 [00:01<00:02", or a carriage-return redraw.
BAR = re.compile(r"\d+%\|.*\||\d+/\d+ \[\d\d:\d\d|\r(?!\n)")


def problems(nb) -> list[str]:
    """Each stderr output of an executed notebook that is a warning or a stray progress bar, as 'cell k: text'."""
    found = []
    code = [c for c in nb.cells if c.cell_type == "code"]
    for k, cell in enumerate(code, 1):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                text = out.get("text", "")
                kind = "warning" if WARNING.search(text) else "progress bar" if BAR.search(text) else None
                if kind:
                    first = next((ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()), "")
                    found.append(f"cell {k}: {kind}: {first.strip()[:160]}")
    return found


def test_problems_finds_warnings_and_bars_but_not_plain_notes():
    def nb(text):
        return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[
            nbformat.v4.new_output("stream", name="stderr", text=text)])])

    assert problems(nb("/x/tqdm/auto.py:21: TqdmWarning: IProgress not found. Please update jupyter"))
    assert problems(nb("[IPKernelApp] WARNING | Kernel is running over TCP without encryption."))
    assert problems(nb("Loading weights: 100%|##########| 24/24 [00:00<00:00, 1200.11it/s]"))
    assert problems(nb("zoo[smoke]:  12%|#2        | 2/18 [00:05<00:40"))
    assert not problems(nb("building the catalogue from scratch (about a minute)\n"))


def _executed() -> tuple[Path, list[str]]:
    root = os.environ.get("SIMMERGE_EXECUTED")
    if not root:
        pytest.skip("set SIMMERGE_EXECUTED to a runner output folder (make test-notebooks does)")
    manifest = manifest_path(Path(root))
    assert manifest.exists(), f"{manifest}: no run recorded there"
    return Path(root), [c["notebook"] for c in json.loads(manifest.read_text())["chapters"]]


def test_executed_notebooks_have_no_warning_or_stray_bar_on_stderr():
    root, notebooks = _executed()
    assert notebooks, "the run executed nothing"
    report = {name: problems(nbformat.read(root / name, as_version=4)) for name in notebooks}
    report = {name: found for name, found in report.items() if found}
    assert not report, "stderr outputs a learner would wonder about:\n" + "\n".join(
        f"{name} {line}" for name, found in report.items() for line in found)


def test_executed_notebooks_raised_nothing():
    root, notebooks = _executed()
    errors = [f"{name} cell {c.execution_count}: {o.ename}" for name in notebooks
              for c in nbformat.read(root / name, as_version=4).cells if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
