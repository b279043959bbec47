"""The paper's figure types, one convention for all of them.

Every plot function builds a :class:`matplotlib.figure.Figure` without pyplot (no global figure list,
nothing left open in scripts), passes it to :func:`finish`, and returns it.  :func:`finish` writes it
(PNG + PDF, :func:`save_figure`) when the function was given a name, and, inside a Jupyter kernel,
shows it inline right away as a PNG at :data:`INLINE_DPI` — so a cell that draws several figures shows
each of them, not only its last expression.  End such a cell with ``;`` or a table, not with the
figure (a figure as the last expression would be shown a second time once pyplot is imported).

Attribution / localisation figures live in ``plotting/attribution.py``, causal-trace and editing
figures in ``plotting/tracing.py``; both are re-exported here.
"""
from __future__ import annotations

import io
from pathlib import Path

FIGURES_DIR = Path(__file__).resolve().parents[2] / "figures"
SAVE_DPI = 150    # PNG files in figures/
INLINE_DPI = 90   # images embedded in notebooks: keeps an executed notebook at a few MB


def save_figure(fig, name: str, folder=None) -> list[Path]:
    """Write ``fig`` as ``<folder>/<name>.png`` and ``.pdf`` (folder default: the repo's figures/)."""
    folder = Path(folder) if folder else FIGURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, bbox_inches="tight", dpi=SAVE_DPI if path.suffix == ".png" else None)
    return paths


def in_notebook() -> bool:
    """True inside a Jupyter kernel (not a script, not terminal IPython, which cannot show images)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def show(fig) -> None:
    """Display ``fig`` inline as a PNG (inside a Jupyter kernel; does nothing elsewhere).

    Rendered here rather than through matplotlib's inline backend, which only knows pyplot figures
    and only shows a cell's last expression."""
    if not in_notebook():
        return
    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=INLINE_DPI)
    display(Image(data=buf.getvalue(), format="png"))


def finish(fig, name, folder=None):
    """The end of every plot function: save ``fig`` when ``name`` is given (the functions' ``save=`` /
    ``name=`` argument), show it inline in a notebook, return it."""
    if name:
        save_figure(fig, name, folder)
    show(fig)
    return fig


# after the helpers above: the figure modules import them from here
from .attribution import *  # noqa: E402,F401,F403
from .tracing import *  # noqa: E402,F401,F403
