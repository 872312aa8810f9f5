"""Run the course headlessly: every notebook in order with papermill, reporting progress as it goes.

``python -m simmerge_lib.runner --profile default --out build/notebooks`` executes the chapters. While a chapter runs,
the terminal shows which chapter, which cell (k of n) and the progress bar of its long step, and is never silent for
more than ``HEARTBEAT_S`` seconds; the run ends with a summary table (chapter, seconds, headline figure). A chapter
records its headline with ``simmerge_lib.course.headline(...)``; a chapter without one shows "—".
A failing notebook stops the run and prints the failing cell. Executed copies go to ``--out``; the committed notebooks
are never written (except by ``--normalize-notebooks``, which only rewrites their metadata).

``--prepare-only`` only injects the parameters. ``--normalize-notebooks`` gives every committed notebook the kit's
kernelspec and the metadata JupyterLab writes, without outputs, so that opening one in the lab leaves git clean.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import nbformat
import papermill as pm
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine, papermill_engines
from papermill.log import logger as papermill_logger
from traitlets import CaselessStrEnum

from . import profiles
from .course import find_headline
from .paths import PROJECT_ROOT

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"

#: The kernel every chapter declares (``make setup`` installs it into the venv).
KERNEL_NAME = "simmerge"
KERNELSPEC = {"display_name": "SimMerge kit", "language": "python", "name": KERNEL_NAME}

#: Longest silence on the terminal while a notebook runs (seconds).
HEARTBEAT_S = 20.0
#: A cell announces itself once it has run this long (quicker cells pass silently).
ANNOUNCE_S = 5.0
#: A progress bar prints at most once per this many seconds (and once when it ends).
BAR_EVERY_S = 10.0
#: A progress bar that ends before this age is not printed at all.
BAR_MIN_AGE_S = 2.0


def course_notebooks(selection: Sequence[str] = ()) -> list[Path]:
    """The numbered chapters in order; ``selection`` keeps those whose file name starts with one of its items."""
    notebooks = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if selection:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(s) for s in selection)]
        if not notebooks:
            raise SystemExit(f"no notebook in {NOTEBOOK_DIR} matches {list(selection)}")
    return notebooks


# ---------------------------------------------------------------------------------------------------------------------
# Committed notebooks: the metadata JupyterLab writes, so a learner's first look changes nothing


def language_info() -> dict[str, Any]:
    """``language_info`` as the kit's kernel reports it (and JupyterLab saves it): ipykernel's own dict, whose
    ``version`` is the Python running this function — run the normaliser with the kit's venv."""
    # Imported here, not with the module: once ipykernel's shell is imported, tqdm.auto draws notebook widgets (as
    # text on stdout) in this process instead of terminal bars, in every library call that shows progress.
    from ipykernel.ipkernel import IPythonKernel

    return dict(IPythonKernel.language_info)


def normalized_text(path: Path) -> str:
    """The notebook at ``path`` as JupyterLab would save it on opening it with the kit's kernel: kernelspec
    ``simmerge`` ("SimMerge kit"), the kernel's ``language_info``, nbformat 4.5 with cell ids, and, by the course's
    convention, no outputs and no execution counts. Cell sources and tags are untouched."""
    nb = nbformat.read(path, as_version=4)
    nb.nbformat, nb.nbformat_minor = 4, 5
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = language_info()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # papermill/nbclient timing, never part of the course
        cell.metadata.pop("papermill", None)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.validator.normalize(nb)
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"  # what Jupyter's contents manager writes


def normalize_notebooks(paths: Sequence[Path] | None = None) -> list[Path]:
    """Rewrite each notebook (default: every chapter) to :func:`normalized_text`; returns those that changed."""
    changed = []
    for path in paths if paths is not None else course_notebooks():
        text = normalized_text(path)
        if path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed


# ---------------------------------------------------------------------------------------------------------------------
# Live progress


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks; a log file or CI page shows codes


def _plain(value: str) -> str:
    """Text of a tqdm widget label: HTML-unescaped, tqdm's figure spaces back to spaces, one line."""
    return " ".join(html.unescape(value).replace("\u2007", " ").split())


@dataclass
class _Bar:
    container: str
    first_seen: float
    last_printed: float | None = None
    last_text: str = ""
    done: bool = False


@dataclass
class Progress:
    """What the terminal shows while notebooks run: a line when a chapter starts, a line for a cell that runs longer
    than ``announce_s``, the text of tqdm widget bars (at most one line per ``bar_every_s`` per bar), a heartbeat
    after ``heartbeat_s`` of silence, and the chapter's result. :meth:`tick` drives the time-based lines; the runner
    calls it from a background thread, tests call it with a fake clock."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    clock: Callable[[], float] = time.monotonic
    heartbeat_s: float = HEARTBEAT_S
    announce_s: float = ANNOUNCE_S
    bar_every_s: float = BAR_EVERY_S
    width: int = 118

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._last_print = self.clock()
        self._cell: tuple[int, int, str, float] | None = None  # (k, n, first line, start)
        self._announced = False
        self._models: dict[str, dict[str, Any]] = {}
        self._bars: dict[str, _Bar] = {}
        self.stderr: list[tuple[int, str]] = []

    def _print(self, text: str, indent: str = "      ") -> None:
        line = indent + text
        if len(line) > self.width:
            line = line[: self.width - 1] + "…"
        print(line, file=self.out, flush=True)
        self._last_print = self.clock()

    # chapters and cells ---------------------------------------------------------------------------------------------
    def chapter(self, name: str, index: int, total: int, profile: str) -> None:
        with self._lock:
            self._cell, self._models, self._bars, self.stderr = None, {}, {}, []
            self._print(f"[{index}/{total}] {name} ({profile})", indent="")

    def cell(self, k: int, n: int, source: str) -> None:
        """Code cell ``k`` of ``n`` (1-based) starts."""
        lines = [ln.strip() for ln in source.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        with self._lock:
            self._cell, self._announced = (k, n, lines[0] if lines else "", self.clock()), False

    def cell_done(self) -> None:
        with self._lock:
            self._cell = None

    def finished(self, seconds: float, note: str = "ok") -> None:
        with self._lock:
            self._cell = None
            for k, text in self.stderr[:3]:
                self._print(f"stderr in cell {k}: {text}")
            self._print(f"{note} in {seconds:.1f} s")

    # kernel output --------------------------------------------------------------------------------------------------
    def stream(self, name: str, text: str) -> None:
        """A stream output of the running cell: stderr is remembered (first line per cell) and listed at the end."""
        if name != "stderr" or self._cell is None:
            return
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        with self._lock:
            if first and not any(k == self._cell[0] for k, _ in self.stderr):
                self.stderr.append((self._cell[0], first))

    def widget(self, comm_id: str, state: dict[str, Any]) -> None:
        """A widget's state changed (a ``comm_open`` or ``comm_msg`` update from the kernel)."""
        with self._lock:
            self._models.setdefault(comm_id, {}).update(state)
            container = self._container_of(comm_id)
            # tqdm sets the bar's value before its two labels: a line is drawn when the right-hand label (the
            # meter, "12/32 [00:45<01:15]") or the bar's style (its end) changes, so label and bar agree.
            if container is None or comm_id != self._models[container]["children"][2].removeprefix("IPY_MODEL_") \
                    and "bar_style" not in state:
                return
            now = self.clock()
            bar = self._bars.setdefault(container, _Bar(container, now))
            if bar.done:
                return
            bar.done = self._bar_done(container)
            age = now - bar.first_seen
            due = bar.last_printed is None or now - bar.last_printed >= self.bar_every_s
            if (bar.done and (bar.last_printed is not None or age >= BAR_MIN_AGE_S)) or \
                    (not bar.done and age >= BAR_MIN_AGE_S and due):
                self._print_bar(bar)

    def _container_of(self, comm_id: str) -> str | None:
        """The HBox holding a tqdm bar (label, progress, meter) that ``comm_id`` is, or belongs to."""
        ref = f"IPY_MODEL_{comm_id}"
        for cid, model in self._models.items():
            children = model.get("children") or []
            if model.get("_model_name") == "HBoxModel" and (cid == comm_id or ref in children) and len(children) == 3:
                return cid
        return None

    def _parts(self, container: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        ids = [c.removeprefix("IPY_MODEL_") for c in self._models[container]["children"]]
        left, bar, right = (self._models.get(i, {}) for i in ids)
        return left, bar, right

    def _bar_done(self, container: str) -> bool:
        _, bar, _ = self._parts(container)
        return bar.get("bar_style") in ("success", "danger")

    def bar_line(self, container: str) -> str:
        """A tqdm widget bar as one text line: ``desc:  38% [#####        ] 12/32 [00:45<01:15, 3.7s/model]``."""
        parts = self._parts(container)
        left, right = _plain(str(parts[0].get("value", ""))), _plain(str(parts[2].get("value", "")))
        percent = re.search(r"(\d+)%$", left)  # tqdm's own percentage: no meter when the total is unknown
        filled = round(int(percent.group(1)) / 5) if percent else 0
        meter = f" [{'#' * min(filled, 20)}{' ' * (20 - min(filled, 20))}] " if percent else " "
        return f"{left}{meter}{right}".strip()

    def _print_bar(self, bar: _Bar) -> None:
        text = self.bar_line(bar.container)
        if text != bar.last_text:  # a bar that ends right after a line was drawn does not repeat it
            self._announce()
            self._print(text)
            bar.last_text = text
        bar.last_printed = self.clock()

    def _announce(self) -> None:
        if self._cell is not None and not self._announced:
            self._announced = True
            k, n, first, _ = self._cell
            self._print(f"cell {k}/{n}: {first}")

    # time-driven lines ----------------------------------------------------------------------------------------------
    def tick(self) -> None:
        """Announce a long cell, and break any silence longer than ``heartbeat_s`` (with the live bar if one runs)."""
        with self._lock:
            if self._cell is None:
                return
            now = self.clock()
            k, n, first, start = self._cell
            if not self._announced and (now - start >= self.announce_s or now - self._last_print >= self.heartbeat_s):
                self._announce()
            elif now - self._last_print >= self.heartbeat_s:
                live = [b for b in self._bars.values() if not b.done]
                if live and self.bar_line(live[-1].container) != live[-1].last_text:
                    self._print_bar(live[-1])
                else:  # no bar, or one that stopped moving (a bar tqdm hides on close never reports its end)
                    minutes, seconds = divmod(int(now - start), 60)
                    last = f" — last bar: {live[-1].last_text}" if live and live[-1].last_text else ""
                    self._print(f"cell {k}/{n} still running ({minutes}:{seconds:02d}){last}")


class _Ticker:
    """Calls ``progress.tick()`` twice a second from a daemon thread while the block runs."""

    def __init__(self, progress: Progress, period: float = 0.5):
        self.progress, self.period, self._stop = progress, period, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.progress.tick()
            except Exception as exc:  # a display problem must never stop the course; say so once and go quiet
                print(f"(progress display stopped: {exc!r})", file=sys.stderr)
                return

    def __enter__(self) -> _Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------------------------------
# Executing with papermill


class IPCKernelManager(AsyncKernelManager):
    # A local kernel talks over Unix sockets: no TCP port, and no "running over TCP without encryption" warning.
    transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)


def _engine(progress: Progress | None) -> str:
    """Register (once) a papermill engine whose notebook client reports to ``progress``; returns its name."""
    class Client(PapermillNotebookClient):
        def handle_comm_msg(self, outs: Any, msg: dict[str, Any], cell_index: int) -> None:
            data = msg["content"].get("data") or {}
            if progress is not None and isinstance(data.get("state"), dict):
                progress.widget(msg["content"]["comm_id"], data["state"])
            super().handle_comm_msg(outs, msg, cell_index)

        def output(self, outs: Any, msg: dict[str, Any], display_id: Any, cell_index: int) -> Any:
            if progress is not None and msg["msg_type"] == "stream":
                progress.stream(msg["content"].get("name", ""), msg["content"].get("text", ""))
            return super().output(outs, msg, display_id, cell_index)

    class Engine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man: Any, kernel_name: str, **kwargs: Any) -> Any:
            code = [i for i, c in enumerate(nb_man.nb.cells) if c.cell_type == "code"]

            def on_cell_start(cell: Any, cell_index: int) -> None:
                if progress is not None and cell.cell_type == "code":
                    progress.cell(code.index(cell_index) + 1, len(code), cell.source)

            def on_cell_executed(cell: Any, cell_index: int, execute_reply: Any = None) -> None:
                if progress is not None:
                    progress.cell_done()

            kernel_log = kwargs.pop("kernel_log", None)
            client = Client(nb_man, kernel_name=kernel_name, log=kwargs.pop("log", None) or papermill_logger,
                            log_output=False, startup_timeout=kwargs.pop("start_timeout", 60),
                            timeout=kwargs.pop("execution_timeout", None), kernel_manager_class=IPCKernelManager,
                            on_cell_start=on_cell_start, on_cell_executed=on_cell_executed,
                            **{k: v for k, v in kwargs.items() if k in ("cwd", "resources") and v is not None})
            if kernel_log is None:
                return client.execute()
            # The kernel process's own stderr (start-up logging, a crash's last words) goes to a log file, not
            # between the progress lines; cell outputs reach the notebook through the kernel protocol regardless.
            with open(kernel_log, "w") as log:
                return client.execute(stderr=log)

    name = f"simmerge-{id(progress)}"
    papermill_engines.register(name, Engine)
    return name


def kernel_for_run(requested: str | None = None) -> str:
    """The kernel to execute with: ``requested`` if given, else the kit's ``simmerge`` kernel when it is installed,
    else ``python3`` (the kernel of the Python running the runner)."""
    if requested:
        return requested
    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"


@dataclass
class ChapterResult:
    name: str
    seconds: float
    headline: str | None = None
    stderr: list[tuple[int, str]] = field(default_factory=list)


def run_notebooks(profile: str, out: Path, selection: Sequence[str] = (), prepare_only: bool = False,
                  kernel: str | None = None, notebooks: Sequence[Path] | None = None,
                  progress: Progress | None = None) -> list[ChapterResult]:
    """Execute (or, with ``prepare_only``, only parameterize) the chapters into ``out``, reporting to ``progress``
    (a default :class:`Progress` on stdout). ``notebooks`` overrides the chapter list (tests). Exits with status 1
    after printing the failing cell when a notebook raises."""
    out.mkdir(parents=True, exist_ok=True)
    chosen = list(notebooks) if notebooks is not None else course_notebooks(selection)
    progress = progress or Progress()
    kernel_name = kernel_for_run(kernel)
    engine = _engine(None if prepare_only else progress)
    logs = out / ".logs"
    results = []
    for i, notebook in enumerate(chosen, 1):
        target = out / notebook.name
        if not prepare_only:
            progress.chapter(notebook.stem, i, len(chosen), profile)
            logs.mkdir(exist_ok=True)
        start = time.perf_counter()
        try:
            with _Ticker(progress):
                nb = pm.execute_notebook(str(notebook), str(target), parameters={"PROFILE": profile},
                                         prepare_only=prepare_only, kernel_name=kernel_name, progress_bar=False,
                                         cwd=str(notebook.parent), log_output=False, engine_name=engine,
                                         kernel_log=None if prepare_only else str(logs / f"{notebook.stem}.log"))
        except pm.PapermillExecutionError as exc:
            seconds = time.perf_counter() - start
            progress.finished(seconds, note="FAILED")
            print(f"{notebook.name}: FAILED after {seconds:.1f} s (cell {exc.exec_count}; full copy: {target})")
            print("---- failing cell " + "-" * 60)
            print(exc.source)
            print("---- error " + "-" * 67)
            print(f"{exc.ename}: {exc.evalue}")
            print(_ANSI.sub("", "".join(exc.traceback[-3:])) if exc.traceback else "")
            raise SystemExit(1) from None
        seconds = time.perf_counter() - start
        if prepare_only:
            print(f"{notebook.name:<40} prepared {seconds:7.1f} s", flush=True)
        else:
            progress.finished(seconds)
        results.append(ChapterResult(notebook.stem, seconds, None if prepare_only else find_headline(nb),
                                     list(progress.stderr)))
        if not prepare_only:  # after every chapter, so an interrupted run still says what it did
            write_manifest(out, profile, results)
    return results


def manifest_path(out: Path) -> Path:
    """Where a run into ``out`` lists what it executed (``tests/test_executed_notebooks.py`` reads it)."""
    return out / ".logs" / "run.json"


def write_manifest(out: Path, profile: str, results: Sequence[ChapterResult]) -> Path:
    """Record the run: profile and, per executed chapter, its notebook, seconds, headline and stderr notes."""
    path = manifest_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"profile": profile, "chapters": [
        {"notebook": f"{r.name}.ipynb", "seconds": round(r.seconds, 1), "headline": r.headline,
         "stderr": [list(s) for s in r.stderr]} for r in results]}, indent=1) + "\n")
    return path


def summary_table(results: Sequence[ChapterResult], width: int = 118) -> str:
    """The run's closing table: one row per chapter (name, seconds, headline or "—"), then the total."""
    name_w = max([len("chapter"), *(len(r.name) for r in results)])
    rows = [f"{'chapter':<{name_w}}  {'seconds':>7}  headline", f"{'-' * name_w}  {'-' * 7}  {'-' * 8}"]
    for r in results:
        row = f"{r.name:<{name_w}}  {r.seconds:7.1f}  {r.headline or '—'}"
        rows.append(row if len(row) <= width else row[: width - 1] + "…")
    rows.append(f"{'total':<{name_w}}  {sum(r.seconds for r in results):7.1f}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", choices=list(profiles.PROFILES))
    parser.add_argument("--out", type=Path, default=Path("build/notebooks"))
    parser.add_argument("--prepare-only", action="store_true", help="inject parameters without executing")
    parser.add_argument("--kernel", default=None, help=f"kernel name (default: {KERNEL_NAME} if installed)")
    parser.add_argument("--normalize-notebooks", action="store_true",
                        help="rewrite the committed notebooks' metadata as JupyterLab saves it, without outputs")
    parser.add_argument("notebooks", nargs="*", help="prefixes to select (e.g. 00 02); default all")
    args = parser.parse_args(argv)
    if args.normalize_notebooks:
        changed = normalize_notebooks(course_notebooks(args.notebooks))
        print("\n".join(f"normalized {p.relative_to(PROJECT_ROOT)}" for p in changed) or "all notebooks normalized")
        return 0
    results = run_notebooks(args.profile, args.out.resolve(), args.notebooks, args.prepare_only, args.kernel)
    if not args.prepare_only:
        print()
        print(summary_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
