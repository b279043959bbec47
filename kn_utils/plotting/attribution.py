"""Attribution and localisation figures (the paper's Fig 2a, 2b, 3/4/10/11, 5b/12, 6b).

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global state, no
double display in notebooks) and, given ``save="name"``, writes it with
:func:`kn_utils.plotting.save_figure` to ``folder`` (default :func:`kn_utils.plotting.figures_dir`).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..localisation import neuron_label  # the tables' labels; re-exported for the figures' callers
from .core import finish

__all__ = ["plot_attribution_heatmap", "kn_frequency", "plot_kn_frequency", "plot_probability_change",
           "plot_layer_distribution", "plot_blimp_accuracy", "neuron_label"]

SIGNIFICANT = "tab:red"
SEPARATOR = "0.6"


def _as_map(scores) -> np.ndarray:
    s = torch.as_tensor(scores).detach().float().cpu()
    if s.dim() == 3:  # a stack of per-prompt maps: show their mean
        s = s.mean(0)
    if s.dim() != 2:
        raise ValueError(f"scores must be one map [n_layers, n_neurons] or a stack [n, n_layers, "
                         f"n_neurons], got shape {tuple(s.shape)}")
    return s.numpy()


def plot_attribution_heatmap(scores, neurons=None, *, width: int = 10, layers=None, title=None,
                             labels: bool = False, label_prefix: str = "", save=None, folder=None) -> Figure:
    """Fig 2a: attribution scores of the neurons around the chosen ``neurons`` (boxed), all layers.

    ``scores``: one map [n_layers, n_neurons] or a stack of maps (averaged).  ``neurons``: the
    (layer, neuron) pairs to centre on (default: the highest-scoring neuron).  ``width``: neurons
    shown either side of each chosen one.  ``layers``: rows to show (default: all).  ``labels``:
    write each chosen neuron's "L<layer>.N<neuron>" beside its box, after ``label_prefix``.  Without
    ``neurons`` the box marks the map's maximum and its label says so ("max attribution L3.N7"): it
    is never presented as a knowledge neuron.
    """
    s = _as_map(scores)
    n_layers, n_neurons = s.shape
    if neurons is None or len(neurons) == 0:
        layer, unit = np.unravel_index(int(np.argmax(s)), s.shape)
        neurons = [(int(layer), int(unit))]
        label_prefix = "max attribution "
    for layer, unit in neurons:
        if not (0 <= layer < n_layers and 0 <= unit < n_neurons):
            raise ValueError(f"neuron {(layer, unit)} outside the map's {n_layers} x {n_neurons}")
    if not isinstance(width, int) or width < 0:
        raise ValueError(f"width must be a non-negative integer, got {width!r}")
    cols = sorted({c for _, u in neurons for c in range(max(0, u - width), min(n_neurons, u + width + 1))})
    rows = list(range(n_layers)) if layers is None else sorted(int(x) for x in layers)
    if not rows or rows[0] < 0 or rows[-1] >= n_layers:
        raise ValueError(f"layers must lie in 0..{n_layers - 1}, got {layers!r}")
    sub = s[np.ix_(rows, cols)]
    fig = Figure(figsize=(max(4.0, 0.28 * len(cols) + 2), max(3.0, 0.22 * len(rows) + 1.5)))
    ax = fig.add_subplot()
    lim = float(np.abs(sub).max()) or 1.0
    im = ax.imshow(sub, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower",
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, label="attribution score")
    step = max(1, len(cols) // 12)
    ax.set_xticks(range(0, len(cols), step), [str(cols[i]) for i in range(0, len(cols), step)],
                  rotation=90, fontsize=7)
    ystep = max(1, len(rows) // 15)
    ax.set_yticks(range(0, len(rows), ystep), [str(rows[i]) for i in range(0, len(rows), ystep)],
                  fontsize=7)
    gaps = [i for i in range(1, len(cols)) if cols[i] != cols[i - 1] + 1]
    for i in gaps:  # gaps between windows around different neurons
        ax.axvline(i - 0.5, color="k", lw=1.5)
    for layer, unit in neurons:
        if layer in rows:
            ax.add_patch(Rectangle((cols.index(unit) - 0.5, rows.index(layer) - 0.5), 1, 1,
                                   fill=False, ec="k", lw=1.5))
            if labels:
                ax.annotate(label_prefix + neuron_label((layer, unit)), (cols.index(unit) + 0.6, rows.index(layer)),
                            fontsize=7, va="center", ha="left",
                            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
    # the x-axis is not one range of neurons but a window around each boxed one: say so on the figure
    windows = f"{len(gaps) + 1} windows of ±{width} neurons, split by black lines" if gaps else f"±{width} neurons"
    ax.set_xlabel(f"neuron index ({windows} around the boxed neuron{'s' if len(neurons) > 1 else ''})",
                  fontsize=8)
    ax.set_ylabel("layer")
    ax.set_title(title or "attribution around " + ", ".join(neuron_label(n) for n in neurons), fontsize=9)
    return finish(fig, save, folder)


def kn_frequency(neuron_sets, groups) -> pd.DataFrame:
    """Fig 2b's table: for each neuron, the fraction of bags of each group in which it is a KN.

    ``neuron_sets``: one list of (layer, neuron) per bag (e.g. per determiner–noun pair);
    ``groups``: the bag's group label (e.g. its determiner), same length.  Rows are neurons sorted by
    their highest frequency, columns the groups in first-seen order; index labels "L10.N2096".
    """
    neuron_sets, groups = list(neuron_sets), list(groups)
    if len(neuron_sets) != len(groups):
        raise ValueError(f"{len(neuron_sets)} neuron sets but {len(groups)} group labels")
    if not neuron_sets:
        raise ValueError("no neuron sets given")
    order = list(dict.fromkeys(groups))
    size = pd.Series(groups).value_counts()
    counts: dict[tuple, dict] = {}
    for neurons, g in zip(neuron_sets, groups):
        for nrn in {(int(a), int(b)) for a, b in neurons}:
            counts.setdefault(nrn, dict.fromkeys(order, 0))[g] += 1
    if not counts:
        return pd.DataFrame(columns=order, dtype=float)
    df = pd.DataFrame.from_dict(counts, orient="index")[order].astype(float)
    df = df / size[order].to_numpy()[None, :]
    df = df.loc[df.max(axis=1).sort_values(ascending=False, kind="stable").index]
    df.index = [neuron_label(n) for n in df.index]
    df.index.name = "neuron"
    return df


def plot_kn_frequency(freq: pd.DataFrame, *, top: int = 10, title=None, save=None, folder=None) -> Figure:
    """Fig 2b: heat table of :func:`kn_frequency` (top ``top`` neurons), each cell annotated."""
    if not isinstance(freq, pd.DataFrame):
        raise ValueError("freq must be the DataFrame returned by kn_frequency")
    sub = freq.head(top)
    fig = Figure(figsize=(1.2 + 0.9 * max(1, sub.shape[1]), 1.0 + 0.35 * max(1, len(sub))))
    ax = fig.add_subplot()
    if sub.empty:
        ax.text(0.5, 0.5, "no knowledge neurons", ha="center", va="center")
        ax.set_axis_off()
    else:
        ax.imshow(sub.to_numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for (i, j), v in np.ndenumerate(sub.to_numpy()):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if v > 0.6 else "black")
        ax.set_xticks(range(sub.shape[1]), [str(c) for c in sub.columns])
        ax.set_yticks(range(len(sub)), list(sub.index), fontsize=8)
        ax.xaxis.tick_top()
    ax.set_title(title or "fraction of bags in which the neuron is a KN", fontsize=9, pad=22)
    return finish(fig, save, folder)


def _ordered_tokens(summary: pd.DataFrame, groups) -> tuple[list[str], list[tuple[str, int, int]]]:
    """Tokens in plotting order and (group name, first index, last index) spans."""
    present = list(summary["token"])
    if groups is None:
        return present, []
    if not isinstance(groups, Mapping):
        raise ValueError("groups must map a group name to a list of tokens, e.g. {'plural': [...]}")
    tokens, spans = [], []
    for name, members in groups.items():
        members = [t for t in members if t in present and t not in tokens]
        if members:
            spans.append((str(name), len(tokens), len(tokens) + len(members) - 1))
            tokens += members
    rest = [t for t in present if t not in tokens]
    if rest:
        spans.append(("other", len(tokens), len(tokens) + len(rest) - 1))
        tokens += rest
    return tokens, spans


def plot_probability_change(summary: pd.DataFrame, groups=None, *, alpha: float = 0.05, title=None,
                            ylabel=None, save=None, folder=None) -> Figure:
    """Fig 3/4/10/11: relative probability change per token after an intervention.

    ``summary``: :func:`kn_utils.editing.kn.intervention_summary` output (columns token, rel_change,
    p).  ``groups``: {group name: [tokens]} sets the order; grey lines separate the groups and the
    group names are written above.  Tick labels are red where the t-test gives p < ``alpha``.
    """
    need = {"token", "rel_change", "p"}
    if not isinstance(summary, pd.DataFrame) or need - set(summary.columns):
        raise ValueError(f"summary must be a DataFrame with columns {sorted(need)} "
                         f"(intervention_summary's output)")
    if summary.empty:
        raise ValueError("summary is empty")
    summary = summary.drop_duplicates("token").set_index("token")
    tokens, spans = _ordered_tokens(summary.reset_index(), groups)
    values = summary.loc[tokens, "rel_change"].astype(float).to_numpy()
    pvals = summary.loc[tokens, "p"].astype(float).to_numpy()
    # the relative change of a tiny probability can dwarf everything else (0.0009 -> 0.0106 is +10.8):
    # a second panel shows the probabilities themselves, on a log scale, when the summary has them
    absolute = {"pre_mean", "post_mean"} <= set(summary.columns)
    width = max(4.0, 0.38 * len(tokens) + 1.5)
    fig = Figure(figsize=(width, 5.6 if absolute else 3.6))
    if absolute:
        ax, ax_p = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    else:
        ax, ax_p = fig.add_subplot(), None
    colors = np.where(values >= 0, "tab:blue", "tab:orange")
    ax.bar(range(len(tokens)), values, color=colors)
    ax.axhline(0, color="k", lw=0.8)
    bottom = ax_p if absolute else ax
    bottom.set_xticks(range(len(tokens)), [t.strip() or repr(t) for t in tokens], rotation=60, ha="right")
    for label, p in zip(bottom.get_xticklabels(), pvals):
        if np.isfinite(p) and p < alpha:
            label.set_color(SIGNIFICANT)
    for name, first, last in spans:
        if first > 0:
            for a in (ax, ax_p) if absolute else (ax,):
                a.axvline(first - 0.5, color=SEPARATOR, lw=1.2)
        ax.text((first + last) / 2, 1.01, name, transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=8, color="0.3")
    ax.set_xlim(-0.6, len(tokens) - 0.4)
    ax.set_ylabel(ylabel or r"$(p_{post}-p_{pre})/\min(p_{post},p_{pre})$", fontsize=8)
    ax.set_title(title or "probability change", fontsize=9, pad=16)
    if absolute:
        x = np.arange(len(tokens))
        pre = summary.loc[tokens, "pre_mean"].astype(float).to_numpy()
        post = summary.loc[tokens, "post_mean"].astype(float).to_numpy()
        ax_p.vlines(x, np.minimum(pre, post), np.maximum(pre, post), color="0.7", lw=1)
        ax_p.scatter(x, pre, marker="o", s=18, color="0.5", label="before", zorder=3)
        ax_p.scatter(x, post, marker="_", s=80, color="k", label="after", zorder=3)
        ax_p.set_yscale("log")
        ax_p.set_ylabel("mean probability", fontsize=8)
        ax_p.legend(fontsize=7, loc="best")
    n_sig = int(np.sum(np.isfinite(pvals) & (pvals < alpha)))
    fig.text(0.01, 0.0, f"red word = t-test over the prompts gives p < {alpha:g} ({n_sig} of {len(tokens)})",
             fontsize=7, color=SIGNIFICANT, ha="left", va="top")
    return finish(fig, save, folder)


def plot_layer_distribution(distributions: Mapping, n_layers: int | None = None, *, normalise=True,
                            title=None, save=None, folder=None) -> Figure:
    """Fig 5b/12: where the knowledge neurons lie, one line per label (e.g. syntax vs facts).

    ``distributions``: {label: layer_distribution Series, or a list of (layer, neuron)}.
    ``normalise``: plot the fraction of each label's neurons per layer (default) rather than counts.
    """
    if not isinstance(distributions, Mapping) or not distributions:
        raise ValueError("distributions must be a non-empty {label: Series or neuron list} mapping")
    series = {}
    for label, d in distributions.items():
        if isinstance(d, pd.Series):
            s = d.astype(float)
        else:
            layers = [int(layer) for layer, _ in d]
            s = pd.Series(layers, dtype=float).value_counts() if layers else pd.Series(dtype=float)
        series[label] = s
    size = n_layers or int(max((max(s.index) for s in series.values() if len(s)), default=0)) + 1
    fig = Figure(figsize=(6, 3.2))
    ax = fig.add_subplot()
    x = np.arange(size)
    for label, s in series.items():
        y = s.reindex(x, fill_value=0).to_numpy(dtype=float)
        total = y.sum()
        if normalise and total > 0:
            y = y / total
        ax.plot(x, y, marker="o", ms=3, label=f"{label} (n={int(total)})")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of KNs" if normalise else "KNs")
    ax.set_xticks(x[:: max(1, size // 15)])
    ax.legend(fontsize=8)
    ax.set_title(title or "layer distribution of knowledge neurons", fontsize=9)
    return finish(fig, save, folder)


def plot_blimp_accuracy(results: pd.DataFrame, *, title=None, save=None, folder=None) -> Figure:
    """Fig 6b: BLiMP accuracy before and after an edit, one pair of bars per paradigm.

    ``results``: columns ``paradigm``, ``before``, ``after`` (fractions in [0, 1] or percentages).
    """
    need = {"paradigm", "before", "after"}
    if not isinstance(results, pd.DataFrame) or need - set(results.columns):
        raise ValueError(f"results must be a DataFrame with columns {sorted(need)}")
    if results.empty:
        raise ValueError("results is empty")
    before = results["before"].astype(float).to_numpy()
    after = results["after"].astype(float).to_numpy()
    scale = 100.0 if max(before.max(), after.max()) <= 1.0 else 1.0
    before, after = before * scale, after * scale
    x = np.arange(len(results))
    fig = Figure(figsize=(max(4.0, 1.3 * len(results) + 1.5), 3.4))
    ax = fig.add_subplot()
    for offset, vals, label, color in ((-0.2, before, "before", "tab:gray"), (0.2, after, "after", "tab:red")):
        bars = ax.bar(x + offset, vals, 0.4, label=label, color=color)
        for bar, v in zip(bars, vals):
            ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [str(p) for p in results["paradigm"]], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    low = min(before.min(), after.min())
    ax.set_ylim(max(0.0, low - 10), 105)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "BLiMP accuracy before / after the edit", fontsize=9)
    return finish(fig, save, folder)
