"""Knowledge-neuron selection (Dai et al. 2022; Niu et al. 2024 §3) and localisation statistics.

    maps = attribution_maps(lm, prompts, "Paris")          # [n_prompts, n_layers, n_neurons]
    kn = find_knowledge_neurons(lm, prompts, "Paris")       # .neurons, .tau, .n_initial, .r2
    layer_distribution(kn.neurons, lm.arch.n_layers)

The attribution scores themselves (integrated gradients, batched over layers and steps) are
:mod:`kn_utils.ig`'s; they are imported here so ``kn_utils.attribution`` keeps offering the whole
attribution workflow under one name.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .checks import as_index, as_pair
from .ig import (IG_SITES, METHODS, POINTS, as_prompts, as_targets, attribution_maps, ig_alphas,  # noqa: F401
                 ig_query, integrated_gradients)
from .targets import prepare

__all__ = ["integrated_gradients", "attribution_maps", "r2_similarity", "coarse_neurons",
           "find_knowledge_neurons", "layer_distribution", "KNResult"]

COARSE_MODES = ("relative", "absolute", "percentile")


# ----------------------------------------------------------------------------------------------

def r2_similarity(maps) -> float:
    """n-sample similarity R²₁ = (σ₁² − 1)/(n − 1) of L2-normalised flattened maps.

    1 when all maps are parallel, 0 when mutually orthogonal; NaN for fewer than two maps.
    σ₁² is the top eigenvalue of the n×n Gram matrix (cheaper than an SVD of the n×D matrix).
    """
    m = torch.as_tensor(maps).detach().reshape(len(maps), -1).to(torch.float64).cpu()
    _check_finite(m, "attribution maps")
    n = m.shape[0]
    if n < 2:
        return float("nan")
    norms = m.norm(dim=1, keepdim=True)
    m = torch.where(norms > 0, m / norms.clamp_min(1e-300), torch.zeros_like(m))
    sigma1_sq = float(torch.linalg.eigvalsh(m @ m.T)[-1])
    return (sigma1_sq - 1.0) / (n - 1)


def _check_finite(maps: torch.Tensor, what: str) -> None:
    """NaN / inf scores would give R²₁ = -1 and empty neuron sets without a word: refuse them."""
    bad = ~torch.isfinite(maps)
    if bool(bad.any()):
        rows = bad.reshape(len(maps), -1).any(1) if maps.dim() > 1 else bad
        raise ValueError(f"{what} contain {int(bad.sum())} NaN / infinite values (in "
                         f"{int(rows.sum())} of {len(rows)} maps): recompute them (a 16-bit model "
                         f"can overflow; try dtype=float32)")


def _check_threshold(threshold, mode: str) -> None:
    if mode not in COARSE_MODES:
        raise ValueError(f"unknown mode={mode!r}; choose one of {COARSE_MODES}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)) \
            or not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if mode == "relative" and not 0 < threshold <= 1:
        raise ValueError(f"relative threshold must lie in (0, 1] (a fraction of the top score; "
                         f"Dai et al. use 0.2), got {threshold}")
    if mode == "percentile" and not 0 <= threshold <= 100:
        raise ValueError(f"percentile threshold must lie in [0, 100], got {threshold}")


def coarse_neurons(scores, *, threshold: float = 0.2, mode: str = "relative") -> list[tuple[int, int]]:
    """Neurons of one map [n_layers, n_neurons] with a high score, as sorted (layer, neuron) pairs.

    ``relative``: score > threshold · max score (Dai: 0.2); nothing when the max is not positive.
    ``absolute``: score > threshold.  ``percentile``: score > the ``threshold``-th percentile (0–100).
    """
    scores = torch.as_tensor(scores).detach().cpu()
    if scores.dim() != 2:
        raise ValueError(f"coarse_neurons needs one map [n_layers, n_neurons], got shape "
                         f"{tuple(scores.shape)}")
    _check_threshold(threshold, mode)
    s = scores.to(torch.float64)
    _check_finite(s[None], "scores")
    if mode == "relative":
        top = float(s.max())
        if not top > 0:
            return []
        cut = threshold * top
    elif mode == "absolute":
        cut = threshold
    else:
        cut = float(np.percentile(s.numpy(), threshold))
    return [(int(i), int(j)) for i, j in torch.nonzero(s > cut).tolist()]


@dataclass
class KNResult:
    """Knowledge neurons of a set of prompts (see :func:`find_knowledge_neurons`)."""

    neurons: list[tuple[int, int]]
    tau: float
    n_initial: int
    r2: float
    coarse: list[list[tuple[int, int]]]
    counts: Counter
    scores: torch.Tensor | None = None
    converged: bool = True
    message: str = ""
    n_prompts: int = 0
    negative: list[tuple[int, int]] = field(default_factory=list)
    history: list[tuple[float, int]] = field(default_factory=list)

    def __len__(self):
        return len(self.neurons)


TAU_MODES = ("strict", "paper")


def _refine(counts: Counter, n_prompts: int, tau: float, mode: str = "strict") -> set[tuple[int, int]]:
    if mode == "paper":
        # The paper code's test as it runs: its tau was stepped in floating point (see
        # find_knowledge_neurons), so 0.7 - 0.05 = 0.6499999... admits 13 of 20 prompts.
        return {nrn for nrn, c in counts.items() if c > n_prompts * tau}
    # "More than tau of the prompts"; the epsilon stops 0.65 * 20 = 12.999... from admitting 13/20.
    return {nrn for nrn, c in counts.items() if c > tau * n_prompts + 1e-9}


def _maps_for(lm, prompts, targets, maps, steps, progress, what):
    if maps is None:
        maps = attribution_maps(lm, prompts, targets, steps=steps, progress=progress)
        _check_finite(maps, f"computed {what}")
        return maps
    maps = torch.as_tensor(maps).detach().float().cpu()
    want = (len(prompts), lm.arch.n_layers, lm.arch.n_neurons)
    if tuple(maps.shape) != want:
        raise ValueError(f"{what} has shape {tuple(maps.shape)}, expected {want} "
                         f"(n_prompts, n_layers, n_neurons)")
    _check_finite(maps, what)
    return maps


def find_knowledge_neurons(lm, prompts, target, *, threshold: float = 0.2, mode: str = "relative",
                           tau: float = 0.7, adaptive: bool = True, min_neurons: int = 2,
                           max_neurons: int = 5, tau_step: float = 0.05, max_iter: int = 20,
                           negative_prompts=None, negative_targets=None, steps: int = 20,
                           maps=None, negative_maps=None, return_scores: bool = False,
                           progress: bool = True, tau_mode: str = "strict") -> KNResult:
    """Dai et al.'s knowledge neurons of ``prompts`` (all expressing one fact / one syntactic pattern).

    Coarse neurons per prompt (:func:`coarse_neurons` with ``threshold``/``mode``); a neuron is kept
    if coarse in MORE than ``tau`` of the prompts.  ``adaptive``: starting at ``tau``, raise it by
    ``tau_step`` while more than ``max_neurons`` remain and lower it while fewer than ``min_neurons``
    remain, at most ``max_iter`` moves; if no tau gives ``min..max`` neurons the result says so in
    ``.message`` (``.converged`` False) and holds the stricter (higher-tau) set of the last two,
    never the union of coarse neurons.  ``negative_prompts``: neurons that are also knowledge
    neurons (at the starting ``tau``) of these prompts are removed; ``negative_targets`` default to
    ``target`` when it is one string.  ``maps`` / ``negative_maps``: precomputed attribution maps.

    ``tau_mode``: ``"strict"`` (default) keeps a neuron coarse in more than ``tau`` of the prompts with
    ``tau`` exactly ``start + k * tau_step``; ``"paper"`` reproduces the paper's code, which steps
    ``tau`` by repeated floating-point addition (``p -= 0.05``) and tests ``count > n * tau``: after a
    step down ``tau`` is a hair below the round value, so a neuron coarse in exactly ``tau * n``
    prompts is kept, and the reported ``.tau`` / ``.history`` are those floating-point values.  The two
    differ only where ``tau * n`` is an integer.
    """
    prompts = as_prompts(prompts)
    targets = as_targets(prompts, target)
    # NaN fails these comparisons too
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.number)) or not 0 < tau <= 1:
        raise ValueError(f"tau must lie in (0, 1] (the fraction of prompts a neuron must be coarse "
                         f"in), got {tau!r}")
    _check_threshold(threshold, mode)
    if not (isinstance(min_neurons, int) and isinstance(max_neurons, int) and 0 <= min_neurons <= max_neurons):
        raise ValueError(f"need 0 <= min_neurons <= max_neurons, got {min_neurons}, {max_neurons}")
    if tau_mode not in TAU_MODES:
        raise ValueError(f"tau_mode must be one of {', '.join(map(repr, TAU_MODES))}, got {tau_mode!r}")
    if not tau_step > 0 or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"tau_step must be > 0 and max_iter an integer >= 0, got {tau_step}, {max_iter}")
    neg_prompts = neg_targets = None
    if negative_prompts is not None:
        neg_prompts = as_prompts(negative_prompts, "negative prompts")
        if negative_targets is None:
            if not isinstance(target, str):
                raise ValueError("negative_targets is required when target is a list")
            negative_targets = target
        neg_targets = as_targets(neg_prompts, negative_targets, "negative targets")
    # Prepare each (prompt, target) once: bad inputs fail before the slow part, and the prepared
    # targets are passed down (``prepare`` returns a prepared target as it is).
    if maps is None:
        targets = [prepare(lm, p, t) for p, t in zip(prompts, targets)]
    if neg_prompts is not None and negative_maps is None:
        neg_targets = [prepare(lm, p, t) for p, t in zip(neg_prompts, neg_targets)]

    maps = _maps_for(lm, prompts, targets, maps, steps, progress, "maps")
    n = len(prompts)
    coarse = [coarse_neurons(m, threshold=threshold, mode=mode) for m in maps]
    counts = Counter(nrn for per_prompt in coarse for nrn in per_prompt)

    negative: set[tuple[int, int]] = set()
    if neg_prompts is not None:
        neg_maps = _maps_for(lm, neg_prompts, neg_targets, negative_maps, steps, progress,
                             "negative_maps")
        neg_counts = Counter(nrn for m in neg_maps
                             for nrn in coarse_neurons(m, threshold=threshold, mode=mode))
        negative = _refine(neg_counts, len(neg_prompts), tau, tau_mode)

    def refined(t):
        return _refine(counts, n, t, tau_mode) - negative

    n_initial = len(refined(tau))
    ok = lambda k: min_neurons <= k <= max_neurons  # noqa: E731
    # strict: tau_k is recomputed from the start value every time (no accumulated float drift);
    # paper: the drift is the point, tau_k = tau_(k-1) +- tau_step as the paper's code computes it.
    k, current = 0, refined(tau)
    history = [(round(tau, 10), len(current))]
    converged, message, t = ok(len(current)), "", tau
    if adaptive and not converged:
        direction = 1 if len(current) > max_neurons else -1
        for _ in range(max_iter):
            k += direction
            t_new = t + direction * tau_step if tau_mode == "paper" else round(tau + k * tau_step, 10)
            if not 0 <= t_new <= 1:
                message = (f"tau left [0, 1] before {min_neurons}-{max_neurons} neurons remained: "
                           f"tau={t} keeps {len(current)}")
                break
            new = refined(t_new)
            history.append((t_new, len(new)))
            if ok(len(new)):
                t, current, converged = t_new, new, True
                break
            new_direction = 1 if len(new) > max_neurons else -1
            if new_direction != direction:
                # Counts jumped over the 2-5 window: keep the stricter set of the two.
                lo_t, lo_set = (t_new, new) if t_new > t else (t, current)
                hi_t, hi_set = (t, current) if t_new > t else (t_new, new)
                message = (f"no tau gives {min_neurons}-{max_neurons} neurons: tau={hi_t} keeps "
                           f"{len(hi_set)}, tau={lo_t} keeps {len(lo_set)}; returning tau={lo_t}")
                t, current = lo_t, lo_set
                break
            t, current = t_new, new
        else:
            message = (f"{max_iter} tau steps did not reach {min_neurons}-{max_neurons} neurons: "
                       f"tau={t} keeps {len(current)}")
    elif not converged:
        message = (f"tau={tau} keeps {len(current)} neurons, outside {min_neurons}-{max_neurons} "
                   f"(adaptive=False)")
    return KNResult(neurons=sorted(current), tau=float(t), n_initial=n_initial,
                    r2=r2_similarity(maps), coarse=coarse, counts=counts,
                    scores=maps if return_scores else None, converged=converged, message=message,
                    n_prompts=n, negative=sorted(negative), history=history)


def layer_distribution(neurons, n_layers: int) -> pd.Series:
    """Number of neurons per layer, a Series indexed 0..n_layers-1 (for the paper's Fig 5b)."""
    counts = np.zeros(n_layers, dtype=int)
    for item in neurons:
        layer, _ = as_pair(item, "a neuron", "layer", "neuron")
        counts[as_index(layer, "layer", n_layers)] += 1
    return pd.Series(counts, index=pd.RangeIndex(n_layers, name="layer"), name="neurons")
