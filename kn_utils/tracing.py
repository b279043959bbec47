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
loop this is tested against is :func:`kn_utils.reference.reference_trace`.  The runs one fact's
kinds share (clean run, corrupted prefixes) are computed once (:mod:`kn_utils.tracer`,
:func:`causal_traces`, :func:`average_indirect_effects`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .checks import as_index, as_indices, as_pair
from .targets import prepare, read_position, subject_span  # subject_span: re-exported
from .tracer import (Fact, Tracer, _noise_factor, _resolve_noise, draw_noise, layer_window,  # noqa: F401
                     noise_level, score)

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
    only these token indices (others are NaN).  :func:`causal_traces` traces several kinds at once.
    """
    _check_kind(kind)
    return causal_traces(lm, prompt, subject, kinds=(kind,), samples=samples, noise=noise,
                         window=window, target=target, batch_size=batch_size,
                         prefix_cache=prefix_cache, tokens=tokens, progress=progress)[kind]


def causal_traces(lm, prompt: str, subject: str, *, kinds=KINDS, samples: int = 10, noise="s3",
                  window: int = 10, target: str | None = None, batch_size: int | None = None,
                  prefix_cache: bool | None = None, tokens: list[int] | None = None,
                  progress: bool = False) -> dict[str, TraceResult]:
    """:func:`causal_trace` of each of ``kinds`` ({kind: TraceResult}), the same numbers, with the
    clean run, the noise and the corrupted prefixes computed once for all kinds."""
    kinds = list(dict.fromkeys([kinds] if isinstance(kinds, str) else kinds))
    if not kinds:
        raise ValueError(f"kinds is empty: choose some of {KINDS}")
    for kind in kinds:
        _validate(lm, kind, samples, window, batch_size)
    if tokens is not None:
        tokens = as_indices(tokens, "token")
        if not tokens:
            raise ValueError("tokens is empty: pass None (every token) or a list of token indices")
    fact = Fact(lm, prompt, subject, samples=samples, noise=noise, target=target, sites=kinds,
                prefix_cache=prefix_cache, batch_size=batch_size)
    n_layers, n_tok = lm.arch.n_layers, len(fact.ids)
    in_range = f"the prompt has tokens 0..{n_tok - 1}"
    chosen = range(n_tok) if tokens is None else \
        sorted(set(as_index(t, "token", n_tok, range_text=in_range) for t in tokens))
    jobs, wheres = [], []
    for kind in kinds:
        width = 1 if kind == "hidden" else window
        cells, where = [], []
        for t in chosen:
            for layer in range(n_layers):
                cells.append([(t, j) for j in layer_window(layer, n_layers, width)])
                where.append((t, layer))
        jobs.append((Tracer(fact, kind), cells))
        wheres.append(where)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(len(c) for _, c in jobs), desc=f"trace {'/'.join(kinds)}", leave=False)
    try:
        values = score(jobs, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    tok = lm.tokenizer
    out = {}
    for kind, (tracer, _), where, vals in zip(kinds, jobs, wheres, values):
        scores = torch.full((n_tok, n_layers), float("nan"))
        idx = torch.as_tensor(where)
        scores[idx[:, 0], idx[:, 1]] = vals
        out[kind] = TraceResult(
            scores=scores, low_score=tracer.low, high_score=fact.high,
            tokens=[tok.decode([i]) for i in fact.ids], subject_range=fact.span,
            answer=tok.decode([fact.answer_id]), answer_id=fact.answer_id, kind=kind,
            window=1 if kind == "hidden" else window, prompt=prompt, subject=subject, noise=fact.level,
            samples=samples, read_position=fact.read, correct=fact.top_id == fact.answer_id)
    return out


def restored_score(lm, prompt: str, subject: str, states, *, kind: str = "hidden",
                   samples: int = 10, noise=0.1, target: str | None = None,
                   prefix_cache: bool | None = None) -> float:
    """Answer probability with every (token, layer) in ``states`` restored at once (empty: corrupted)."""
    _validate(lm, kind, samples, 1, None)
    pairs = []
    for state in states:
        t, layer = as_pair(state, "a state", "token", "layer")
        pairs.append((as_index(t, "token"), lm.arch.check_layer(layer)))
    tracer = Tracer(Fact(lm, prompt, subject, samples=samples, noise=noise, target=target, sites=[kind],
                         prefix_cache=prefix_cache, batch_size=None), kind)
    n_tok = len(tracer.fact.ids)
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
    :func:`average_indirect_effects` does several kinds at once (each fact's shared runs once).
    """
    _check_kind(kind)
    out = average_indirect_effects(lm, items, kinds=(kind,), samples=samples, noise=noise,
                                   window=window, only_correct=only_correct, batch_size=batch_size,
                                   return_traces=return_traces, progress=progress)
    return (out[0][kind], out[1][kind]) if return_traces else out[kind]


def average_indirect_effects(lm, items, *, kinds=KINDS, samples: int = 10, noise="s3",
                             window: int = 10, only_correct: bool = True,
                             batch_size: int | None = None, return_traces: bool = False,
                             progress: bool = True):
    """:func:`average_indirect_effect` of each of ``kinds``: {kind: DataFrame} (and {kind: traces}
    with ``return_traces``), the same numbers, each fact traced by :func:`causal_traces`."""
    kinds = list(dict.fromkeys([kinds] if isinstance(kinds, str) else kinds))
    if not kinds:
        raise ValueError(f"kinds is empty: choose some of {KINDS}")
    for kind in kinds:
        _validate(lm, kind, samples, window, batch_size)
    rows = _items(items)
    if not rows:
        raise ValueError("no items given")
    # "s3" here is ROME's data-set-wide level: the std over every item's subject
    level = _resolve_noise(lm, noise, [r[1] for r in rows])
    from tqdm.auto import tqdm

    traces, skipped = {k: [] for k in kinds}, 0
    for prompt, subject, target in tqdm(rows, desc=f"AIE {'/'.join(kinds)}", disable=not progress):
        trs = causal_traces(lm, prompt, subject, kinds=kinds, samples=samples, noise=level,
                            window=window, target=target, batch_size=batch_size)
        if target is not None and only_correct and not trs[kinds[0]].correct:
            skipped += 1
            continue
        for kind in kinds:
            traces[kind].append(trs[kind])
    if not traces[kinds[0]]:
        raise ValueError(f"the model predicts none of the {len(rows)} targets: nothing to average "
                         f"(pass only_correct=False to trace its own predictions)")
    frames = {}
    for kind in kinds:
        df = frames[kind] = aggregate_traces(traces[kind], kind)
        df.attrs.update(n_skipped=skipped, noise=level)
        if getattr(items, "attrs", {}).get("data_source"):  # e.g. the built-in known facts: say so
            df.attrs["data_source"] = items.attrs["data_source"]
    return (frames, traces) if return_traces else frames


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


__all__ = ["KINDS", "TOKEN_CLASSES", "TraceResult", "causal_trace", "causal_traces", "restored_score",
           "noise_level", "draw_noise", "layer_window", "subject_span", "token_classes",
           "aggregate_traces", "average_indirect_effect", "average_indirect_effects", "filter_known"]
