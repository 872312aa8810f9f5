"""The course runner: live progress (cells, tqdm widget bars, heartbeats), the summary table with each chapter's
headline, and the committed notebooks' metadata as JupyterLab saves it."""

from __future__ import annotations

import io
import json
import re

import nbformat
import pytest

from simmerge_lib import runner
from simmerge_lib.course import HEADLINE_MIME, find_headline, versions


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make_progress(**kw):
    out, clock = io.StringIO(), Clock()
    return runner.Progress(out=out, clock=clock, **kw), out, clock


def tqdm_widgets(progress, total=12, container="box"):
    """Open the widgets tqdm.notebook creates (label, bar, meter in an HBox), as the kernel announces them."""
    progress.widget("left", {"_model_name": "HTMLModel", "value": ""})
    progress.widget("bar", {"_model_name": "FloatProgressModel", "value": 0.0, "max": float(total), "bar_style": ""})
    progress.widget("right", {"_model_name": "HTMLModel", "value": ""})
    progress.widget(container, {"_model_name": "HBoxModel",
                                "children": ["IPY_MODEL_left", "IPY_MODEL_bar", "IPY_MODEL_right"]})
    tqdm_step(progress, 0, total)  # tqdm draws 0/total when the bar opens


def tqdm_step(progress, n, total=12, desc="step"):
    # the order tqdm.notebook uses: bar value first, then the two labels (HTML-escaped, figure spaces)
    pct = f"{100 * n // total}%"
    progress.widget("bar", {"value": float(n)})
    progress.widget("left", {"value": f"{desc}:\u2007{pct}"})
    progress.widget("right", {"value": f"\u2007{n}/{total}\u2007[00:0{n // 2}&lt;00:04,\u20071.99it/s]"})


def test_long_cell_is_announced_and_silence_never_exceeds_the_heartbeat():
    progress, out, clock = make_progress(heartbeat_s=20, announce_s=5)
    progress.chapter("00_model_zoo", 1, 9, "default")
    progress.cell(3, 10, "# a comment\ncatalogue = build_catalogue(PROFILE)\n")
    printed_at = [0.0]
    seen = out.getvalue()
    while clock.now < 120:
        clock.now += 0.5
        progress.tick()
        if out.getvalue() != seen:
            printed_at.append(clock.now)
            seen = out.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/9] 00_model_zoo (default)"
    assert lines[1].strip() == "cell 3/10: catalogue = build_catalogue(PROFILE)"  # comments skipped
    assert printed_at[1] == 5.0  # announced once it ran announce_s
    assert any("cell 3/10 still running (0:25)" in line for line in lines)
    gaps = [b - a for a, b in zip(printed_at, printed_at[1:])]
    assert max(gaps) <= 20.0


def test_quick_cells_pass_silently():
    progress, out, clock = make_progress()
    progress.chapter("01_probe_features", 2, 9, "smoke")
    for k in range(1, 6):
        progress.cell(k, 5, "x = 1")
        clock.now += 1.0
        progress.tick()
        progress.cell_done()
    progress.finished(5.0)
    assert out.getvalue().splitlines()[1:] == ["      ok in 5.0 s"]


def test_tqdm_widget_bar_is_printed_as_text_throttled_and_once_at_its_end():
    progress, out, clock = make_progress(bar_every_s=2)
    progress.chapter("00_model_zoo", 1, 1, "smoke")
    progress.cell(4, 9, "build()")
    tqdm_widgets(progress)
    for n in range(1, 13):
        clock.now += 0.5
        tqdm_step(progress, n)
    progress.widget("bar", {"bar_style": "success"})
    lines = [line.strip() for line in out.getvalue().splitlines()[1:]]
    assert lines[0] == "cell 4/9: build()"  # a bar says which cell it belongs to
    assert lines[1] == "step: 33% [#######             ] 4/12 [00:02<00:04, 1.99it/s]"  # label and bar agree
    assert lines[-1] == "step: 100% [####################] 12/12 [00:06<00:04, 1.99it/s]"
    assert len(lines) == 4  # 2 s throttle over a 6 s bar: at 2 s, 4 s and 6 s, the end not repeated


def test_a_bar_that_ends_quickly_is_not_printed():
    progress, out, clock = make_progress()
    progress.chapter("02_merge_operators", 1, 1, "smoke")
    progress.cell(1, 1, "merge()")
    tqdm_widgets(progress, total=3)
    for n in range(1, 4):
        clock.now += 0.1
        tqdm_step(progress, n, total=3)
    progress.widget("bar", {"bar_style": "success"})
    assert out.getvalue().splitlines()[1:] == []


def test_heartbeat_shows_the_live_bar():
    progress, out, clock = make_progress(heartbeat_s=20, bar_every_s=10)
    progress.chapter("03_label_collection", 1, 1, "default")
    progress.cell(2, 5, "labels.collect_labels()")
    tqdm_widgets(progress, total=100)
    clock.now = 3.0
    tqdm_step(progress, 1, total=100, desc="labels")
    clock.now = 12.0
    tqdm_step(progress, 2, total=100, desc="labels")  # moved, but within bar_every_s of the last line: not drawn
    clock.now = 40.0
    progress.tick()
    assert out.getvalue().splitlines()[-1].strip().startswith("labels: 2% [")
    clock.now = 70.0  # the bar has not moved since: the heartbeat says the cell still runs, with the bar's state
    progress.tick()
    last = out.getvalue().splitlines()[-1].strip()
    assert last.startswith("cell 2/5 still running (1:10)") and "labels: 2% [" in last


def test_stderr_is_noted_once_per_cell_and_listed_at_the_end():
    progress, out, _ = make_progress()
    progress.chapter("00_model_zoo", 1, 1, "smoke")
    progress.cell(2, 3, "warn()")
    progress.stream("stderr", "\n/x/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found\n")
    progress.stream("stderr", "more\n")
    progress.stream("stdout", "fine\n")
    progress.finished(1.0)
    assert progress.stderr == [(2, "/x/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found")]
    assert "stderr in cell 2: /x/site-packages" in out.getvalue()


def test_summary_table_shows_a_dash_where_a_chapter_has_no_headline():
    table = runner.summary_table([runner.ChapterResult("00_model_zoo", 12.34, "32 experts, own task 0.98"),
                                  runner.ChapterResult("04_predictor_training", 100.0, None)])
    lines = table.splitlines()
    assert lines[2].split() == ["00_model_zoo", "12.3", "32", "experts,", "own", "task", "0.98"]
    assert lines[3].split() == ["04_predictor_training", "100.0", "—"]
    assert lines[4].split() == ["total", "112.3"]


def test_find_headline_takes_the_last_one():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(outputs=[nbformat.v4.new_output("display_data", {HEADLINE_MIME: {"text": "a"}})]),
        nbformat.v4.new_markdown_cell("x"),
        nbformat.v4.new_code_cell(outputs=[nbformat.v4.new_output("display_data", {HEADLINE_MIME: {"text": "b"}})]),
    ])
    assert find_headline(nb) == "b"
    assert find_headline(nbformat.v4.new_notebook()) is None


def test_version_line_has_one_form():
    line = versions("pandas", "sklearn", "simmerge_lib")
    parts = line.split(" · ")
    assert parts[0].startswith("python 3.")
    assert [p.split()[0] for p in parts] == ["python", "pandas", "scikit-learn", "simmerge_lib"]


@pytest.mark.parametrize("path", runner.course_notebooks(), ids=lambda p: p.name)
def test_committed_notebook_is_saved_as_jupyterlab_saves_it(path, monkeypatch):
    """Opening a chapter in the lab with the kit's kernel must not change the file: the kit's kernelspec, the kernel's
    language_info, nbformat 4.5, no outputs. (Fix with ``python -m simmerge_lib.runner --normalize-notebooks``.)"""
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"] == {"display_name": "SimMerge kit", "language": "python", "name": "simmerge"}
    info = nb["metadata"]["language_info"]
    assert re.fullmatch(r"3\.\d+\.\d+", info["version"]), "language_info.version as the kernel reports it"
    expected = runner.language_info()
    assert {k: v for k, v in info.items() if k != "version"} == {k: v for k, v in expected.items() if k != "version"}
    # the whole file, byte for byte, is what the normaliser writes (with the Python version the file records)
    monkeypatch.setattr(runner, "language_info", lambda: {**expected, "version": info["version"]})
    assert path.read_text() == runner.normalized_text(path)


def test_normalizer_strips_outputs_and_sets_the_kernel(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1", execution_count=3, outputs=[
        nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=3)])])
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    assert runner.normalize_notebooks([path]) == [path]
    again = nbformat.read(path, as_version=4)
    assert again.metadata.kernelspec.name == "simmerge"
    assert again.metadata.language_info.name == "python"
    assert again.cells[0].outputs == [] and again.cells[0].execution_count is None
    assert runner.normalize_notebooks([path]) == []  # idempotent


def test_run_streams_progress_and_ends_with_the_headline(tmp_path, capfd):
    """One real kernel: a tqdm loop of ~3 s, a stderr line and a headline, through the papermill engine."""
    cells = [nbformat.v4.new_markdown_cell("# t"),
             nbformat.v4.new_code_cell('PROFILE = "default"', metadata={"tags": ["parameters"]}),
             nbformat.v4.new_code_cell("import sys, time\nfrom tqdm.auto import tqdm\n"
                                       "for _ in tqdm(range(6), desc='step'):\n    time.sleep(0.5)"),
             nbformat.v4.new_code_cell("print('careful', file=sys.stderr)"),
             nbformat.v4.new_code_cell("from simmerge_lib.course import headline\nheadline(f'{PROFILE}: 42')")]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = dict(runner.KERNELSPEC)
    source = tmp_path / "99_test.ipynb"
    nbformat.write(nb, source)
    out = tmp_path / "out"
    results = runner.run_notebooks("smoke", out, notebooks=[source], kernel=runner.kernel_for_run())
    captured = capfd.readouterr()
    assert "[1/1] 99_test (smoke)" in captured.out
    assert re.search(r"step: 100% \[#{20}\] 6/6", captured.out)
    assert "stderr in cell 4: careful" in captured.out  # papermill injected a parameters cell
    assert "without encryption" not in captured.err + captured.out  # IPC transport, not TCP
    assert results[0].headline == "smoke: 42"
    assert results[0].stderr == [(4, "careful")]
    manifest = json.loads(runner.manifest_path(out).read_text())
    assert manifest["chapters"][0]["notebook"] == "99_test.ipynb"
    assert manifest["chapters"][0]["headline"] == "smoke: 42"
    executed = nbformat.read(out / "99_test.ipynb", as_version=4)
    assert any(HEADLINE_MIME in o.get("data", {}) for c in executed.cells if c.cell_type == "code" for o in c.outputs)
