"""Run the course headlessly: every notebook in order with papermill, one line per notebook with its wall time.

``python -m simmerge_lib.runner --profile default --out build/notebooks`` executes; ``--prepare-only`` only injects the
parameters (nbval then executes the prepared copies). A failing notebook stops the run and prints the failing cell.
Executed copies go to ``--out``; the committed notebooks are never written.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .paths import PROJECT_ROOT

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"


def course_notebooks(selection: Sequence[str] = ()) -> list[Path]:
    """The numbered chapters in order; ``selection`` keeps those whose file name starts with one of its items."""
    notebooks = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if selection:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(s) for s in selection)]
        if not notebooks:
            raise SystemExit(f"no notebook in {NOTEBOOK_DIR} matches {list(selection)}")
    return notebooks


def run_notebooks(profile: str, out: Path, selection: Sequence[str] = (), prepare_only: bool = False,
                  kernel: str = "python3") -> list[tuple[str, float]]:
    import papermill as pm

    out.mkdir(parents=True, exist_ok=True)
    timings = []
    for notebook in course_notebooks(selection):
        target = out / notebook.name
        start = time.perf_counter()
        try:
            pm.execute_notebook(str(notebook), str(target), parameters={"PROFILE": profile},
                                prepare_only=prepare_only, kernel_name=kernel, progress_bar=False,
                                cwd=str(NOTEBOOK_DIR), log_output=False)
        except pm.PapermillExecutionError as exc:
            seconds = time.perf_counter() - start
            print(f"{notebook.name:<40} FAILED after {seconds:7.1f} s  (cell {exc.exec_count}; full copy: {target})")
            print("---- failing cell " + "-" * 60)
            print(exc.source)
            print("---- error " + "-" * 67)
            print(f"{exc.ename}: {exc.evalue}")
            print("".join(exc.traceback[-3:]) if exc.traceback else "")
            raise SystemExit(1) from None
        seconds = time.perf_counter() - start
        timings.append((notebook.name, seconds))
        verb = "prepared" if prepare_only else "ok"
        print(f"{notebook.name:<40} {verb:>8} {seconds:7.1f} s", flush=True)
    return timings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", choices=["smoke", "default", "full"])
    parser.add_argument("--out", type=Path, default=Path("build/notebooks"))
    parser.add_argument("--prepare-only", action="store_true", help="inject parameters without executing")
    parser.add_argument("--kernel", default="python3")
    parser.add_argument("notebooks", nargs="*", help="prefixes to select (e.g. 00 02); default all")
    args = parser.parse_args(argv)
    timings = run_notebooks(args.profile, args.out.resolve(), args.notebooks, args.prepare_only, args.kernel)
    if not args.prepare_only:
        print(f"{'total':<40} {'':>8} {sum(s for _, s in timings):7.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
