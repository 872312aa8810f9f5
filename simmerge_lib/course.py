"""What every chapter of the course shares: its version line, its figure theme and its headline.

Kept free of the rest of the kit (and of heavy imports at load time), so a notebook's first cell can use it before
anything else is imported, and the runner can read a headline without importing torch.
"""

from __future__ import annotations

import importlib
import platform
from pathlib import Path
from typing import Any

from .paths import PROJECT_ROOT, build_dir

#: The MIME type of a chapter's headline in an executed notebook (a JSON object ``{"text": ...}``); the runner's
#: summary table reads it, JupyterLab shows the markdown or plain-text form beside it.
HEADLINE_MIME = "application/vnd.simmerge.headline+json"

#: How a module is named in the version line when its import name is not the distribution's name.
_DISPLAY_NAMES = {"sklearn": "scikit-learn", "yaml": "PyYAML", "simmerge_lib": "simmerge_lib"}


def versions(*modules: str) -> str:
    """One line ``python X · torch Y · … · simmerge_lib Z``: Python, then each named module (import names) in the order
    given, then the kit, separated by `` · `` — the same form in every chapter."""
    parts = [f"python {platform.python_version()}"]
    for name in [m for m in modules if m != "simmerge_lib"] + ["simmerge_lib"]:
        module = importlib.import_module(name)
        parts.append(f"{_DISPLAY_NAMES.get(name, name)} {getattr(module, '__version__', '?')}")
    return " · ".join(parts)


def short_path(path: str | Path) -> str:
    """``path`` as a learner should read it: ``build/...`` for outputs (wherever ``$SIMMERGE_BUILD`` puts them),
    relative to the project for its own files, unchanged elsewhere."""
    resolved = Path(path).resolve()
    for root, prefix in ((build_dir().resolve(), Path("build")), (PROJECT_ROOT.resolve(), Path())):
        if resolved.is_relative_to(root):
            return str(prefix / resolved.relative_to(root))
    return str(path)


def set_theme(**rc: Any) -> None:
    """The one figure theme of the course: seaborn's ``whitegrid`` at ``notebook`` scale, with legends and tick labels
    sized to stay legible when a figure is shown at the notebook's width (about 9 inches).

    ``rc`` overrides single matplotlib settings. Call it once, in a chapter's set-up cell.
    """
    import seaborn as sns  # heavy (matplotlib, pandas): only for the figures, not for the first cell or the runner

    sns.set_theme(style="whitegrid", context="notebook", rc={
        "figure.figsize": (8.0, 3.6),
        "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
        "legend.fontsize": 8.5, "legend.title_fontsize": 9, "legend.framealpha": 0.9,
        "figure.titlesize": 12, "savefig.bbox": "tight", **rc})


def headline(text: str) -> None:
    """Record the chapter's headline figure — one short phrase with its number(s), e.g. ``"best merge Q 0.87 vs
    0.76 for keeping a parent"`` — shown in the notebook and read by the runner's summary table (the last one recorded
    in a chapter counts). Outside a notebook it prints the line."""
    text = " ".join(str(text).split())  # one line, whatever the caller's formatting
    try:
        # IPython is imported when a headline is recorded, not with this module, which stays light (module doc)
        from IPython import get_ipython
        from IPython.display import display  # (the same reason)
    except ImportError:  # pragma: no cover - IPython ships with the kit's ipykernel
        get_ipython = None  # type: ignore[assignment]
    if get_ipython is None or get_ipython() is None:
        print(f"Headline: {text}")
        return
    display({"text/markdown": f"**Headline:** {text}", "text/plain": f"Headline: {text}",
             HEADLINE_MIME: {"text": text}}, raw=True)


def find_headline(nb: Any) -> str | None:
    """The last headline recorded in an executed notebook (an ``nbformat`` node or its dict), or None."""
    found = None
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            data = output.get("data", {})
            if HEADLINE_MIME in data:
                found = str(data[HEADLINE_MIME].get("text", "")) or found
    return found
