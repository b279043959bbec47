"""Causal-trace and editing figures: trace heatmaps (Fig 7), average indirect effects by token class
(Fig 13) and ROME edit success by layer.  Each function returns the figure and, given ``save="name"``,
writes it through :func:`kn_utils.plotting.save_figure` to ``folder`` (default
:func:`kn_utils.plotting.figures_dir`).  ``name=`` is the old spelling of ``save=`` (deprecated)."""
from __future__ import annotations

import numpy as np

from matplotlib.figure import Figure

from .core import finish, save_name

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
TITLES = {"hidden": "single restored layer", "mlp": "center of interval of restored MLP layers",
          "attn": "center of interval of restored attention layers"}
KIND_NAMES = {"hidden": "hidden state", "mlp": "MLP", "attn": "Attn"}
CLASS_COLOURS = {"first subject token": "#1f77b4", "middle subject tokens": "#17becf",
                 "last subject token": "#d62728", "first subsequent token": "#2ca02c",
                 "further tokens": "#9467bd", "last token": "#ff7f0e"}


def _subplots(ncols=1, figsize=None):
    # pyplot-free, like every figure here (see kn_utils.plotting)
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols, squeeze=False)


def _draw_trace(ax, result, model_name=None, colorbar=True):
    scores = np.asarray(result.scores, dtype=float)
    b, e = result.subject_range
    labels = [repr(t)[1:-1] + ("*" if b <= i < e else "") for i, t in enumerate(result.tokens)]
    mesh = ax.pcolormesh(scores, cmap=CMAPS.get(result.kind, "Purples"), vmin=result.low_score,
                         vmax=max(np.nanmax(scores), result.low_score + 1e-9))
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(labels)) + 0.5)
    ax.set_yticklabels(labels)
    n_layers = scores.shape[1]
    step = max(1, n_layers // 6)
    ax.set_xticks(np.arange(0, n_layers, step) + 0.5)
    ax.set_xticklabels(range(0, n_layers, step))
    # the model is named once, in the figure's title (plot_trace / plot_trace_panels), not per axis
    window = f" ({result.window})" if result.kind != "hidden" else ""
    ax.set_xlabel(TITLES.get(result.kind, "layer") + window, fontsize=8)
    ax.set_title(f"Impact of restoring {KIND_NAMES.get(result.kind, result.kind)} after corrupted input",
                 fontsize=9)
    if colorbar:
        cb = ax.figure.colorbar(mesh, ax=ax)
        # beside the bar, where it cannot run into the x-axis label below the panel
        cb.set_label(f"p({result.answer.strip()})", fontsize=8)
    return mesh


def plot_trace(result, *, save=None, folder=None, model_name=None, ax=None, name=None):
    """One trace heatmap (tokens x layers); corrupted (subject) tokens are starred."""
    save = save_name(save, name, "plot_trace")
    if ax is None:
        fig, axes = _subplots(figsize=(3.6, 0.25 * len(result.tokens) + 1.4))
        ax = axes[0][0]
    else:
        fig = ax.figure
    _draw_trace(ax, result, model_name)
    if model_name:
        fig.suptitle(f"{model_name}: trace of p({result.answer.strip()})", fontsize=9)
    return finish(fig, save, folder)


def plot_trace_panels(results, *, save=None, folder=None, model_name=None, title=None, name=None):
    """Fig 7: hidden / MLP / attention traces of one prompt side by side (Purples / Greens / Reds).

    ``results``: a dict kind -> TraceResult or a list of TraceResults.
    """
    save = save_name(save, name, "plot_trace_panels")
    if isinstance(results, dict):
        results = [results[k] for k in ("hidden", "mlp", "attn") if k in results]
    results = list(results)
    if not results:
        raise ValueError("no trace results to plot")
    height = 0.25 * len(results[0].tokens) + 1.6
    fig, axes = _subplots(len(results), figsize=(3.9 * len(results), height))
    for ax, result in zip(axes[0], results):
        _draw_trace(ax, result, model_name)
    if title or model_name:
        fig.suptitle(title or f"causal trace in {model_name}: restoring each state after corrupting the "
                              f"starred (subject) tokens", fontsize=10)
    fig.tight_layout()
    return finish(fig, save, folder)


def plot_aie(aie, *, save=None, folder=None, title=None, classes=None, name=None):
    """Fig 13: average indirect effect per layer, one line per token class, 95% band.

    ``aie``: the DataFrame of :func:`kn_utils.tracing.average_indirect_effect` (one kind), or a dict /
    concatenation with several kinds (one panel per kind).
    """
    save = save_name(save, name, "plot_aie")
    import pandas as pd

    if isinstance(aie, dict):
        aie = pd.concat([df.assign(kind=k) for k, df in aie.items()], ignore_index=True)
    if aie.empty:
        raise ValueError("empty AIE table")
    kinds = list(dict.fromkeys(aie["kind"]))
    fig, axes = _subplots(len(kinds), figsize=(4.2 * len(kinds), 3.2))
    for ax, kind in zip(axes[0], kinds):
        part = aie[aie["kind"] == kind]
        for cls in classes or list(dict.fromkeys(part["token_class"])):
            rows = part[part["token_class"] == cls].sort_values("layer")
            if rows.empty:
                continue
            colour = CLASS_COLOURS.get(cls)
            ax.plot(rows["layer"], rows["aie"], label=cls, color=colour)
            ax.fill_between(rows["layer"], rows["aie"] - rows["ci95"], rows["aie"] + rows["ci95"],
                            color=colour, alpha=0.2, linewidth=0)
        ax.set_xlabel("layer")
        ax.set_ylabel("average indirect effect")
        ax.set_title(f"AIE of restoring {KIND_NAMES.get(kind, kind)}", fontsize=9)
        ax.axhline(0, color="grey", linewidth=0.5)
    axes[0][-1].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return finish(fig, save, folder)


def plot_edit_success_by_layer(df, *, save=None, folder=None, title=None,
                               metrics=("efficacy", "paraphrase"), name=None):
    """Edit success of ROME applied at each layer (a layer sweep with columns layer + metrics)."""
    save = save_name(save, name, "plot_edit_success_by_layer")
    missing = {"layer", *[m for m in metrics if m in ("efficacy", "paraphrase")]} - set(df.columns)
    if missing:
        raise ValueError(f"layer sweep table lacks columns {sorted(missing)}")
    table = df.groupby("layer")[[m for m in metrics if m in df.columns]].mean().sort_index()
    fig, axes = _subplots(figsize=(4.5, 3.0))
    ax = axes[0][0]
    for metric in table.columns:
        ax.plot(table.index, table[metric], marker="o", markersize=3, label=metric)
    ax.set_xlabel("edited layer")
    ax.set_ylabel("success")
    ax.legend(fontsize=8)
    ax.set_title(title or "ROME edit success by layer", fontsize=9)
    fig.tight_layout()
    return finish(fig, save, folder)


__all__ = ["plot_trace", "plot_trace_panels", "plot_aie", "plot_edit_success_by_layer"]
