"""Verdicts as rules over intervals: every conclusion a report prints comes from one of these.

Each rule is a small function returning a :class:`Verdict` ``(verdict, reason)``: ``verdict`` a short
fixed phrase a report can test for, ``reason`` the numbers and the threshold that decided it, to be
printed beside the result.  The thresholds are module constants, each with the reason for its value.

An *interval* is anything with ``lo`` / ``hi`` / ``n`` (and ``diff`` or ``mean``): a
:class:`kn_utils.stats.Paired`, a dict from :func:`kn_utils.stats.summarize` or
:func:`~kn_utils.stats.welch_difference`.  Values are on the scale the caller measured (fractions
0-1 for accuracies unless said otherwise).

    from kn_utils.stats import paired_difference
    from kn_utils import verdicts
    v = verdicts.changes(paired_difference(df.symmetry_acc_pre, df.symmetry_acc))
    print(v.verdict, "-", v.reason)        # e.g. "no change shown - the paired difference ..."
"""
from __future__ import annotations

import math
from typing import NamedTuple

# A paired difference whose 95 % interval includes 0 and lies within +-NO_CHANGE_WITHIN (fraction
# of items, i.e. 5 points) is "no change shown": the paper itself calls a flip rate of <= 5.2 %
# "rarely changes" (Fig 6b), so an effect bounded below 5 points is one the paper would not read as
# a change.  A wider interval around 0 is undecided: more items could still show a change.
NO_CHANGE_WITHIN = 0.05

# An edit whose locality (neighbours' answers kept) or CounterFact neighbourhood success after the
# edit is below GLOBAL_BELOW is "global": it changed at least half of the unrelated facts it was
# checked on, so what it does to the edited fact's criteria (symmetry, synonymy, generality) says
# nothing about that fact.  ROME's own neighbourhood score is 75.4 and the KN baseline's 72.9
# (CounterFact, GPT-2 XL; REFERENCE.md §4): 50 is far below both, where a local editor rarely falls.
GLOBAL_BELOW = 0.5
# Also global: an edit that loses more than GLOBAL_DROP of the locality the model had before it
# (e.g. neighbourhood 0.70 -> 0.30), even if the after value stays above GLOBAL_BELOW.
GLOBAL_DROP = 0.3

# Two groups "localise alike" on a measure only when their difference's interval lies within these
# margins (the scale of each measure): tau moves in steps of 0.05 (the adaptive search), |KN| is a
# count where one neuron is the smallest difference, R²₁ and shares are fractions where 0.1 is
# a tenth of the range (the paper's Table 8 BERT rows differ among themselves by up to 0.12).
ALIKE_WITHIN = {"kn": 1.0, "tau": 0.05, "r2": 0.1, "top_third": 0.1}


class Verdict(NamedTuple):
    verdict: str
    reason: str


def _get(x, name, default=float("nan")):
    if isinstance(x, dict):
        return x.get(name, default)
    return getattr(x, name, default)


def _centre(x) -> float:
    for name in ("diff", "mean", "aie"):
        v = _get(x, name, None)
        if v is not None:
            return float(v)
    raise ValueError(f"an interval needs diff, mean or aie; got {x!r}")


def _interval(x) -> tuple[float, float, float, int]:
    lo, hi, n = float(_get(x, "lo")), float(_get(x, "hi")), _get(x, "n", None)
    if n is None:
        n = (_get(x, "n_a", 0) or 0) + (_get(x, "n_b", 0) or 0)
    return _centre(x), lo, hi, int(n)


def _fmt(c, lo, hi) -> str:
    return f"{c:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def changes(diff, within: float = NO_CHANGE_WITHIN) -> Verdict:
    """"changes" when the paired interval excludes 0; "no change shown" when it includes 0 and lies
    within +-``within``; else "undecided at n = N"."""
    c, lo, hi, n = _interval(diff)
    if math.isnan(lo) or math.isnan(hi):
        return Verdict(f"undecided at n = {n}", f"no interval at n = {n} (at least 2 items are needed)")
    if lo > 0 or hi < 0:
        way = "rises" if lo > 0 else "falls"
        return Verdict("changes", f"after - before {_fmt(c, lo, hi)} excludes 0 (it {way}; n = {n})")
    if -within <= lo and hi <= within:
        return Verdict("no change shown", f"after - before {_fmt(c, lo, hi)} includes 0 and lies within "
                                          f"+-{within:g} (n = {n})")
    return Verdict(f"undecided at n = {n}", f"after - before {_fmt(c, lo, hi)} includes 0 but reaches "
                                            f"beyond +-{within:g}")


def exceeds(a, b, names: tuple[str, str] = ("a", "b")) -> Verdict:
    """"exceeds" only when a's interval lies wholly above b's; "does not exceed" when wholly below;
    else (overlapping intervals) "undecided at n = n_a / n_b"."""
    ca, la, ha, na = _interval(a)
    cb, lb, hb, nb = _interval(b)
    text = f"{names[0]} {ca:.3f} [{la:.3f}, {ha:.3f}] vs {names[1]} {cb:.3f} [{lb:.3f}, {hb:.3f}]"
    if any(math.isnan(v) for v in (la, ha, lb, hb)):
        return Verdict(f"undecided at n = {na} / {nb}", f"{text}: an interval is missing")
    if la > hb:
        return Verdict("exceeds", f"{text}: the intervals separate")
    if ha < lb:
        return Verdict("does not exceed", f"{text}: {names[0]} lies wholly below")
    return Verdict(f"undecided at n = {na} / {nb}", f"{text}: the intervals overlap")


def global_edit(after, before=None, below: float = GLOBAL_BELOW, drop: float = GLOBAL_DROP) -> Verdict:
    """"global" when locality / neighbourhood ``after`` the edit (a fraction, or an interval whose
    mean is used) is below ``below``, or fell by more than ``drop`` from ``before``; else "local".
    A global edit gets no "holds" for any criterion: see :func:`criterion`."""
    a = float(after) if isinstance(after, (int, float)) else _centre(after)
    b = None if before is None else float(before) if isinstance(before, (int, float)) else _centre(before)
    if math.isnan(a):
        return Verdict("undecided", "no locality measured")
    if a < below:
        return Verdict("global", f"locality after the edit {a:.3f} < {below:g}: the edit changes most "
                                 f"unrelated facts")
    if b is not None and not math.isnan(b) and b - a > drop:
        return Verdict("global", f"locality fell {b:.3f} -> {a:.3f}, by more than {drop:g}")
    return Verdict("local", f"locality after the edit {a:.3f} >= {below:g}"
                            + (f", {b:.3f} before" if b is not None else ""))


def criterion(diff, locality_after, locality_before=None) -> Verdict:
    """The verdict on one edit criterion (symmetry, synonymy, ...): :func:`global_edit` first — a
    global edit is "not assessed: global edit" whatever its criteria do — else :func:`changes`."""
    g = global_edit(locality_after, locality_before)
    if g.verdict == "global":
        return Verdict("not assessed: global edit", g.reason)
    return changes(diff)


def paper_finding(ours, paper_value: float, locality_after=None, locality_before=None) -> Verdict:
    """Our interval against a paper number: "holds" (the paper's value lies inside our interval),
    "ours is higher" / "ours is lower" (it lies outside), "undecided at n = N" without an interval,
    and never "holds" for a global edit ("not assessed: global edit")."""
    if locality_after is not None:
        g = global_edit(locality_after, locality_before)
        if g.verdict == "global":
            return Verdict("not assessed: global edit", g.reason)
    c, lo, hi, n = _interval(ours)
    if math.isnan(lo) or math.isnan(hi):
        return Verdict(f"undecided at n = {n}", "no interval")
    text = f"ours {c:.3f} [{lo:.3f}, {hi:.3f}], paper {paper_value:g}"
    if lo <= paper_value <= hi:
        return Verdict("holds", f"{text}: the paper's value lies in our interval (n = {n})")
    return Verdict("ours is higher" if lo > paper_value else "ours is lower", f"{text} (n = {n})")


def in_range(ours, low: float, high: float) -> Verdict:
    """Our interval against a published range (e.g. Table 8's R²₁ values): "within" when the interval
    lies inside [low, high], "below" / "above" when wholly outside, else "undecided at n = N"."""
    c, lo, hi, n = _interval(ours)
    text = f"ours {c:.3f} [{lo:.3f}, {hi:.3f}], range {low:g}-{high:g}"
    if math.isnan(lo) or math.isnan(hi):
        return Verdict(f"undecided at n = {n}", "no interval")
    if low <= lo and hi <= high:
        return Verdict("within", f"{text} (n = {n})")
    if hi < low:
        return Verdict("below", f"{text} (n = {n})")
    if lo > high:
        return Verdict("above", f"{text} (n = {n})")
    return Verdict(f"undecided at n = {n}", f"{text}: the interval crosses a bound")


def alike(diff, measure: str) -> Verdict:
    """Two groups on one measure (``diff``: :func:`~kn_utils.stats.welch_difference`): "differ" when
    the interval excludes 0, "alike" when it lies within +-``ALIKE_WITHIN[measure]``, else
    "undecided at n = n_a / n_b"."""
    if measure not in ALIKE_WITHIN:
        raise ValueError(f"unknown measure {measure!r}; known: {sorted(ALIKE_WITHIN)}")
    c, lo, hi, _ = _interval(diff)
    na, nb = _get(diff, "n_a", "?"), _get(diff, "n_b", "?")
    m = ALIKE_WITHIN[measure]
    if math.isnan(lo) or math.isnan(hi):
        return Verdict(f"undecided at n = {na} / {nb}", "no interval (a group has fewer than 2 values)")
    if lo > 0 or hi < 0:
        return Verdict("differ", f"{measure}: difference {_fmt(c, lo, hi)} excludes 0")
    if -m <= lo and hi <= m:
        return Verdict("alike", f"{measure}: difference {_fmt(c, lo, hi)} lies within +-{m:g}")
    return Verdict(f"undecided at n = {na} / {nb}", f"{measure}: difference {_fmt(c, lo, hi)} includes 0 "
                                                   f"but reaches beyond +-{m:g}")


def ranking(rome, kn, rome_locality=None, kn_locality=None) -> Verdict:
    """ROME vs the KN editor on one score (e.g. CounterFact's): "ROME ranks above KN" only when ROME's
    interval lies wholly above KN's and ROME's edit is not global; "KN ranks above ROME" the mirror;
    "not ranked: ROME's edit is global" (or KN's); else "ranking undecided at n = ..."."""
    for name, loc in (("ROME", rome_locality), ("KN", kn_locality)):
        if loc is not None:
            g = global_edit(loc)
            if g.verdict == "global":
                return Verdict(f"not ranked: {name}'s edit is global", g.reason)
    v = exceeds(rome, kn, ("ROME", "KN"))
    if v.verdict == "exceeds":
        return Verdict("ROME ranks above KN", v.reason)
    if v.verdict == "does not exceed":
        return Verdict("KN ranks above ROME", v.reason)
    return Verdict(v.verdict.replace("undecided", "ranking undecided"), v.reason)


__all__ = ["Verdict", "changes", "exceeds", "global_edit", "criterion", "paper_finding", "in_range",
           "alike", "ranking", "NO_CHANGE_WITHIN", "GLOBAL_BELOW", "GLOBAL_DROP", "ALIKE_WITHIN"]
