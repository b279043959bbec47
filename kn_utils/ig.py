"""Integrated-gradient attribution of MLP neurons (Dai et al. 2022; Niu et al. 2024 §3).

    scores = integrated_gradients(lm, "The capital of France is", "Paris")   # [n_layers, n_neurons]
    maps = attribution_maps(lm, prompts, "Paris")          # [n_prompts, n_layers, n_neurons]

Knowledge-neuron selection on these maps is :mod:`kn_utils.attribution`'s.

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

import torch
from tqdm.auto import tqdm

from .checks import as_index
from . import engine
from .hooks import grad_ready, record
from .targets import prepare

__all__ = ["integrated_gradients", "ig_query", "ig_alphas", "attribution_maps"]

POINTS = ("linspace", "left")
METHODS = ("ig", "activation")
IG_SITES = ("neurons", "pre_act")


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


def as_targets(prompts, targets, what="targets") -> list[str]:
    if isinstance(targets, str):
        return [targets] * len(prompts)
    targets = list(targets)
    if len(targets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} {what}: pass one string for all "
                         f"prompts or one per prompt")
    return targets


def as_prompts(prompts, what="prompts") -> list[str]:
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
    prompts = as_prompts(prompts)
    targets = as_targets(prompts, targets)
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
