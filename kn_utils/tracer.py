"""The runs a causal trace is made of, shared by every kind traced on one fact.

:class:`Fact` holds one prompt's clean run (recorded at every site asked for, in one forward), the
noise and the corrupted prefixes' KV caches; :class:`Tracer` scores cells of one kind ("hidden",
"mlp", "attn") on it through :mod:`kn_utils.engine`, and :func:`score` runs the cells of several
tracers start by start, so a corrupted prefix is computed once per fact and first token, not once
per kind and chunk (each chunk widens a copy).  Every number is what a tracer alone computes:
the runs shared are the same forwards, and each kind's own forwards are unchanged.

Every batch row is one (noise sample, cell) pair.  The corrupted run is the carrier (one row per
noise sample); a cell's rows join at its lowest restored layer (:class:`engine.Widening`), and
one hook per restored layer writes the clean state into the rows of the cells restoring it.
"""
from __future__ import annotations

import copy
import math
from contextlib import ExitStack

import numpy as np
import torch

from . import engine
from .hooks import modify, record
from .targets import prepare, read_position, subject_span


# ----------------------------------------------------------------------------- noise

def noise_level(lm, subjects, factor: float = 3.0) -> float:
    """``factor`` x the std of the input embeddings of the subjects' tokens (ROME's "s3" for 3).

    Each subject is embedded on its own (no special tokens), all token vectors are pooled, and the
    std is taken over every element, as in ROME's ``collect_embedding_std``.  The vectors are the
    embedding *module's* output -- for Gemma after its multiplication by sqrt(d_model) -- which is
    exactly the value the corrupted run adds the noise to, so the level is on the same scale.
    """
    if isinstance(subjects, str):
        subjects = [subjects]
    subjects = [s for s in subjects if isinstance(s, str) and s.strip()]
    if not subjects:
        raise ValueError("noise_level needs at least one non-empty subject string")
    embed = lm.arch.embed
    vectors = []
    with torch.no_grad():
        for s in subjects:
            ids = lm.tokenizer(s, add_special_tokens=False)["input_ids"]
            if ids:
                vectors.append(embed(torch.as_tensor([ids], device=lm.device))[0].float())
    if not vectors:
        raise ValueError("the subjects tokenise to nothing")
    return float(factor * torch.cat(vectors).std())


def _noise_factor(noise: str) -> float:
    """k of a noise given as "s<k>" (k x the subjects' embedding std; "s" alone means 3)."""
    text = noise.strip().lower()
    try:
        if text.startswith("s"):
            return float(text[1:] or 3)
    except ValueError:
        pass
    raise ValueError(f"noise must be a number or 's<k>' (k x embedding std), got {noise!r}")


def _resolve_noise(lm, noise, subjects) -> float:
    if isinstance(noise, str):
        return noise_level(lm, subjects, factor=_noise_factor(noise))
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) \
            or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    return float(noise)


def draw_noise(samples: int, n_tokens: int, d_model: int, level: float) -> np.ndarray:
    """ROME's draw: ``RandomState(1).randn(samples, n_tokens, d_model) * level`` (float64)."""
    return np.random.RandomState(1).randn(samples, n_tokens, d_model) * level


def layer_window(layer: int, n_layers: int, window: int) -> range:
    """Layers restored for a window centred at ``layer`` (ROME: max(0, l - w//2) .. min(L, l + w - w//2) - 1)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


# ----------------------------------------------------------------------------- one fact, many kinds

class Fact:
    """One prompt's clean run, answer, noise and corrupted prefixes, for tracers of ``sites``."""

    def __init__(self, lm, prompt, subject, *, samples, noise, target, sites, prefix_cache, batch_size):
        self.lm, self.samples = lm, samples
        self.ids, self.span = subject_span(lm, prompt, subject)
        self.read = read_position(lm, self.ids)
        self.level = _resolve_noise(lm, noise, [subject])
        self.causal = not lm.arch.is_masked_lm
        self.prefix_cache = engine.use_prefix_cache(lm, prefix_cache)
        b, e = self.span
        self.noise = torch.from_numpy(draw_noise(samples, e - b, lm.arch.d_model, self.level)).to(
            lm.device, lm.dtype)
        self.ids_t = torch.as_tensor(self.ids, device=lm.device)
        with torch.no_grad(), ExitStack() as stack:   # hooks only read: one forward for all sites
            recorded = {site: stack.enter_context(record(lm, site)) for site in dict.fromkeys(sites)}
            logits = engine.forward(lm, self.ids_t[None], self.read)
        self.clean = {site: dict(values) for site, values in recorded.items()}  # {site: {layer: [1, P, W]}}
        probs = logits[0].float().softmax(-1)
        self.top_id = int(probs.argmax())
        self.answer_id = self.top_id if target is None else int(prepare(lm, prompt, target).target_ids[0])
        self.high = float(probs[self.answer_id])
        self.batch_size = batch_size or engine.default_rows(
            lm, engine.row_bytes(lm, len(self.ids), saved=False), 1 << 28, minimum=samples,
            maximum=8192)

    def corrupt(self, start):
        """Embedding hook adding the noise to the subject positions present in [start, ...)."""
        b, e = self.span
        lo = max(b, start)

        def fn(value):
            hi = min(e, start + value.shape[1])
            if lo >= hi:
                return None
            delta = torch.zeros_like(value)
            delta[:, lo - start:hi - start] = self.noise[:, lo - b:hi - b]
            return value + delta
        return fn

    @torch.no_grad()
    def prefix(self, start):
        """KV cache of the corrupted positions [0, start), one row per noise sample."""
        with modify(self.lm, "embed", {0: self.corrupt(0)}):
            return engine.prefix_cache(self.lm, self.ids_t[None, :start].expand(self.samples, -1))


class Tracer:
    """Scores cells of one site (a list of (token, layer) states restored together) on a :class:`Fact`."""

    def __init__(self, fact: Fact, site: str):
        self.fact, self.lm, self.site, self.samples = fact, fact.lm, site, fact.samples
        self.after = engine.joins_after_block(fact.lm, site)
        self.clean = fact.clean[site]

    def plan(self, cells):
        """({first token: cell indices}, trivial cell indices).  Causal LMs: a cell restoring only
        states before the subject scores the corrupted run (the noise never reached them), and a
        cell at token t shares the corrupted positions before t with every other such cell."""
        groups: dict[int, list[int]] = {}
        trivial = []
        for i, cell in enumerate(cells):
            if self.fact.causal and cell and max(t for t, _ in cell) < self.fact.span[0]:
                trivial.append(i)
                continue
            first = min((t for t, _ in cell), default=0)
            groups.setdefault(first if self.fact.prefix_cache else 0, []).append(i)
        return groups, trivial

    def run(self, cells, progress=None) -> torch.Tensor:
        return score([(self, cells)], progress)[0]

    @torch.no_grad()
    def run_chunk(self, cells, start, past=None) -> torch.Tensor:
        """Mean score of each cell, positions [start, end) in the batch, the rest as the KV cache
        ``past`` (this call's own copy: it is widened in place)."""
        fact, samples, n_layers, dev = self.fact, self.samples, self.lm.arch.n_layers, self.lm.device
        lows = [min((layer for _, layer in cell), default=0) for cell in cells]
        if past is not None and not engine.layered_cache(past, n_layers):
            lows = [0] * len(cells)  # one cache for all blocks: every cell joins at block 0
        order = sorted(range(len(cells)), key=lows.__getitem__)
        plan = engine.Widening(samples, torch.bincount(torch.as_tensor(lows, dtype=torch.long),
                                                       minlength=n_layers).tolist(), self.after)
        masks: dict[int, torch.Tensor] = {}
        for g, c in enumerate(order):
            for t, layer in cells[c]:
                if layer not in masks:
                    masks[layer] = torch.zeros(plan.rows_at[layer], len(fact.ids) - start, dtype=torch.bool)
                masks[layer][plan.group(g), t - start] = True
        fns = {layer: self._restorer(layer, mask.to(dev), start) for layer, mask in masks.items()}
        attention = None
        if past is not None:
            engine.widen_cache(past, plan.rows_in, samples, dev)
            attention = torch.ones(samples, len(fact.ids), dtype=torch.long, device=dev)
        with modify(self.lm, "embed", {0: fact.corrupt(start)}):
            logits = engine.forward(self.lm, fact.ids_t[None, start:].expand(samples, -1),
                                    fact.read - start, past=past, attention_mask=attention,
                                    widening=plan, site=self.site, writers=fns)
        means = logits.float().softmax(-1)[samples:, fact.answer_id].view(len(cells), samples).mean(1)
        out = torch.empty_like(means)
        out[torch.as_tensor(order, device=dev)] = means
        return out

    def _restorer(self, layer, mask, start):
        clean = self.clean[layer][:, start:]

        def fn(value):
            return torch.where(mask[..., None], clean.to(value.dtype), value)
        return fn

    @property
    def low(self) -> float:
        if not hasattr(self, "_low"):
            self._low = float(self.run_chunk([[]], 0)[0])  # one sync, once
        return self._low


def score(jobs, progress=None) -> list[torch.Tensor]:
    """Scores of each (tracer, cells) job, all tracers on one :class:`Fact`: the cells of every
    job are run start by start, each corrupted prefix computed once and copied per chunk."""
    jobs = list(jobs)
    fact = jobs[0][0].fact
    plans = [tracer.plan(cells) for tracer, cells in jobs]
    scores = [torch.empty(len(cells), dtype=torch.float32, device=fact.lm.device) for _, cells in jobs]
    per_chunk = max(1, fact.batch_size // fact.samples)
    with torch.no_grad():
        for start in sorted({s for groups, _ in plans for s in groups}):
            base = fact.prefix(start) if start > 0 else None
            for (tracer, cells), (groups, _), out in zip(jobs, plans, scores):
                members = groups.get(start, [])
                for k in range(0, len(members), per_chunk):
                    chunk = members[k:k + per_chunk]
                    past = copy.deepcopy(base) if base is not None else None
                    out[chunk] = tracer.run_chunk([cells[i] for i in chunk], start, past)
                    if progress is not None:
                        progress.update(len(chunk))
            del base
        for (tracer, _), (_, trivial), out in zip(jobs, plans, scores):
            if trivial:
                out[trivial] = tracer.low
                if progress is not None:
                    progress.update(len(trivial))
    return [s.cpu() for s in scores]
