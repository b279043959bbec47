"""Fig 6b: BLiMP accuracy before -> after an intervention on knowledge neurons, scored as a paired
comparison over the same pairs (accuracy before and after, flips both ways, McNemar).

What the paper's released code does (frankniujc/kn_thesis): the only BLiMP intervention in it is
``kn_code/plot.py::pre_post_edit_probs`` (used by ``localise_kn.ipynb``, section "Suppress KN"): for
each prompt of ``get_blimp_prompts(paradigm)`` (``kn_code/blimp.py``: the sentence with its single
differing token masked, good and bad token) that passes a filter, it reads the probabilities at the
mask position (``KnowledgeNeurons.generate``), applies ``KnowledgeNeurons.erase(prompt, neurons)`` —
``patch_ff_layer(..., mode='suppress')`` at the mask position: the neurons' activations set to 0 at
that position only, for that prompt — reads the probabilities again, and unpatches.  The weights are
never changed; no accuracy is computed in the released code.  :func:`fig6b_edit_effect` follows that
protocol (``edit="suppress"``: activations x ``factor`` = 0 at the read position, per pair) and adds
what the figure reports: BLiMP's judgement P(good) > P(bad) at the read position for every pair
before and after, on the same pairs.  Dai et al.'s weight update (:func:`kn_utils.kn_edit`) can be
scored the same way (``edit=`` a callable returning the applied edit as a context manager).
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .blimp_tasks import pair_scores
from .stats import Paired, paired_difference, wilson
from .verdicts import Verdict, changes


@dataclass
class Fig6bEffect:
    """``pairs``: one row per pair (prompt, good, bad, correct_before, correct_after, margin_before,
    margin_after: log P(good) - log P(bad)); ``accuracy``: the paired 0/1 comparison (before, after,
    diff = after - before, Newcombe interval, McNemar mid-p, good_to_bad / bad_to_good flips);
    ``margin``: the paired t comparison of the log-probability margins (mean vs mean);
    ``verdict``: :func:`kn_utils.verdicts.changes` on the accuracy; ``method`` the intervention."""

    pairs: pd.DataFrame
    accuracy: Paired
    margin: Paired
    verdict: Verdict
    method: str

    def summary(self) -> dict:
        """One report row: accuracies in %, Wilson intervals, flips, the paired difference."""
        a, n = self.accuracy, self.accuracy.n
        flips = a.good_to_bad + a.bad_to_good
        return {"n_pairs": n, "method": self.method, "before": 100 * a.before,
                "before_lo": 100 * a.before_lo, "before_hi": 100 * a.before_hi, "after": 100 * a.after,
                "after_lo": 100 * a.after_lo, "after_hi": 100 * a.after_hi, "good_to_bad": a.good_to_bad,
                "bad_to_good": a.bad_to_good, "flip_rate": 100 * flips / n if n else float("nan"),
                "diff": 100 * a.diff, "diff_lo": 100 * a.lo, "diff_hi": 100 * a.hi, "mcnemar_p": a.p,
                "margin_before": self.margin.before, "margin_after": self.margin.after,
                "margin_diff": self.margin.diff, "margin_lo": self.margin.lo, "margin_hi": self.margin.hi,
                "verdict": self.verdict.verdict, "reason": self.verdict.reason}


def fig6b_edit_effect(lm, pairs: pd.DataFrame, neurons=None, *, edit="suppress", factor: float = 0.0,
                      batch_size: int = 32, progress: bool = False) -> Fig6bEffect:
    """BLiMP judgements of ``pairs`` (columns prompt, good, bad, e.g. from
    :func:`kn_utils.data.blimp.minimal_pairs`) before and after an intervention, on the same pairs.

    ``edit="suppress"`` (the paper's code): ``neurons`` [(layer, unit)] have their activations
    multiplied by ``factor`` (0: erased) at the position where each pair is read, and nowhere else;
    an empty list (a failed search) leaves the model as it is.  ``edit`` a callable: ``edit()``
    returns the applied edit as a context manager that restores the weights on exit (e.g.
    ``lambda: kn_edit(lm, neurons, "this", "these")``); ``neurons`` is then unused.
    """
    if edit == "suppress":
        if neurons is None:
            raise ValueError("edit='suppress' needs neurons: a list of (layer, unit), [] for none")
        neurons = [tuple(int(v) for v in x) for x in neurons]
        method = f"activations x {factor:g} at the read position of {len(neurons)} neuron(s)"
    elif callable(edit):
        method = getattr(edit, "__name__", "edit")
    else:
        raise ValueError(f"edit must be 'suppress' or a callable returning an applied edit, got {edit!r}")
    before = pair_scores(lm, pairs, batch_size=batch_size, progress=progress)   # checks the columns
    if edit == "suppress":
        after = (pair_scores(lm, pairs, neurons=neurons, factor=factor, batch_size=batch_size,
                             progress=progress) if neurons else before)
    else:
        applied = edit()
        if hasattr(applied, "__exit__"):
            with applied:
                after = pair_scores(lm, pairs, batch_size=batch_size, progress=progress)
        elif hasattr(applied, "restore"):
            try:
                after = pair_scores(lm, pairs, batch_size=batch_size, progress=progress)
            finally:
                applied.restore()
        else:
            raise TypeError(f"edit() returned {type(applied).__name__}, which can neither be used in "
                            f"'with' nor .restore(): the model may still be edited")
    table = pd.DataFrame({"prompt": before["prompt"].values, "good": before["good"].values,
                          "bad": before["bad"].values,
                          "correct_before": before["correct"].astype(int).values,
                          "correct_after": after["correct"].astype(int).values,
                          "margin_before": (before["logp_good"] - before["logp_bad"]).values,
                          "margin_after": (after["logp_good"] - after["logp_bad"]).values})
    acc = paired_difference(table["correct_before"], table["correct_after"], method="mcnemar")
    margin = paired_difference(table["margin_before"], table["margin_after"], method="t", bounds=None)
    return Fig6bEffect(table, acc, margin, changes(acc), method)


def accuracy_interval(correct) -> tuple[float, float]:
    """Wilson interval of a 0/1 column (e.g. ``correct_after``)."""
    values = pd.Series(correct).astype(int)
    return wilson(int(values.sum()), len(values))


__all__ = ["fig6b_edit_effect", "Fig6bEffect", "accuracy_interval"]
