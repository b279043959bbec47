import matplotlib

matplotlib.use("Agg")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from kn_utils.plotting import attribution as pa  # noqa: E402


def _summary():
    tokens = ["are", "is", "were", "was", "run", "runs"]
    return pd.DataFrame({"token": tokens, "pre_mean": [0.1] * 6, "post_mean": [0.2] * 6,
                         "rel_change": [0.5, -0.3, 1.0, -0.1, 0.2, 0.0],
                         "t": [3.0, -2.0, 1.0, 0.0, 0.5, 0.1], "p": [0.01, 0.2, 0.04, 0.9, np.nan, 0.5],
                         "n": [10] * 6})


def test_probability_change_red_labels_separators_and_order(tmp_path):
    groups = {"plural": ["are", "were", "run"], "singular": ["is", "was", "runs"]}
    fig = pa.plot_probability_change(_summary(), groups, save="change", folder=tmp_path)
    assert isinstance(fig, Figure)
    ax, ax_p = fig.axes[:2]  # relative change above, the probabilities themselves below (shared x)
    labels = [t.get_text() for t in ax_p.get_xticklabels()]
    assert labels == ["are", "were", "run", "is", "was", "runs"]
    red = {t.get_text() for t in ax_p.get_xticklabels() if to_rgba(t.get_color()) == to_rgba(pa.SIGNIFICANT)}
    assert red == {"are", "were"}  # p < 0.05; NaN p is not significant
    heights = [b.get_height() for b in ax.patches]
    assert heights == [0.5, 1.0, 0.2, -0.3, -0.1, 0.0]
    separators = [ln for ln in ax.lines if ln.get_xdata()[0] == 2.5]
    assert len(separators) == 1
    assert {t.get_text() for t in ax.texts} == {"plural", "singular"}
    assert (tmp_path / "change.png").stat().st_size > 0 and (tmp_path / "change.pdf").exists()
    # the absolute probabilities, so a tiny base with a large relative change is seen as tiny
    assert ax_p.get_yscale() == "log"
    pre, post = (c.get_offsets()[:, 1].tolist() for c in ax_p.collections if hasattr(c, "get_sizes")
                 and c.get_offsets().shape[0] == 6)
    assert pre == [0.1] * 6 and post == [0.2] * 6
    # the figure itself says what red means, and how many words are red
    assert any("p < 0.05 (2 of 6)" in t.get_text() for t in fig.texts)


def test_probability_change_tokens_outside_groups_and_bad_input():
    fig = pa.plot_probability_change(_summary(), {"plural": ["are", "missing"]})
    labels = [t.get_text() for t in fig.axes[1].get_xticklabels()]
    assert labels[0] == "are" and sorted(labels[1:]) == sorted(["is", "were", "was", "run", "runs"])
    assert "other" in {t.get_text() for t in fig.axes[0].texts}
    with pytest.raises(ValueError, match="columns"):
        pa.plot_probability_change(pd.DataFrame({"token": ["a"]}))
    with pytest.raises(ValueError, match="groups"):
        pa.plot_probability_change(_summary(), ["are"])


def test_kn_frequency_matches_a_loop():
    rng = np.random.default_rng(0)
    pool = [(10, 2096), (9, 1094), (3, 7), (11, 1)]
    sets = [[pool[i] for i in range(4) if rng.random() < 0.5] for _ in range(40)]
    groups = [["this", "that", "these", "those"][i % 4] for i in range(40)]
    freq = pa.kn_frequency(sets, groups)
    assert list(freq.columns) == ["this", "that", "these", "those"]
    for nrn in pool:
        for g in freq.columns:
            bags = [s for s, gg in zip(sets, groups) if gg == g]
            want = sum(nrn in s for s in bags) / len(bags)
            label = pa.neuron_label(nrn)
            got = freq.loc[label, g] if label in freq.index else 0.0
            assert got == pytest.approx(want)
    assert list(freq.max(axis=1)) == sorted(freq.max(axis=1), reverse=True)
    fig = pa.plot_kn_frequency(freq, top=2)
    assert len(fig.axes[0].get_yticklabels()) == 2
    assert pa.kn_frequency([[], []], ["a", "b"]).empty
    pa.plot_kn_frequency(pa.kn_frequency([[], []], ["a", "b"]))  # draws "no knowledge neurons"
    with pytest.raises(ValueError, match="group labels"):
        pa.kn_frequency([[(1, 2)]], ["a", "b"])


def test_heatmap_window_and_box():
    scores = torch.zeros(6, 100)
    scores[4, 50] = 3.0
    scores[2, 10] = -1.0
    fig = pa.plot_attribution_heatmap(scores, [(4, 50), (2, 10)], width=3)
    ax = fig.axes[0]
    img = ax.images[0].get_array()
    assert img.shape == (6, 14)  # two windows of 7 neurons, all layers
    cols = list(range(7, 14)) + list(range(47, 54))
    assert img[4, cols.index(50)] == 3.0 and img[2, cols.index(10)] == -1.0
    assert len(ax.patches) == 2  # one box per chosen neuron
    stack = torch.stack([scores, 3 * scores])
    auto = pa.plot_attribution_heatmap(stack, width=2)  # mean map, centred on its argmax
    assert auto.axes[0].images[0].get_array()[4, 2] == pytest.approx(6.0)
    with pytest.raises(ValueError, match="outside"):
        pa.plot_attribution_heatmap(scores, [(6, 0)])
    with pytest.raises(ValueError, match="shape"):
        pa.plot_attribution_heatmap(torch.zeros(3))


def test_layer_distribution_fractions():
    syntax = [(28, 1), (28, 2), (29, 3), (5, 1)]
    facts = pd.Series([0, 0, 2, 2], index=range(4))
    fig = pa.plot_layer_distribution({"syntax": syntax, "facts": facts}, n_layers=30)
    lines = fig.axes[0].lines
    assert len(lines) == 2
    y = lines[0].get_ydata()
    assert len(y) == 30 and y[28] == pytest.approx(0.5) and y[5] == pytest.approx(0.25)
    assert lines[1].get_ydata()[2] == pytest.approx(0.5)
    counts = pa.plot_layer_distribution({"syntax": syntax}, 30, normalise=False)
    assert counts.axes[0].lines[0].get_ydata()[28] == 2
    with pytest.raises(ValueError):
        pa.plot_layer_distribution({})


def test_blimp_accuracy_bars(tmp_path):
    df = pd.DataFrame({"paradigm": ["dna_2", "dna_irr_2"], "before": [1.0, 0.995], "after": [0.948, 0.969]})
    fig = pa.plot_blimp_accuracy(df, save="acc", folder=tmp_path)
    heights = [b.get_height() for b in fig.axes[0].patches]
    assert heights == pytest.approx([100.0, 99.5, 94.8, 96.9])
    assert (tmp_path / "acc.png").exists()
    with pytest.raises(ValueError, match="columns"):
        pa.plot_blimp_accuracy(df.drop(columns="after"))


def test_heatmap_labels():
    scores = torch.zeros(4, 40)
    scores[3, 30] = 2.0
    fig = pa.plot_attribution_heatmap(scores, [(3, 30), (1, 5)], width=2, labels=True)
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["L1.N5", "L3.N30"]
    assert not pa.plot_attribution_heatmap(scores, [(3, 30)], width=2).axes[0].texts


def test_heatmap_maximum_is_labelled_as_such_and_windows_explained():
    scores = torch.zeros(4, 40)
    scores[3, 30] = 2.0
    # no neurons given (e.g. a KN search that found none): the box is the maximum, and says so
    fig = pa.plot_attribution_heatmap(scores, None, width=2, labels=True)
    assert [t.get_text() for t in fig.axes[0].texts] == ["max attribution L3.N30"]
    two = pa.plot_attribution_heatmap(scores, [(3, 30), (1, 5)], width=2)
    assert "2 windows of ±2 neurons, split by black lines" in two.axes[0].get_xlabel()
    one = pa.plot_attribution_heatmap(scores, [(3, 30)], width=2)
    assert "split" not in one.axes[0].get_xlabel() and "±2" in one.axes[0].get_xlabel()


def test_saved_figures_are_byte_stable(tmp_path):
    import time

    from kn_utils.plotting import save_figure

    fig = pa.plot_probability_change(_summary(), {"plural": ["are", "were"]})
    first = [p.read_bytes() for p in save_figure(fig, "same", tmp_path)]
    time.sleep(1.1)  # a creation date with a one-second resolution would differ now
    second = [p.read_bytes() for p in save_figure(fig, "same", tmp_path)]
    assert first == second
    assert b"CreationDate" not in second[1] and b"matplotlib" not in second[0].lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.pdf", "same.png"]  # no temporary left


def test_interrupted_save_keeps_the_old_figure(tmp_path, monkeypatch):
    from kn_utils.plotting import save_figure

    fig = pa.plot_probability_change(_summary())
    png, pdf = save_figure(fig, "kept", tmp_path)
    old = png.read_bytes()

    def broken(self, fname, **kwargs):
        Path(fname).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(KeyboardInterrupt):
        save_figure(fig, "kept", tmp_path)
    assert png.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.pdf", "kept.png"]
