"""Knowledge-neuron attribution (Dai et al. 2022; Niu et al. 2024 §3) and localisation statistics.

    maps = attribution_maps(lm, prompts, "Paris")          # [n_prompts, n_layers, n_neurons]
    kn = find_knowledge_neurons(lm, prompts, "Paris")       # .neurons, .tau, .n_initial, .r2
    layer_distribution(kn.neurons, lm.arch.n_layers)

Integrated gradients, zero baseline, of the *probability* of the target token with respect to the
neurons of one layer at the read position:  attr_i = w_i * mean_k dP(alpha_k * w)/dw_i, where only
that layer's activation at the read position is scaled (Dai's "position-only" scaling).

Speed (DESIGN.md): every (layer, step) pair is one row of a batch.  A hook on each layer's neuron
site writes ``alpha * act`` into the rows that belong to that layer and passes the other rows
through, so one forward + one backward of the summed row probabilities gives every row its own
gradient.  Causal LMs reuse the clean prefix: scaling at the read position cannot change earlier
positions, so the prefix runs once with a KV cache and the batch recomputes only the read token.
Logits are computed only at the read position.  The batching mechanics (rows joining at their
layer, the widened prefix cache, the narrowed logits) are :mod:`kn_utils.engine`'s; the plain loop
this is tested against is :func:`kn_utils.reference.reference_ig`.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .checks import as_index, as_pair
from . import engine
from .hooks import grad_ready, record
from .targets import prepare

__all__ = ["integrated_gradients", "attribution_maps", "r2_similarity", "coarse_neurons",
           "find_knowledge_neurons", "layer_distribution", "KNResult"]

POINTS = ("linspace", "left")
METHODS = ("ig", "activation")
IG_SITES = ("neurons", "pre_act")
COARSE_MODES = ("relative", "absolute", "percentile")


# ----------------------------------------------------------------------------------------------
# integrated gradients
# ----------------------------------------------------------------------------------------------

def ig_alphas(steps: int, points: str) -> torch.Tensor:
    """The scaling factors of the Riemann sum (float64, CPU)."""
    if points == "linspace":
        return torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    return torch.arange(steps, dtype=torch.float64) / steps


def _check_ig_args(lm, steps, points, method, layers, batch_size, site="neurons") -> list[int]:
    if site not in IG_SITES:
        raise ValueError(f"unknown site={site!r}; choose one of {IG_SITES}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if points not in POINTS:
        raise ValueError(f"unknown points={points!r}; choose one of {POINTS}")
    if method not in METHODS:
        raise ValueError(f"unknown method={method!r}; choose one of {METHODS}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if layers is None:
        return list(range(lm.arch.n_layers))
    layers = lm.arch.check_layers(layers)
    if not layers:
        raise ValueError("layers is empty: pass None (all layers) or a list of layer indices")
    return sorted(set(layers))


def _use_cache(lm, cache) -> bool:
    if cache not in (True, False, "auto"):
        raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
    return (not lm.arch.is_masked_lm) and cache in (True, "auto")


def _query_ig(lm, input_ids, position, target_id, layers, alphas, method, batch_size, use_cache,
              pbar=None, site="neurons") -> torch.Tensor:
    """Attribution map [n_layers, n_neurons] (float32) of one teacher-forced query."""
    dev, n_layers = lm.device, lm.arch.n_layers
    ids = torch.as_tensor([list(input_ids)], dtype=torch.long, device=dev)
    past = None
    if use_cache:
        # Scaling at the read position changes nothing before it: cache the clean prefix once.
        if position > 0:
            past = engine.prefix_cache(lm, ids[:, :position])
        seq, read = ids[:, position:position + 1], 0
    else:
        seq, read = ids[:, :], position

    def fresh_past(rows):
        """A copy of the prefix cache with ``rows[l]`` rows in layer l."""
        return None if past is None else engine.widen_cache(copy.deepcopy(past), rows, 1, dev)

    # Joining late needs one cache layer per block; otherwise every block runs on all rows.
    late = past is None or engine.layered_cache(past, n_layers)

    with torch.no_grad(), record(lm, site, layers) as rec:
        engine.forward(lm, seq, read, past=fresh_past([1] * n_layers))
    acts = torch.stack([rec[layer][0, read] for layer in layers])  # [n_sel, W], model dtype
    width = acts.shape[-1]  # n_neurons; the pre_act site of some gated MLPs is wider
    out = torch.zeros(n_layers, width, dtype=torch.float32)
    if method == "activation":
        out[layers] = acts.float().cpu()
        return out

    steps = len(alphas)
    n_rows = len(layers) * steps
    row_layer = torch.arange(len(layers), device=dev).repeat_interleave(steps)  # index into `layers`
    row_alpha = alphas.to(dev).repeat(len(layers))
    # Rows join the forward at their own layer, so a chunk costs only its rows' own spans of
    # blocks: chunks are as large as the memory budget allows (fewer, fuller launches on a GPU).
    chunk = batch_size or engine.default_rows(lm, engine.row_bytes(lm, seq.shape[1], saved=True),
                                              1 << 30)
    grad_sum = torch.zeros(len(layers), width, dtype=torch.float32, device=dev)
    for start in range(0, n_rows, chunk):
        sel = slice(start, min(start + chunk, n_rows))
        r_layer, r_alpha = row_layer[sel], row_alpha[sel]  # sorted by layer
        b = r_layer.shape[0]
        x = (r_alpha[:, None].to(acts.dtype) * acts[r_layer]).detach().requires_grad_(True)
        counts = torch.bincount(r_layer, minlength=len(layers)).tolist()
        # Batch rows: the clean carrier first when joining late, then the chunk's rows in order;
        # the rows of one layer are contiguous, and when joining late they are the newest rows.
        carrier = 1 if late else 0
        fns, offset = {}, 0
        for j, c in enumerate(counts):
            if not c:
                continue
            lo, hi = carrier + offset, carrier + offset + c

            def write(value, lo=lo, hi=hi, xj=x[offset:offset + c]):
                part = value[lo:hi].clone()
                part[:, read] = xj.to(value.dtype)
                return torch.cat([value[:lo], part, value[hi:]])
            fns[layers[j]] = write
            offset += c
        with torch.enable_grad():
            if late:
                copies = [0] * n_layers
                for j, c in enumerate(counts):
                    copies[layers[j]] = c
                plan = engine.Widening(1, copies)
                logits = engine.forward(lm, seq, read, past=fresh_past(plan.rows_in), widening=plan,
                                        site=site, writers=fns)[1:]
            else:
                logits = engine.forward(lm, seq.expand(b, -1), read, past=fresh_past([b] * n_layers),
                                        site=site, writers=fns)
            prob = logits.float().softmax(-1)[:, target_id]
            (grad,) = torch.autograd.grad(prob.sum(), x, allow_unused=True)
        if grad is not None:
            grad_sum.index_add_(0, r_layer, grad.float())
        if pbar is not None:
            pbar.update(b)
    out[layers] = (acts.float() * grad_sum / steps).cpu()
    return out


def integrated_gradients(lm, prompt: str, target: str, *, steps: int = 20, points: str = "linspace",
                         method: str = "ig", layers=None, batch_size: int | None = None,
                         cache="auto", site: str = "neurons", progress: bool = False) -> torch.Tensor:
    """Attribution of every neuron to P(target | prompt): tensor [n_layers, n_neurons], float32, CPU.

    ``points="linspace"`` (the paper's code): alphas = linspace(0, 1, steps); ``"left"`` (Dai et al.):
    alphas = k / steps, k = 0..steps-1; both return act * sum(gradients) / steps.
    ``method="activation"``: the baseline, the activations at the read position.
    Multi-token targets: one map per teacher-forced token, averaged.  ``layers``: attribute only
    these layers (the others are 0).  ``batch_size``: rows (layer, step pairs) per forward; default
    chosen from a memory budget.  ``cache``: reuse the clean prefix's KV cache (causal LMs).
    ``site="pre_act"``: the paper's original code's site (MLP input projection output, before the
    nonlinearity), for comparison only; the default is the knowledge-neuron site (REFERENCE §1).
    """
    layers = _check_ig_args(lm, steps, points, method, layers, batch_size, site)
    use_cache = _use_cache(lm, cache)
    spec = prepare(lm, prompt, target)
    alphas = ig_alphas(steps, points).to(torch.float32)
    total = len(spec.queries) * len(layers) * steps if method == "ig" else 0
    pbar = tqdm(total=total, desc="IG rows", leave=False) if progress and total else None
    try:
        with grad_ready(lm.model):
            maps = [_query_ig(lm, q.input_ids, q.position, q.target_id, layers, alphas, method,
                              batch_size, use_cache, pbar, site) for q in spec.queries]
    finally:
        if pbar is not None:
            pbar.close()
    return torch.stack(maps).mean(0)


def ig_query(lm, input_ids, position: int, target_id: int, *, steps: int = 20,
             points: str = "linspace", method: str = "ig", layers=None, batch_size: int | None = None,
             cache="auto", site: str = "neurons") -> torch.Tensor:
    """IG map [n_layers, n_neurons] for raw token ids read at ``position`` (no tokenizer needed).

    The building block of :func:`integrated_gradients` (used by benchmarks on random-token inputs).
    """
    layers = _check_ig_args(lm, steps, points, method, layers, batch_size, site)
    ids = list(input_ids)
    position = as_index(position, "position", len(ids),
                        range_text=f"the input has token positions 0..{len(ids) - 1}")
    target_id = as_index(target_id, "target_id")
    alphas = ig_alphas(steps, points).to(torch.float32)
    with grad_ready(lm.model):
        return _query_ig(lm, ids, position, int(target_id), layers, alphas, method, batch_size,
                         _use_cache(lm, cache), site=site)


def _as_targets(prompts, targets, what="targets") -> list[str]:
    if isinstance(targets, str):
        return [targets] * len(prompts)
    targets = list(targets)
    if len(targets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} {what}: pass one string for all "
                         f"prompts or one per prompt")
    return targets


def _as_prompts(prompts, what="prompts") -> list[str]:
    if isinstance(prompts, str):
        raise ValueError(f"{what} must be a list of strings, got a single string {prompts!r}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"no {what}: pass a non-empty list")
    return prompts


def attribution_maps(lm, prompts, targets, *, progress: bool = True, **ig_kwargs) -> torch.Tensor:
    """One attribution map per prompt: tensor [n_prompts, n_layers, n_neurons] (float32, CPU).

    ``targets``: one string for every prompt, or a list with one per prompt.  Keyword arguments go
    to :func:`integrated_gradients`.  Inputs are all validated before the first (slow) map.
    """
    prompts = _as_prompts(prompts)
    targets = _as_targets(prompts, targets)
    _check_ig_args(lm, ig_kwargs.get("steps", 20), ig_kwargs.get("points", "linspace"),
                   ig_kwargs.get("method", "ig"), ig_kwargs.get("layers"), ig_kwargs.get("batch_size"),
                   ig_kwargs.get("site", "neurons"))
    for p, t in zip(prompts, targets):
        prepare(lm, p, t)
    out = [integrated_gradients(lm, p, t, **ig_kwargs)
           for p, t in tqdm(list(zip(prompts, targets)), desc="attribution", disable=not progress)]
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------
# localisation statistics and knowledge-neuron selection
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
    prompts = _as_prompts(prompts)
    targets = _as_targets(prompts, target)
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
        neg_prompts = _as_prompts(negative_prompts, "negative prompts")
        if negative_targets is None:
            if not isinstance(target, str):
                raise ValueError("negative_targets is required when target is a list")
            negative_targets = target
        neg_targets = _as_targets(neg_prompts, negative_targets, "negative targets")
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
