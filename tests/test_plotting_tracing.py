"""Trace figures read without the code: the model is named once (the title), never in each panel's
axis label where it ran into the colour bar's label."""
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

from kn_utils.plotting import plot_trace, plot_trace_panels  # noqa: E402


def _trace(kind):
    return SimpleNamespace(kind=kind, scores=np.linspace(0, 1, 4 * 6).reshape(4, 6), subject_range=(0, 2),
                           tokens=["The", " Eiffel", " Tower", " in"], low_score=0.01, window=10, answer=" Paris")


def test_model_named_once_and_colour_bar_label_beside_the_bar():
    fig = plot_trace_panels({k: _trace(k) for k in ("hidden", "mlp", "attn")}, model_name="default")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 3
    assert all("default" not in ax.get_xlabel() for ax in fig.axes)
    assert "default" in fig._suptitle.get_text()
    bars = [ax for ax in fig.axes if not ax.get_title()]
    assert [ax.get_ylabel() for ax in bars] == ["p(Paris)"] * 3       # on the bar's side, not under it
    single = plot_trace(_trace("mlp"), model_name="gemma-3-270m")
    assert single._suptitle.get_text().count("gemma-3-270m") == 1
    assert all("gemma" not in ax.get_xlabel() for ax in single.axes)
