"""kn_utils.verdicts: tables that hit every branch of every rule."""
import numpy as np
import pytest

from kn_utils import verdicts as V
from kn_utils.stats import paired_difference, summarize, welch_difference


def iv(c, lo, hi, n=30, key="diff"):
    return {key: c, "lo": lo, "hi": hi, "n": n}


@pytest.mark.parametrize("d, expected", [
    (iv(0.2, 0.1, 0.3), "changes"),                    # excludes 0, above
    (iv(-0.2, -0.3, -0.1), "changes"),                 # excludes 0, below
    (iv(0.0, -0.03, 0.04), "no change shown"),         # includes 0, narrow
    (iv(0.05, -0.2, 0.3, n=7), "undecided at n = 7"),  # includes 0, wide
    (iv(0.0, float("nan"), float("nan"), n=1), "undecided at n = 1"),
])
def test_changes_branches(d, expected):
    v = V.changes(d)
    assert v.verdict == expected and v.reason
    if expected == "changes":
        assert ("rises" in v.reason) == (d["lo"] > 0)


def test_changes_on_real_paired_tables():
    # symmetry: the edit leaves it where it was (the P36 case) -> no change shown
    pre = np.array([0.169] * 22)
    assert V.changes(paired_difference(pre, pre)).verdict == "no change shown"
    # synonymy moves 5.6 -> 72.2 on most items -> changes
    before = np.r_[np.zeros(16), np.ones(1), np.zeros(1)]
    after = np.r_[np.ones(13), np.zeros(3), np.ones(1), np.ones(1)]
    assert V.changes(paired_difference(before, after)).verdict == "changes"


@pytest.mark.parametrize("a, b, expected", [
    (iv(0.9, 0.85, 0.95, key="mean"), iv(0.2, 0.1, 0.3, key="mean"), "exceeds"),
    (iv(0.2, 0.1, 0.3, key="mean"), iv(0.9, 0.85, 0.95, key="mean"), "does not exceed"),
    (iv(0.5, 0.3, 0.7, n=5, key="mean"), iv(0.4, 0.2, 0.6, n=6, key="mean"), "undecided at n = 5 / 6"),
    (iv(0.5, float("nan"), float("nan"), n=1, key="mean"), iv(0.4, 0.2, 0.6, key="mean"),
     "undecided at n = 1 / 30"),
])
def test_exceeds_branches(a, b, expected):
    assert V.exceeds(a, b).verdict == expected


@pytest.mark.parametrize("after, before, expected", [
    (0.07, None, "global"),              # Gemma's locality 7 %
    (0.0, 0.70, "global"),               # neighbourhood 70 -> 0
    (0.55, 0.95, "global"),              # above the floor but a drop of 0.40
    (0.9, 0.95, "local"),
    (0.8, None, "local"),
    (float("nan"), None, "undecided"),
])
def test_global_edit_branches(after, before, expected):
    assert V.global_edit(after, before).verdict == expected


def test_global_edit_takes_an_interval():
    assert V.global_edit(summarize([0, 0, 1, 0])).verdict == "global"


def test_criterion_never_assesses_a_global_edit():
    moved = iv(0.3, 0.2, 0.4)
    assert V.criterion(moved, 0.1).verdict == "not assessed: global edit"
    assert V.criterion(moved, 0.9).verdict == "changes"


@pytest.mark.parametrize("ours, loc, expected", [
    (iv(0.25, 0.15, 0.35, key="mean"), None, "holds"),
    (iv(0.25, 0.15, 0.35, key="mean"), 0.0, "not assessed: global edit"),   # never "holds" if global
    (iv(0.6, 0.5, 0.7, key="mean"), 0.9, "ours is higher"),
    (iv(0.1, 0.05, 0.2, key="mean"), 0.9, "ours is lower"),
    (iv(0.1, float("nan"), float("nan"), n=1, key="mean"), None, "undecided at n = 1"),
])
def test_paper_finding_branches(ours, loc, expected):
    assert V.paper_finding(ours, 0.2517, locality_after=loc).verdict == expected


@pytest.mark.parametrize("ours, expected", [
    (iv(0.3, 0.25, 0.4, key="mean"), "within"),
    (iv(0.1, 0.05, 0.12, key="mean"), "below"),
    (iv(0.95, 0.9, 0.99, key="mean"), "above"),
    (iv(0.2, 0.1, 0.3, n=4, key="mean"), "undecided at n = 4"),
    (iv(0.2, float("nan"), float("nan"), n=1, key="mean"), "undecided at n = 1"),
])
def test_in_range_branches(ours, expected):
    assert V.in_range(ours, 0.21, 0.87).verdict == expected


def test_alike_branches():
    rng = np.random.default_rng(0)
    same = rng.normal(0.5, 0.01, 40)
    assert V.alike(welch_difference(same, same + 0.001), "r2").verdict == "alike"
    assert V.alike(welch_difference(same, same - 0.4), "r2").verdict == "differ"
    wide = welch_difference([0.1, 0.9, 0.5], [0.2, 0.8, 0.4])
    assert V.alike(wide, "r2").verdict == "undecided at n = 3 / 3"
    assert V.alike(welch_difference([0.1], [0.2, 0.3]), "tau").verdict.startswith("undecided")
    with pytest.raises(ValueError, match="unknown measure"):
        V.alike(wide, "depth")


@pytest.mark.parametrize("rome, kn, rloc, kloc, expected", [
    (iv(0.8, 0.7, 0.9, key="mean"), iv(0.3, 0.2, 0.4, key="mean"), 0.8, 0.9, "ROME ranks above KN"),
    (iv(0.0, 0.0, 0.05, key="mean"), iv(0.27, 0.2, 0.35, key="mean"), 0.9, 0.9, "KN ranks above ROME"),
    (iv(0.0, 0.0, 0.05, key="mean"), iv(0.27, 0.2, 0.35, key="mean"), 0.0, 0.9,
     "not ranked: ROME's edit is global"),
    (iv(0.8, 0.7, 0.9, key="mean"), iv(0.3, 0.2, 0.4, key="mean"), 0.9, 0.1, "not ranked: KN's edit is global"),
    (iv(0.5, 0.3, 0.7, n=5, key="mean"), iv(0.4, 0.2, 0.6, n=5, key="mean"), None, None,
     "ranking undecided at n = 5 / 5"),
])
def test_ranking_branches(rome, kn, rloc, kloc, expected):
    assert V.ranking(rome, kn, rloc, kloc).verdict == expected
