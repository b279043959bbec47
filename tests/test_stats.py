"""kn_utils.stats: each interval against a reference implementation (scipy) or a coverage check."""
import math

import numpy as np
import pytest
from scipy import stats as st

from kn_utils.stats import (aie_peak, mcnemar_midp, newcombe_paired, paired_difference, summarize,
                            t_interval, welch_difference, wilson)


def test_summarize_keeps_its_behaviour():
    s = summarize([0, 1, 1, 1])
    assert s["method"] == "wilson" and s["n"] == 4 and s["mean"] == 0.75
    assert (s["lo"], s["hi"]) == wilson(3, 4)
    s = summarize([0.2, 0.4, 0.9])
    assert s["method"] == "t" and (s["lo"], s["hi"]) == t_interval([0.2, 0.4, 0.9])
    s = summarize([0.01, 0.02, 0.99], bounds=(0, 1))
    assert s["method"] == "t, clipped" and s["lo"] == 0


def test_paired_t_matches_scipy_ttest_rel():
    rng = np.random.default_rng(1)
    before = rng.normal(0.3, 0.1, 25)
    after = before + rng.normal(0.05, 0.08, 25)
    res = paired_difference(before, after)
    ref = st.ttest_rel(after, before)
    ci = ref.confidence_interval(0.95)
    assert res.method == "paired t over items" and res.n == 25
    assert res.diff == pytest.approx(np.mean(after - before))
    assert (res.lo, res.hi) == pytest.approx((ci.low, ci.high))
    assert res.p == pytest.approx(ref.pvalue)
    assert res.before == pytest.approx(before.mean()) and res.after == pytest.approx(after.mean())


def test_paired_drops_items_missing_a_value_and_checks_lengths():
    res = paired_difference([0.1, float("nan"), 0.3, 0.5], [0.2, 0.9, float("nan"), 0.7])
    assert res.n == 2 and res.diff == pytest.approx(0.15)
    with pytest.raises(ValueError, match="one value per item"):
        paired_difference([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="method"):
        paired_difference([0.1], [0.2], method="z")
    with pytest.raises(ValueError, match="0/1"):
        paired_difference([0.1, 0.2], [0.3, 0.4], method="mcnemar")


def test_paired_identical_values_give_zero_width():
    res = paired_difference([0.169, 0.2, 0.5], [0.169, 0.2, 0.5])
    assert res.diff == 0 and res.lo == 0 and res.hi == 0 and res.p == 1.0


def test_mcnemar_counts_and_exact_reference():
    before = [1] * 30 + [0] * 10 + [1] * 4 + [0] * 6
    after = [1] * 30 + [0] * 10 + [0] * 4 + [1] * 6    # 4 good -> bad, 6 bad -> good
    res = paired_difference(before, after)
    assert res.method.startswith("McNemar") and res.good_to_bad == 4 and res.bad_to_good == 6
    assert res.diff == pytest.approx((6 - 4) / 50)
    assert res.lo < res.diff < res.hi
    exact = st.binomtest(4, 10, 0.5).pvalue
    assert res.p == pytest.approx(exact - st.binom.pmf(4, 10, 0.5))
    assert (res.after_lo, res.after_hi) == wilson(36, 50)
    assert mcnemar_midp(0, 0) == 1.0
    with pytest.raises(ValueError, match="non-negative integer"):
        mcnemar_midp(-1, 2)


def test_newcombe_no_discordance_contains_zero_and_bounds():
    lo, hi = newcombe_paired(20, 0, 0, 5)
    assert lo < 0 < hi and -1 <= lo and hi <= 1
    lo, hi = newcombe_paired(0, 30, 0, 0)          # every item flips good -> bad
    assert hi < 0 and lo >= -1


def test_newcombe_coverage_by_simulation():
    """Slow reference: the interval covers the true paired difference in ~95 % of samples."""
    rng = np.random.default_rng(0)
    probs = np.array([0.55, 0.1, 0.2, 0.15])       # n11, n10, n01, n00
    true = probs[0] + probs[2] - (probs[0] + probs[1])
    hits = 0
    reps = 1500
    for counts in rng.multinomial(60, probs, size=reps):
        lo, hi = newcombe_paired(*counts)
        hits += lo <= true <= hi
    assert 0.92 <= hits / reps <= 0.99


def test_welch_matches_scipy():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.6, 0.2, 12), rng.normal(0.1, 0.05, 30)
    res = welch_difference(a, b)
    ref = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (res["lo"], res["hi"]) == pytest.approx((ref.low, ref.high))
    assert res["diff"] == pytest.approx(a.mean() - b.mean()) and res["method"] == "Welch t"
    short = welch_difference([1.0], [0.0, 1.0])
    assert math.isnan(short["lo"]) and short["n_a"] == 1


def test_aie_peak_t_over_items_and_relative():
    rng = np.random.default_rng(3)
    eff = rng.normal(0.0, 0.02, (40, 6))
    eff[:, 2] += 0.08
    res = aie_peak(eff)
    ci = st.ttest_1samp(eff[:, 2], 0).confidence_interval(0.95)
    assert res["layer"] == 2 and res["n"] == 40 and res["method"] == "t over items"
    assert (res["lo"], res["hi"]) == pytest.approx((ci.low, ci.high))
    # not the old 1.96 * population std / sqrt(n)
    assert res["hi"] - res["aie"] > 1.96 * eff[:, 2].std() / math.sqrt(40)
    # a constant total effect: the relative interval is the absolute one scaled
    rel = aie_peak(eff, np.full(40, 0.2))
    assert rel["relative"] == pytest.approx(res["aie"] / 0.2)
    assert (rel["rel_lo"], rel["rel_hi"]) == pytest.approx((res["lo"] / 0.2, res["hi"] / 0.2))
    # varying total effects: slow reference by the delta method written out
    te = rng.uniform(0.1, 0.3, 40)
    rel = aie_peak(eff, te)
    r = eff[:, 2].mean() / te.mean()
    d = (eff[:, 2] - r * te) / te.mean()
    half = st.t.ppf(0.975, 39) * d.std(ddof=1) / math.sqrt(40)
    assert (rel["rel_lo"], rel["rel_hi"]) == pytest.approx((r - half, r + half))
    with pytest.raises(ValueError, match="n_items, n_layers"):
        aie_peak(np.zeros(5))
    with pytest.raises(ValueError, match="one finite value per item"):
        aie_peak(eff, te[:3])


def test_paired_t_on_fractions_is_clipped_to_possible_differences():
    before = [0.0] * 20 + [1.0, 0.0]
    after = [1.0] * 20 + [1.0, 0.1]
    res = paired_difference(before, after)
    assert res.method == "paired t over items, clipped" and res.hi == 1.0
    free = paired_difference(before, after, bounds=None)
    assert free.method == "paired t over items" and free.hi > 1.0 and free.lo == res.lo
