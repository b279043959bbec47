"""The plain loops the batched paths (:mod:`kn_utils.engine`) are checked and timed against.

Written as the methods are described, with none of the engine's shortcuts: full sequences, full
logits, one layer (IG) or one cell (tracing) per forward.  The tests compare every fast path with
these and the benchmarks time both; keep them obvious rather than fast.

    reference_ig(lm, "The capital of France is", "Paris", steps=4)      # [n_layers, n_neurons]
    reference_trace(lm, prompt, subject, kind="mlp", samples=3, noise=0.3, window=10).scores
"""
from __future__ import annotations

import numpy as np
import torch

from .attribution import ig_alphas
from .hooks import grad_ready, modify, record
from .targets import prepare, read_position
from .tracing import TraceResult, _resolve_noise, subject_span

__all__ = ["reference_ig", "reference_ig_query", "reference_trace"]


def reference_ig_query(lm, input_ids, position: int, target_id: int, *, steps: int = 20,
                       points: str = "linspace", layers=None, site: str = "neurons") -> torch.Tensor:
    """IG map [n_layers, width] (float32, CPU) of one query: for each layer, ``steps`` rows of the
    whole sequence with that layer's activation at ``position`` scaled, full logits, one backward.
    Layers not in ``layers`` (None: all) are 0."""
    model, dev = lm.model, lm.device
    ids = torch.as_tensor([list(input_ids)], device=dev)
    alphas = ig_alphas(steps, points).to(dev, lm.dtype)
    with grad_ready(model):
        with torch.no_grad(), record(lm, site) as rec:
            model(input_ids=ids)
        out = torch.zeros(lm.arch.n_layers, rec[0].shape[-1])
        for layer in range(lm.arch.n_layers) if layers is None else layers:
            act = rec[layer][0, position]
            x = (alphas[:, None] * act).requires_grad_(True)

            def write(value):
                value = value.clone()
                value[:, position] = x
                return value
            with modify(lm, site, {layer: write}):
                logits = model(input_ids=ids.expand(steps, -1)).logits[:, position]
            prob = logits.float().softmax(-1)[:, target_id].sum()
            (grad,) = torch.autograd.grad(prob, x)
            out[layer] = (act.float() * grad.float().sum(0) / steps).cpu()
    return out


def reference_ig(lm, prompt: str, target: str, *, steps: int = 20, points: str = "linspace",
                 layers=None, site: str = "neurons") -> torch.Tensor:
    """:func:`reference_ig_query` averaged over the target's teacher-forced tokens (what
    :func:`kn_utils.integrated_gradients` returns)."""
    spec = prepare(lm, prompt, target)
    return torch.stack([reference_ig_query(lm, q.input_ids, q.position, q.target_id, steps=steps,
                                           points=points, layers=layers, site=site)
                        for q in spec.queries]).mean(0)


def reference_trace(lm, prompt: str, subject: str, *, kind: str = "hidden", samples: int = 10,
                    noise=0.1, window: int = 10, target: str | None = None):
    """ROME's tracing loop: for each (token, layer) cell one forward of the ``samples`` corrupted
    rows with the cell's states written back, full logits.  Returns a
    :class:`kn_utils.tracing.TraceResult` (scores, low_score, high_score, ...)."""
    ids, (b, e) = subject_span(lm, prompt, subject)
    n_tok, n_layers = len(ids), lm.arch.n_layers
    read = read_position(lm, ids)
    level = _resolve_noise(lm, noise, [subject])
    # ROME's draw, written out here rather than shared with the fast path
    delta = torch.from_numpy(np.random.RandomState(1).randn(samples, e - b, lm.arch.d_model) * level)
    delta = delta.to(lm.device, lm.dtype)
    ids_t = torch.tensor([ids], device=lm.device)
    batch = ids_t.expand(samples, -1)

    def corrupt(value):
        value = value.clone()
        value[:, b:e] += delta
        return value

    with torch.no_grad():
        with record(lm, kind) as clean:
            probs = lm.model(ids_t).logits[0, read].float().softmax(-1)
        top = int(probs.argmax())
        answer = top if target is None else int(prepare(lm, prompt, target).target_ids[0])

        def score(states):
            def writer(token, layer):
                def fn(value):
                    value = value.clone()
                    value[:, token] = clean[layer][0, token]
                    return value
                return fn
            with modify(lm, "embed", {0: corrupt}), \
                    modify(lm, kind, {layer: writer(token, layer) for token, layer in states}):
                out = lm.model(batch).logits[:, read].float().softmax(-1)[:, answer]
            return float(out.mean())

        width = 1 if kind == "hidden" else window
        scores = torch.zeros(n_tok, n_layers)
        for t in range(n_tok):
            for layer in range(n_layers):
                restored = range(max(0, layer - width // 2), min(n_layers, layer - (-width // 2)))
                scores[t, layer] = score([(t, j) for j in restored])
        low = score([])
    tok = lm.tokenizer
    return TraceResult(
        scores=scores, low_score=low, high_score=float(probs[answer]),
        tokens=[tok.decode([i]) for i in ids], subject_range=(b, e), answer=tok.decode([answer]),
        answer_id=answer, kind=kind, window=width, prompt=prompt, subject=subject, noise=level,
        samples=samples, read_position=read, correct=top == answer)
