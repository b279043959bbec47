"""95 % intervals for the reproduction report: Wilson for proportions, t or bootstrap for means,
paired before -> after differences (t over items; McNemar with Newcombe's Wilson-based interval for
0/1 values), Welch differences of two groups, and the causal-tracing peak (t over items).

Every interval here is over *items* (facts, pairs, prompts): one value per item, never per token.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _st


def _values(values) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    return x


def wilson(successes, n, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (fractions in [0, 1])."""
    if isinstance(n, bool) or not float(n).is_integer() or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes!r}")
    if n == 0:
        return float("nan"), float("nan")
    z = _st.norm.ppf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def t_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of ``values`` (NaNs dropped; NaN bounds for fewer than 2)."""
    x = _values(values)
    if len(x) < 2:
        return float("nan"), float("nan")
    mean, sem = x.mean(), x.std(ddof=1) / math.sqrt(len(x))
    half = _st.t.ppf(0.5 + confidence / 2, len(x) - 1) * sem
    return float(mean - half), float(mean + half)


def bootstrap_interval(values, confidence: float = 0.95, n_boot: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (a fixed seed: the report is reproducible)."""
    x = _values(values)
    if len(x) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def is_binary(values) -> bool:
    x = _values(values)
    return len(x) > 0 and bool(np.isin(x, (0.0, 1.0)).all())


def summarize(values, confidence: float = 0.95, bounds: tuple[float, float] | None = None) -> dict:
    """mean, 95 % interval and n of ``values``: Wilson when every value is 0 or 1 (a proportion),
    else the t interval of the mean.  ``method`` names which.  ``bounds``: the range the quantity
    lives in (e.g. (0, 1) for a mean of per-item fractions); a t interval reaching past it is cut
    there (``method`` "t, clipped"), since no mean can lie outside."""
    x = _values(values)
    if is_binary(x):
        lo, hi = wilson(int(x.sum()), len(x), confidence)
        method = "wilson"
    else:
        lo, hi = t_interval(x, confidence)
        method = "t"
        if bounds is not None and (lo < bounds[0] or hi > bounds[1]):
            lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
            method = "t, clipped"
    return {"mean": float(x.mean()) if len(x) else float("nan"), "lo": lo, "hi": hi, "n": int(len(x)),
            "method": method}


# --------------------------------------------------------------------------------------------------
# paired before -> after
# --------------------------------------------------------------------------------------------------
@dataclass
class Paired:
    """A paired before -> after difference over ``n`` items: ``diff`` = mean(after - before) with its
    interval ``[lo, hi]``.  ``method`` names the interval.  For 0/1 values also ``good_to_bad`` (1 -> 0
    items), ``bad_to_good`` (0 -> 1 items), McNemar's mid-p ``p`` and Wilson intervals of ``before`` /
    ``after``; for continuous values ``p`` is the paired t test's."""

    before: float
    after: float
    diff: float
    lo: float
    hi: float
    n: int
    method: str
    p: float = float("nan")
    before_lo: float = float("nan")
    before_hi: float = float("nan")
    after_lo: float = float("nan")
    after_hi: float = float("nan")
    good_to_bad: int | None = None
    bad_to_good: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _pairs(before, after) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(before, dtype=float).ravel()
    a = np.asarray(after, dtype=float).ravel()
    if b.shape != a.shape:
        raise ValueError(f"before and after must hold one value per item each: {len(b)} vs {len(a)}")
    keep = ~(np.isnan(b) | np.isnan(a))     # an item counts only with both of its values
    return b[keep], a[keep]


def mcnemar_midp(good_to_bad: int, bad_to_good: int) -> float:
    """Two-sided mid-p McNemar test: the exact binomial test on the discordant items (p = 1/2) minus
    half the probability of the observed split (Fagerland et al. 2013: close to nominal size, less
    conservative than the exact test, no continuity correction)."""
    for name, v in (("good_to_bad", good_to_bad), ("bad_to_good", bad_to_good)):
        if isinstance(v, bool) or not float(v).is_integer() or v < 0:
            raise ValueError(f"{name} must be a non-negative integer count, got {v!r}")
    m, k = int(good_to_bad + bad_to_good), int(min(good_to_bad, bad_to_good))
    if m == 0:
        return 1.0
    exact = min(1.0, 2 * _st.binom.cdf(k, m, 0.5))
    return float(min(1.0, exact - _st.binom.pmf(k, m, 0.5)))


def newcombe_paired(n11: int, n10: int, n01: int, n00: int,
                    confidence: float = 0.95) -> tuple[float, float]:
    """Interval of p_after - p_before for paired 0/1 values (Newcombe 1998, method 10: Wilson
    intervals of both margins combined with the phi correlation).  n11: 1 before and after; n10:
    1 before, 0 after (good -> bad); n01: 0 -> 1; n00: 0 both times."""
    n = n11 + n10 + n01 + n00
    if n == 0:
        return float("nan"), float("nan")
    p1, p2 = (n11 + n10) / n, (n11 + n01) / n
    l1, u1 = wilson(n11 + n10, n, confidence)
    l2, u2 = wilson(n11 + n01, n, confidence)
    den = (n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00)
    phi = (n11 * n00 - n10 * n01) / math.sqrt(den) if den > 0 else 0.0
    diff = p2 - p1
    lower = math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    upper = math.sqrt(max(0.0, (u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2))
    return max(-1.0, diff - lower), min(1.0, diff + upper)


def paired_difference(before, after, confidence: float = 0.95, method: str = "auto",
                      bounds: tuple[float, float] | None = (0.0, 1.0)) -> Paired:
    """Paired before -> after difference over items (``before[i]``, ``after[i]``: item i's values;
    items missing either are dropped).

    ``method``: "auto" (McNemar when every value is 0 or 1, else t), "mcnemar" or "t".
    * "t": Student t interval of the mean per-item difference (after - before), df = n - 1.
    * "mcnemar": 0/1 values; interval of the difference of the paired proportions by Newcombe's
      method 10 (Wilson-based), test by McNemar's mid-p; counts of good -> bad and bad -> good flips.
    ``bounds``: the range the values live in (default (0, 1): per-item fractions); a t interval
    reaching past the possible differences (+-(high - low)) is cut there (method "..., clipped").
    None for unbounded values (log-probabilities).
    """
    if method not in ("auto", "t", "mcnemar"):
        raise ValueError(f"method must be 'auto', 't' or 'mcnemar', got {method!r}")
    b, a = _pairs(before, after)
    n = len(b)
    binary = n > 0 and is_binary(b) and is_binary(a)
    if method == "mcnemar" and n and not binary:
        raise ValueError("method='mcnemar' needs 0/1 values (e.g. per-item correct / incorrect)")
    if method == "mcnemar" or (method == "auto" and binary):
        n10 = int(((b == 1) & (a == 0)).sum())
        n01 = int(((b == 0) & (a == 1)).sum())
        n11 = int(((b == 1) & (a == 1)).sum())
        lo, hi = newcombe_paired(n11, n10, n01, n - n11 - n10 - n01, confidence)
        bl, bh = wilson(int(b.sum()), n, confidence)
        al, ah = wilson(int(a.sum()), n, confidence)
        nan = float("nan")
        return Paired(float(b.mean()) if n else nan, float(a.mean()) if n else nan,
                      (n01 - n10) / n if n else nan, lo, hi, n,
                      "McNemar mid-p; Newcombe (Wilson) paired interval", mcnemar_midp(n10, n01),
                      bl, bh, al, ah, n10, n01)
    d = a - b
    lo, hi = t_interval(d, confidence)
    p = float("nan")
    if n >= 2:
        if d.std(ddof=1) > 0:
            p = float(_st.ttest_1samp(d, 0.0).pvalue)
        else:   # every item moved by the same amount: no spread, the interval is the point
            p = 1.0 if d.mean() == 0 else 0.0
    nan = float("nan")
    blo, bhi = t_interval(b, confidence)
    alo, ahi = t_interval(a, confidence)
    how = "paired t over items"
    if bounds is not None and n >= 2:
        span = bounds[1] - bounds[0]
        if lo < -span or hi > span:
            lo, hi, how = max(lo, -span), min(hi, span), how + ", clipped"
        blo, bhi, alo, ahi = (min(max(v, bounds[0]), bounds[1]) for v in (blo, bhi, alo, ahi))
    return Paired(float(b.mean()) if n else nan, float(a.mean()) if n else nan,
                  float(d.mean()) if n else nan, lo, hi, n, how, p, blo, bhi, alo, ahi)


def welch_difference(a, b, confidence: float = 0.95) -> dict:
    """mean(a) - mean(b) of two independent groups with its Welch t interval (Welch-Satterthwaite
    degrees of freedom; no equal-variance assumption): dict mean_a, mean_b, diff, lo, hi, n_a, n_b,
    df, method."""
    x, y = _values(a), _values(b)
    out = {"mean_a": float(x.mean()) if len(x) else float("nan"),
           "mean_b": float(y.mean()) if len(y) else float("nan"), "n_a": len(x), "n_b": len(y),
           "method": "Welch t"}
    out["diff"] = out["mean_a"] - out["mean_b"]
    if len(x) < 2 or len(y) < 2:
        return {**out, "lo": float("nan"), "hi": float("nan"), "df": float("nan")}
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(va + vb)
    if se == 0:
        return {**out, "lo": out["diff"], "hi": out["diff"], "df": float("inf")}
    df = (va + vb) ** 2 / (va ** 2 / (len(x) - 1) + vb ** 2 / (len(y) - 1))
    half = _st.t.ppf(0.5 + confidence / 2, df) * se
    return {**out, "lo": out["diff"] - half, "hi": out["diff"] + half, "df": float(df)}


# --------------------------------------------------------------------------------------------------
# causal tracing: the peak of the average indirect effect
# --------------------------------------------------------------------------------------------------
def aie_peak(effects, total_effects=None, confidence: float = 0.95) -> dict:
    """The layer where the mean indirect effect peaks, with a t interval over *items*.

    ``effects``: array [n_items, n_layers], one row per item (an item with several tokens in the
    class: average them first, so each item counts once).  ``total_effects``: [n_items], each item's
    total effect (clean - corrupted score); given, ``relative`` = mean AIE at the peak / mean total
    effect with a delta-method t interval (the per-item residuals aie_i - R * te_i; no assumption that
    the total effect is fixed).  Returns dict layer, aie, lo, hi, n, method, and relative, rel_lo,
    rel_hi (NaN without total effects).
    """
    e = np.asarray(effects, dtype=float)
    if e.ndim != 2 or e.shape[0] == 0 or e.shape[1] == 0:
        raise ValueError(f"effects must be a non-empty [n_items, n_layers] array, got shape {e.shape}")
    if np.isnan(e).any():
        raise ValueError("effects hold NaN: drop or average the item's tokens before aie_peak")
    means = e.mean(0)
    layer = int(np.argmax(means))
    lo, hi = t_interval(e[:, layer], confidence)
    out = {"layer": layer, "aie": float(means[layer]), "lo": lo, "hi": hi, "n": int(e.shape[0]),
           "method": "t over items", "relative": float("nan"), "rel_lo": float("nan"),
           "rel_hi": float("nan")}
    if total_effects is not None:
        te = np.asarray(total_effects, dtype=float).ravel()
        if te.shape[0] != e.shape[0] or np.isnan(te).any():
            raise ValueError(f"total_effects needs one finite value per item ({e.shape[0]}), got {te.shape}")
        mean_te = te.mean()
        if mean_te != 0:
            ratio = means[layer] / mean_te
            resid = (e[:, layer] - ratio * te) / mean_te
            rlo, rhi = t_interval(resid, confidence)
            out.update(relative=float(ratio), rel_lo=float(ratio + rlo), rel_hi=float(ratio + rhi))
    return out


__all__ = ["wilson", "t_interval", "bootstrap_interval", "is_binary", "summarize", "Paired",
           "paired_difference", "mcnemar_midp", "newcombe_paired", "welch_difference", "aie_peak"]
