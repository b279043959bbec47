"""Causal tracing (Meng et al., ROME §2) and average indirect effects, batched.

Three runs define a trace:

* clean      the prompt as is; the answer is its top-1 token (or a given target's first token);
* corrupted  Gaussian noise added to the input embeddings of the *subject* tokens;
* restored   the corrupted run with one state (token t, layer l) written back to its clean value
             (MLP / attention: a window of layers around l at token t).

The score of a restored cell is the answer's probability at the read position, averaged over the
noise samples.  The noise follows ROME's code exactly: ``RandomState(1).randn(samples, n_subject,
d_model) * level``, one draw shared by every cell.

Speed: every batch row is one (noise sample, cell) pair, so one forward evaluates many cells; one
hook per restored layer writes the clean value into the rows whose cell restores that state (a row
mask), and the logits are computed only at the read position.  For causal LMs two exact shortcuts
remove work the per-cell loop repeats:

* a cell at token t cannot change positions before t, so those positions are run once per noise
  sample and handed over as a KV cache; the batch only runs positions t .. end;
* a cell before the subject restores a state that the noise never reached, so its score is the
  corrupted score itself and no forward is needed.

Any model, causal or masked: below a cell's lowest restored layer its rows equal the corrupted run,
so a forward starts with one corrupted row per noise sample and a pre-hook on each block appends
copies of those rows for the cells that start restoring there (blocks below layer l run at batch
``samples``, not ``samples x cells``).  These mechanics are :mod:`kn_utils.engine`'s; the plain
loop this is tested against is :func:`kn_utils.reference.reference_trace`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .checks import as_index, as_indices, as_pair
from . import engine
from .hooks import modify, record
from .targets import prepare, read_position, subject_span  # subject_span: re-exported

KINDS = ("hidden", "mlp", "attn")
TOKEN_CLASSES = ("first subject token", "middle subject tokens", "last subject token",
                 "first subsequent token", "further tokens", "last token")


@dataclass
class TraceResult:
    """One causal trace.  ``scores[t, l]`` = mean answer probability with state (t, l) restored."""

    scores: torch.Tensor            # [n_tokens, n_layers], float32 on the CPU
    low_score: float                # corrupted run
    high_score: float               # clean run
    tokens: list[str]               # decoded prompt tokens (special tokens included)
    subject_range: tuple[int, int]  # [start, end) token indices of the subject
    answer: str                     # the token whose probability is scored
    answer_id: int
    kind: str
    window: int                     # layers restored per cell (1 for "hidden")
    prompt: str = ""
    subject: str = ""
    noise: float = 0.0
    samples: int = 0
    read_position: int = -1
    correct: bool = True            # clean top-1 == answer (always True without a target)

    @property
    def indirect_effects(self) -> torch.Tensor:
        """scores - low_score: what restoring each state recovers."""
        return self.scores - self.low_score

    def to_frame(self):
        """Long table: one row per (token, layer) with score and indirect effect."""
        import pandas as pd

        n_tok, n_layers = self.scores.shape
        b, e = self.subject_range
        tok = np.repeat(np.arange(n_tok), n_layers)
        return pd.DataFrame({
            "kind": self.kind, "token_index": tok, "token": [self.tokens[i] for i in tok],
            "subject": (tok >= b) & (tok < e), "layer": np.tile(np.arange(n_layers), n_tok),
            "score": self.scores.reshape(-1).numpy(),
            "indirect_effect": self.indirect_effects.reshape(-1).numpy(),
            "low_score": self.low_score, "high_score": self.high_score, "answer": self.answer,
        })


# ----------------------------------------------------------------------------- inputs

def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")


def _check_positive_int(name, value, minimum=1):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


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


# ----------------------------------------------------------------------------- the batched trace

class _Tracer:
    """One prompt's clean run and noise; scores cells through :mod:`kn_utils.engine`.

    Every batch row is one (noise sample, cell) pair.  The corrupted run is the carrier (one row per
    noise sample); a cell's rows join at its lowest restored layer (:class:`engine.Widening`), and
    one hook per restored layer writes the clean state into the rows of the cells restoring it.
    """

    def __init__(self, lm, prompt, subject, *, samples, noise, target, site, prefix_cache, batch_size):
        self.lm, self.site, self.samples = lm, site, samples
        self.ids, self.span = subject_span(lm, prompt, subject)
        self.read = read_position(lm, self.ids)
        self.level = _resolve_noise(lm, noise, [subject])
        self.causal = not lm.arch.is_masked_lm
        self.prefix_cache = engine.use_prefix_cache(lm, prefix_cache)
        self.after = engine.joins_after_block(lm, site)
        b, e = self.span
        self.noise = torch.from_numpy(draw_noise(samples, e - b, lm.arch.d_model, self.level)).to(
            lm.device, lm.dtype)
        self.ids_t = torch.as_tensor(self.ids, device=lm.device)
        with torch.no_grad(), record(lm, site) as clean:
            logits = engine.forward(lm, self.ids_t[None], self.read)
        self.clean = dict(clean)  # {layer: [1, P, W]} on the device
        probs = logits[0].float().softmax(-1)
        self.top_id = int(probs.argmax())
        self.answer_id = self.top_id if target is None else int(prepare(lm, prompt, target).target_ids[0])
        self.high = float(probs[self.answer_id])
        self.batch_size = batch_size or engine.default_rows(
            lm, engine.row_bytes(lm, len(self.ids), saved=False), 1 << 28, minimum=samples,
            maximum=8192)

    def _corrupt(self, start):
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

    def run(self, cells: list[list[tuple[int, int]]], progress=None) -> torch.Tensor:
        """Score of each cell (a list of (token, layer) states restored together).

        Causal LMs: a cell restoring only states before the subject scores the corrupted run (the
        noise never reached them), and a cell at token t shares the corrupted positions before t
        with every other such cell (a KV cache), so cells are grouped by their first token.
        """
        scores = torch.empty(len(cells), dtype=torch.float32, device=self.lm.device)
        groups: dict[int, list[int]] = {}
        trivial = []
        for i, cell in enumerate(cells):
            if self.causal and cell and max(t for t, _ in cell) < self.span[0]:
                trivial.append(i)
                continue
            first = min((t for t, _ in cell), default=0)
            groups.setdefault(first if self.prefix_cache else 0, []).append(i)
        per_chunk = max(1, self.batch_size // self.samples)
        with torch.no_grad():
            for start, members in sorted(groups.items()):
                for k in range(0, len(members), per_chunk):
                    chunk = members[k:k + per_chunk]
                    scores[chunk] = self._run_chunk([cells[i] for i in chunk], start)
                    if progress is not None:
                        progress.update(len(chunk))
            if trivial:
                scores[trivial] = self.low
                if progress is not None:
                    progress.update(len(trivial))
        return scores.cpu()

    @torch.no_grad()
    def _run_chunk(self, cells, start) -> torch.Tensor:
        """Mean score of each cell, positions [start, end) in the batch, the rest as a KV cache."""
        samples, n_layers, dev = self.samples, self.lm.arch.n_layers, self.lm.device
        past = None
        if start > 0:
            with modify(self.lm, "embed", {0: self._corrupt(0)}):
                past = engine.prefix_cache(self.lm, self.ids_t[None, :start].expand(samples, -1))
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
                    masks[layer] = torch.zeros(plan.rows_at[layer], len(self.ids) - start, dtype=torch.bool)
                masks[layer][plan.group(g), t - start] = True
        fns = {layer: self._restorer(layer, mask.to(dev), start) for layer, mask in masks.items()}
        attention = None
        if past is not None:
            engine.widen_cache(past, plan.rows_in, samples, dev)
            attention = torch.ones(samples, len(self.ids), dtype=torch.long, device=dev)
        with modify(self.lm, "embed", {0: self._corrupt(start)}):
            logits = engine.forward(self.lm, self.ids_t[None, start:].expand(samples, -1),
                                    self.read - start, past=past, attention_mask=attention,
                                    widening=plan, site=self.site, writers=fns)
        means = logits.float().softmax(-1)[samples:, self.answer_id].view(len(cells), samples).mean(1)
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
            self._low = float(self._run_chunk([[]], 0)[0])  # one sync, once
        return self._low


def _validate(lm, kind, samples, window, batch_size):
    _check_kind(kind)
    _check_positive_int("samples", samples)
    _check_positive_int("window", window)
    if batch_size is not None:
        _check_positive_int("batch_size", batch_size)


def causal_trace(lm, prompt: str, subject: str, *, kind: str = "hidden", samples: int = 10,
                 noise="s3", window: int = 10, target: str | None = None,
                 batch_size: int | None = None, prefix_cache: bool | None = None,
                 tokens: list[int] | None = None, progress: bool = False) -> TraceResult:
    """Trace every (token, layer) state of ``prompt`` with ``subject`` corrupted.

    ``kind``: "hidden" restores one block output; "mlp" / "attn" restore the MLP / attention output
    over a window of ``window`` layers centred at the plotted layer.  ``noise``: "s3" (default, as
    REFERENCE §3) for 3 x the std of the subject's embeddings, or a number (ROME's code default is
    0.1); :func:`noise_level` over many subjects gives ROME's data-set-wide level.  ``target``: score this
    target's first token instead of the clean top-1.  ``batch_size``: rows (sample x cell) per
    forward (default: from a memory budget).  ``prefix_cache``: causal LMs reuse the corrupted
    prefix through the KV cache (same numbers either way; default on, except for 16-bit models on a
    GPU, where one forward of full rows is faster).  ``tokens``: trace
    only these token indices (others are NaN).
    """
    _validate(lm, kind, samples, window, batch_size)
    if tokens is not None:
        tokens = as_indices(tokens, "token")
        if not tokens:
            raise ValueError("tokens is empty: pass None (every token) or a list of token indices")
    tracer = _Tracer(lm, prompt, subject, samples=samples, noise=noise, target=target, site=kind,
                     prefix_cache=prefix_cache, batch_size=batch_size)
    n_layers, n_tok = lm.arch.n_layers, len(tracer.ids)
    in_range = f"the prompt has tokens 0..{n_tok - 1}"
    chosen = range(n_tok) if tokens is None else \
        sorted(set(as_index(t, "token", n_tok, range_text=in_range) for t in tokens))
    width = 1 if kind == "hidden" else window
    cells, where = [], []
    for t in chosen:
        for layer in range(n_layers):
            cells.append([(t, j) for j in layer_window(layer, n_layers, width)])
            where.append((t, layer))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(cells), desc=f"trace {kind}", leave=False)
    try:
        values = tracer.run(cells, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    scores = torch.full((n_tok, n_layers), float("nan"))
    idx = torch.as_tensor(where)
    scores[idx[:, 0], idx[:, 1]] = values
    tok = lm.tokenizer
    return TraceResult(
        scores=scores, low_score=tracer.low, high_score=tracer.high,
        tokens=[tok.decode([i]) for i in tracer.ids], subject_range=tracer.span,
        answer=tok.decode([tracer.answer_id]), answer_id=tracer.answer_id, kind=kind, window=width,
        prompt=prompt, subject=subject, noise=tracer.level, samples=samples,
        read_position=tracer.read, correct=tracer.top_id == tracer.answer_id)


def restored_score(lm, prompt: str, subject: str, states, *, kind: str = "hidden",
                   samples: int = 10, noise=0.1, target: str | None = None,
                   prefix_cache: bool | None = None) -> float:
    """Answer probability with every (token, layer) in ``states`` restored at once (empty: corrupted)."""
    _validate(lm, kind, samples, 1, None)
    pairs = []
    for state in states:
        t, layer = as_pair(state, "a state", "token", "layer")
        pairs.append((as_index(t, "token"), lm.arch.check_layer(layer)))
    tracer = _Tracer(lm, prompt, subject, samples=samples, noise=noise, target=target, site=kind,
                     prefix_cache=prefix_cache, batch_size=None)
    n_tok = len(tracer.ids)
    states = [(as_index(t, "token", n_tok, range_text=f"the prompt has tokens 0..{n_tok - 1}"), layer)
              for t, layer in pairs]
    return float(tracer.run([states])[0])


# ----------------------------------------------------------------------------- average effects

def token_classes(n_tokens: int, subject_range: tuple[int, int], read: int | None = None) -> dict:
    """Token indices of each class (ROME's grouping): first / middle / last subject token, first
    subsequent token, further tokens, last token (the read position)."""
    b, e = subject_range
    last = n_tokens - 1 if read is None else read
    return {
        "first subject token": [b],
        "middle subject tokens": list(range(b + 1, e - 1)),
        "last subject token": [e - 1],
        "first subsequent token": [e] if e < n_tokens and e <= last else [],
        "further tokens": list(range(e + 1, last)),
        "last token": [last],
    }


def _items(items):
    """Rows of (prompt, subject, target-or-None) from a DataFrame, dicts or tuples."""
    import pandas as pd

    if isinstance(items, pd.DataFrame):
        target_col = next((c for c in ("target", "attribute") if c in items.columns), None)
        missing = {"prompt", "subject"} - set(items.columns)
        if missing:
            raise ValueError(f"items need columns prompt and subject; missing {sorted(missing)}")
        return [(r["prompt"], r["subject"], r[target_col] if target_col else None)
                for _, r in items.iterrows()]
    rows = []
    for item in items:
        if isinstance(item, dict):
            rows.append((item["prompt"], item["subject"], item.get("target", item.get("attribute"))))
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
            rows.append((item[0], item[1], item[2] if len(item) == 3 else None))
        else:
            raise ValueError(f"an item is (prompt, subject[, target]) or a dict, got {item!r}")
    return rows


def aggregate_traces(traces, kind=None):
    """Per token class and layer: mean indirect effect (score - low score), 95% interval, n."""
    import pandas as pd

    rows = []
    traces = list(traces)
    if not traces:
        raise ValueError("no traces to aggregate")
    n_layers = traces[0].scores.shape[1]
    classes = [token_classes(len(tr.tokens), tr.subject_range, tr.read_position) for tr in traces]
    for name in TOKEN_CLASSES:
        effects = [tr.indirect_effects[idx] for tr, cl in zip(traces, classes) for idx in cl[name]]
        scores = [tr.scores[idx] for tr, cl in zip(traces, classes) for idx in cl[name]]
        if not effects:
            continue
        eff = torch.stack(effects).double()
        sc = torch.stack(scores).double()
        n = eff.shape[0]
        std = eff.std(0, unbiased=False) if n > 1 else torch.zeros(n_layers, dtype=torch.double)
        for layer in range(n_layers):
            rows.append({"kind": kind or traces[0].kind, "token_class": name, "layer": layer,
                         "aie": float(eff[:, layer].mean()), "ci95": float(1.96 * std[layer] / n ** 0.5),
                         "score": float(sc[:, layer].mean()), "n": n})
    df = pd.DataFrame(rows)
    df.attrs.update(low_score=float(np.mean([t.low_score for t in traces])),
                    high_score=float(np.mean([t.high_score for t in traces])), n_items=len(traces))
    return df


def average_indirect_effect(lm, items, *, kind: str = "hidden", samples: int = 10, noise="s3",
                            window: int = 10, only_correct: bool = True,
                            batch_size: int | None = None, return_traces: bool = False,
                            progress: bool = True):
    """Average indirect effect per token class and layer over ``items`` (Fig 13 of the paper).

    ``items``: a DataFrame with columns prompt, subject and optionally target (or attribute), or a
    list of (prompt, subject[, target]) / dicts.  With a target the answer is its first token, and
    ``only_correct`` keeps only items the model gets right (clean top-1 == target), as ROME does.
    ``noise="s3"`` uses 3 x the std of the embeddings of all the items' subjects.

    Returns a DataFrame (kind, token_class, layer, aie, ci95, score, n; attrs low_score,
    high_score, n_items, n_skipped, and the items' data_source if they have one); with ``return_traces=True`` also the list of TraceResults.
    """
    _validate(lm, kind, samples, window, batch_size)
    rows = _items(items)
    if not rows:
        raise ValueError("no items given")
    # "s3" here is ROME's data-set-wide level: the std over every item's subject
    level = _resolve_noise(lm, noise, [r[1] for r in rows])
    from tqdm.auto import tqdm

    traces, skipped = [], 0
    for prompt, subject, target in tqdm(rows, desc=f"AIE {kind}", disable=not progress):
        tr = causal_trace(lm, prompt, subject, kind=kind, samples=samples, noise=level,
                          window=window, target=target, batch_size=batch_size)
        if target is not None and only_correct and not tr.correct:
            skipped += 1
            continue
        traces.append(tr)
    if not traces:
        raise ValueError(f"the model predicts none of the {len(rows)} targets: nothing to average "
                         f"(pass only_correct=False to trace its own predictions)")
    df = aggregate_traces(traces, kind)
    df.attrs.update(n_skipped=skipped, noise=level)
    if getattr(items, "attrs", {}).get("data_source"):  # e.g. the built-in known facts: say so
        df.attrs["data_source"] = items.attrs["data_source"]
    return (df, traces) if return_traces else df


def filter_known(lm, items, n: int | None = None, *, batch_size: int = 32):
    """Rows of ``items`` (DataFrame with prompt and target/attribute) whose target's first token is
    the model's top-1 prediction (ROME traces only facts the model knows); the first ``n`` of them."""
    import pandas as pd

    from .scoring import logits_at
    from .targets import prompt_ids

    if not isinstance(items, pd.DataFrame):
        items = pd.DataFrame(_items(items), columns=["prompt", "subject", "target"])
    col = next((c for c in ("target", "attribute") if c in items.columns), None)
    if col is None:
        raise ValueError("filter_known needs a target or attribute column")
    keep = []
    for start in range(0, len(items), batch_size):
        part = items.iloc[start:start + batch_size]
        seqs = [prompt_ids(lm, p) for p in part["prompt"]]
        top = logits_at(lm, seqs, [read_position(lm, s) for s in seqs]).argmax(-1).tolist()
        for (idx, row), best in zip(part.iterrows(), top):
            if prepare(lm, row["prompt"], str(row[col])).target_ids[0] == best:
                keep.append(idx)
        if n is not None and len(keep) >= n:
            break
    out = items.loc[keep[:n] if n is not None else keep].reset_index(drop=True)
    out.attrs.update(items.attrs)
    return out


__all__ = ["KINDS", "TOKEN_CLASSES", "TraceResult", "causal_trace", "restored_score", "noise_level",
           "draw_noise", "layer_window", "subject_span", "token_classes", "aggregate_traces",
           "average_indirect_effect", "filter_known"]
