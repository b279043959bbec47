"""95 % intervals for the reproduction report: Wilson for proportions, t or bootstrap for means."""
from __future__ import annotations

import math

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


__all__ = ["wilson", "t_interval", "bootstrap_interval", "is_binary", "summarize"]
