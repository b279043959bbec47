"""The paper's figure types, one convention for all of them.

Every plot function builds a :class:`matplotlib.figure.Figure` without pyplot (no global figure list,
nothing left open in scripts), passes it to :func:`finish`, and returns it.  :func:`finish` writes it
(PNG + PDF, :func:`save_figure`) when the function was given a name, and, inside a Jupyter kernel,
shows it inline right away as a PNG at :data:`INLINE_DPI` — so a cell that draws several figures shows
each of them, not only its last expression.  End such a cell with ``;`` or a table, not with the
figure (a figure as the last expression would be shown a second time once pyplot is imported).

Where files go: ``folder=`` when given, else :func:`figures_dir`: ``$KN_FIGURES_DIR``, else the source
checkout's ``figures/`` when the package runs from one, else ``./figures`` of the current directory
(an installed wheel has no checkout; a figure never goes into site-packages).

Attribution / localisation figures live in ``plotting/attribution.py``, causal-trace and editing
figures in ``plotting/tracing.py``, the convention's helpers in ``plotting/core.py``; all are
re-exported here.
"""
from __future__ import annotations

import warnings

from .core import (FIGURES_ENV, INLINE_DPI, SAVE_DPI, STABLE_METADATA, figures_dir, finish, in_notebook,  # noqa: F401
                   save_figure, save_name, show)
from .attribution import *  # noqa: E402,F401,F403
from .tracing import *  # noqa: E402,F401,F403


def __getattr__(name):
    # FIGURES_DIR was a constant; until kn_utils 0.2 it answers (following figures_dir()) with a warning
    if name == "FIGURES_DIR":
        warnings.warn("kn_utils.plotting.FIGURES_DIR is deprecated and will be removed in kn_utils 0.2: "
                      "call kn_utils.plotting.figures_dir()", DeprecationWarning, stacklevel=2)
        return figures_dir()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
