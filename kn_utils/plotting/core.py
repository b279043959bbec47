"""The one figure convention every plot function follows: where figures go, how they are saved
(PNG + PDF) and shown inline in a notebook (see the package docstring of :mod:`kn_utils.plotting`).
The figure modules import these helpers from here, so the package ``__init__`` only re-exports."""
from __future__ import annotations

import io
import os
from pathlib import Path

from ..resources import checkout_root
from ..settings import env

FIGURES_ENV = "KN_FIGURES_DIR"
SAVE_DPI = 150    # PNG files in figures/
INLINE_DPI = 90   # images embedded in notebooks: keeps an executed notebook at a few MB


def figures_dir() -> Path:
    """Where figures go without ``folder=``: ``$KN_FIGURES_DIR``, else ``figures/`` of the source
    checkout, else ``./figures`` (read at each call, so a changed variable counts)."""
    value = env(FIGURES_ENV)
    if value is not None:
        return Path(value).expanduser()
    root = checkout_root()
    return root / "figures" if root is not None else Path.cwd() / "figures"


# No creation date or library version in the files: a figure whose data did not change is written
# byte for byte the same, so re-executing a notebook changes only the figures whose data changed.
STABLE_METADATA = {".png": {"Software": None},
                   ".pdf": {"Creator": None, "Producer": None, "CreationDate": None}}


def save_figure(fig, name: str, folder=None) -> list[Path]:
    """Write ``fig`` as ``<folder>/<name>.png`` and ``.pdf`` (folder default: :func:`figures_dir`).

    Each file is written to a temporary file beside it and renamed over the old one when complete
    (an interrupted run never leaves a half-written figure), without creation dates (the same figure
    gives the same bytes)."""
    folder = Path(folder) if folder else figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    for path in paths:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            fig.savefig(tmp, format=path.suffix[1:], bbox_inches="tight", metadata=STABLE_METADATA[path.suffix],
                        dpi=SAVE_DPI if path.suffix == ".png" else None)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
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
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=INLINE_DPI, metadata=STABLE_METADATA[".png"])
    display(Image(data=buf.getvalue(), format="png"))


def save_name(save, name, where: str):
    """The file name a plot function was given: ``save=``, or the old ``name=`` of the causal-trace
    figures (still accepted, with a DeprecationWarning; both at once is an error)."""
    if name is None:
        return save
    if save is not None:
        raise TypeError(f"{where}() got save={save!r} and name={name!r}: pass only save= (name= is its "
                        f"old spelling)")
    import warnings

    warnings.warn(f"{where}(name=...) is deprecated: use save=... (every plot function's argument)",
                  DeprecationWarning, stacklevel=3)
    return name


def finish(fig, name, folder=None):
    """The end of every plot function: save ``fig`` when ``name`` (the function's ``save=``) is given,
    show it inline in a notebook, return it."""
    if name:
        save_figure(fig, name, folder)
    show(fig)
    return fig
