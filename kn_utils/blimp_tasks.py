"""BLiMP tasks on a model: pair scores, accuracy (the paper's Fig 6b measure), items to trace.

Above the scorer and the loaders: a BLiMP paradigm is read by :mod:`kn_utils.data.blimp` (rows,
minimal pairs at the read position) and scored by :func:`kn_utils.scoring.score_targets`; neither of
those imports this module.  (They used to live in ``kn_utils.scoring``, with silent forwards from
``kn_utils.data.blimp.accuracy / pair_scores / trace_items`` that closed an import circle.)
"""
from __future__ import annotations

import math
import re

import pandas as pd

from .data.blimp import minimal_pairs
from .scoring import check_batch_size, score_targets


def pair_scores(lm, pairs: pd.DataFrame, *, batch_size: int = 32, neurons=None, factor: float = 0.0,
                progress: bool = False) -> pd.DataFrame:
    """``pairs`` with ``logp_good``, ``logp_bad`` (teacher-forced sums over target tokens) and ``correct``.

    With ``neurons`` [(layer, neuron)], their activations are multiplied by ``factor`` (0 = Dai et
    al.'s suppression, 2 = enhancement) at the positions where the targets are read, and only there.
    """
    missing = {"prompt", "good", "bad"} - set(pairs.columns)
    if missing:
        raise ValueError(f"pairs needs the columns prompt, good, bad; missing {sorted(missing)}")
    if len(pairs) == 0:
        raise ValueError("pairs is empty")
    check_batch_size(batch_size)
    items = [(p, t) for p, g, b in zip(pairs["prompt"], pairs["good"], pairs["bad"]) for t in (g, b)]
    scores = score_targets(lm, items, neurons=neurons, factor=factor, batch_size=batch_size,
                           progress=progress)
    out = pairs.copy()
    out["logp_good"] = [s.logp for s in scores[0::2]]
    out["logp_bad"] = [s.logp for s in scores[1::2]]
    out["correct"] = out["logp_good"] > out["logp_bad"]
    return out


def blimp_accuracy(lm, pairs: pd.DataFrame, **kwargs) -> float:
    """Fraction of pairs with P(good) > P(bad) at the read position (the paper's Fig 6b measure).

    Multi-token targets compare the teacher-forced products.  ``kwargs`` go to :func:`pair_scores`
    (``neurons=``, ``factor=`` to measure under a suppression, ``batch_size=``).
    """
    return float(pair_scores(lm, pairs, **kwargs)["correct"].mean())


def trace_items(lm, uid: str, corrupt: str, n: int, data_dir=None, *, pool: int = 100,
                source: str = "auto") -> pd.DataFrame:
    """BLiMP agreement prompts to trace: ``prompt``, ``subject`` (the word to corrupt), ``target``
    (the good form).

    ``corrupt``: "determiner" (determiner–noun agreement) or "subject" (subject–verb agreement).
    Of the first ``pool`` usable pairs whose corrupted word occurs once in the prompt, as a whole word
    (so its token span is unambiguous), the ``n`` whose good form the model finds likeliest: a trace
    measures how much of the clean probability the noise removes, and a small model gives most
    specific nouns and verbs next to none.  Also ``p_target`` (teacher-forced, whole form), ``group``.
    """
    if corrupt not in ("determiner", "subject"):
        raise ValueError(f"corrupt must be 'determiner' or 'subject', got {corrupt!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    pairs = minimal_pairs(lm, uid, data_dir=data_dir, n=max(pool, n), source=source)
    keep = []
    for i, (prompt, word) in enumerate(zip(pairs["prompt"], pairs[corrupt])):
        if not word:
            continue
        found = [m.start() for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", prompt)]
        if len(found) == 1 and prompt.find(word) == found[0]:
            keep.append(i)
    if not keep:
        raise ValueError(f"{pairs.attrs['uid']}: no pair of the first {len(pairs)} has a {corrupt} "
                         f"occurring once in its prompt")
    scored = pair_scores(lm, pairs.iloc[keep].reset_index(drop=True))
    scored = scored.sort_values("logp_good", ascending=False, kind="stable").head(n)
    out = pd.DataFrame({"prompt": scored["prompt"], "subject": scored[corrupt],
                        "target": scored["good_token"], "p_target": scored["logp_good"].map(math.exp),
                        "group": scored["group"]}).reset_index(drop=True)
    out.attrs.update(uid=pairs.attrs["uid"], data_source=pairs.attrs["data_source"], corrupted=corrupt,
                     pool=len(keep))
    return out


__all__ = ["blimp_accuracy", "pair_scores", "trace_items"]
