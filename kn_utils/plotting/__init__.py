"""The paper's figure types.  Every figure is written to ``figures/`` as PNG and PDF by :func:`save_figure`.

Attribution / localisation figures live in ``plotting/attribution.py``, causal-trace and editing
figures in ``plotting/tracing.py``; both are re-exported here.
"""
from __future__ import annotations

from pathlib import Path

FIGURES_DIR = Path(__file__).resolve().parents[2] / "figures"


def save_figure(fig, name: str, folder=None) -> list[Path]:
    """Write ``fig`` as ``<folder>/<name>.png`` and ``.pdf`` (folder default: the repo's figures/)."""
    folder = Path(folder) if folder else FIGURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, bbox_inches="tight", dpi=150 if path.suffix == ".png" else None)
    return paths


def finish(fig, name, folder=None):
    """``fig``, written by :func:`save_figure` first when ``name`` is given (the plot functions'
    ``save=`` / ``name=`` argument)."""
    if name:
        save_figure(fig, name, folder)
    return fig


# after the helpers above: the figure modules import them from here
from .attribution import *  # noqa: E402,F401,F403
from .tracing import *  # noqa: E402,F401,F403
