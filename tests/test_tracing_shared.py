"""Several kinds of one fact traced with their shared runs done once (clean run, corrupted
prefixes): the same numbers, bit for bit, as each kind traced on its own with a prefix per chunk."""
import pytest
import torch

import kn_utils as ku
from kn_utils import tracer as tr
from kn_utils.tracing import KINDS, average_indirect_effect, average_indirect_effects, causal_trace, causal_traces
from tiny_models import tiny_model

PROMPTS = {"causal": ("The big old capital of France is", "capital of France"),
           "masked": ("The capital of france is [MASK] .", "capital of")}


@pytest.fixture(scope="module")
def peaky():
    """Tiny models with a scaled unembedding (probabilities far from uniform, as in test_tracing)."""
    cache = {}

    def get(family):
        if family not in cache:
            model, tok = tiny_model(family)
            lm = ku.load_model(model, tokenizer=tok, device="cpu")
            lm.arch.unembed.weight = torch.nn.Parameter(lm.arch.unembed.weight.detach() * 60.0)
            cache[family] = lm
        return cache[family]
    return get


def per_chunk_trace(lm, prompt, subject, kind, *, samples, noise, window, batch_size):
    """Today's (42640b7) path: one kind, its own clean run, a fresh corrupted prefix per chunk."""
    fact = tr.Fact(lm, prompt, subject, samples=samples, noise=noise, target=None, sites=[kind],
                   prefix_cache=None, batch_size=batch_size)
    tracer = tr.Tracer(fact, kind)
    n_layers, width = lm.arch.n_layers, 1 if kind == "hidden" else window
    cells = [[(t, j) for j in tr.layer_window(layer, n_layers, width)]
             for t in range(len(fact.ids)) for layer in range(n_layers)]
    groups, trivial = tracer.plan(cells)
    scores = torch.empty(len(cells))
    per_chunk = max(1, fact.batch_size // samples)
    for start, members in sorted(groups.items()):
        for k in range(0, len(members), per_chunk):
            chunk = members[k:k + per_chunk]
            past = fact.prefix(start) if start > 0 else None
            scores[chunk] = tracer.run_chunk([cells[i] for i in chunk], start, past)
    scores[trivial] = tracer.low
    return scores.view(len(fact.ids), n_layers), tracer.low, fact.high


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "bert"])
def test_kinds_together_equal_each_kind_alone(peaky, family, monkeypatch):
    lm = peaky(family)
    prompt, subject = PROMPTS["masked" if lm.arch.is_masked_lm else "causal"]
    opts = dict(samples=3, noise=0.3, window=2, batch_size=3 * 4)   # several chunks per first token
    prefixes = []
    real = tr.Fact.prefix
    monkeypatch.setattr(tr.Fact, "prefix", lambda self, start: prefixes.append(start) or real(self, start))
    together = causal_traces(lm, prompt, subject, kinds=KINDS, **opts)
    starts = prefixes.copy()
    assert len(starts) == len(set(starts))          # each corrupted prefix once for all kinds
    assert bool(starts) != lm.arch.is_masked_lm
    for kind in KINDS:
        scores, low, high = per_chunk_trace(lm, prompt, subject, kind, **opts)
        got = together[kind]
        assert got.kind == kind and got.window == (1 if kind == "hidden" else 2)
        assert torch.equal(got.scores, scores), kind
        assert got.low_score == low and got.high_score == high
        alone = causal_trace(lm, prompt, subject, kind=kind, **opts)
        assert torch.equal(alone.scores, got.scores) and alone.low_score == got.low_score
    # the test means something: restoring moves the score
    assert (together["hidden"].scores - together["hidden"].low_score).abs().max() > 1e-3
    assert ku.hook_count(lm.model) == 0


def test_aie_of_several_kinds_equals_each_kind(peaky):
    lm = peaky("llama")
    items = [("The big old capital of France is", "capital of France"), ("A man sees the dog", "man")]
    together, traces = average_indirect_effects(lm, items, kinds=("mlp", "hidden"), samples=2,
                                                noise=0.3, window=2, return_traces=True, progress=False)
    assert list(together) == ["mlp", "hidden"] and len(traces["mlp"]) == 2
    for kind in ("mlp", "hidden"):
        alone = average_indirect_effect(lm, items, kind=kind, samples=2, noise=0.3, window=2,
                                        progress=False)
        assert together[kind].equals(alone)
        assert together[kind].attrs == alone.attrs


def test_kinds_checked_before_compute(peaky):
    lm = peaky("llama")
    with pytest.raises(ValueError, match="unknown kind"):
        causal_traces(lm, *PROMPTS["causal"], kinds=("hidden", "resid"))
    with pytest.raises(ValueError, match="kinds is empty"):
        average_indirect_effects(lm, [PROMPTS["causal"]], kinds=())
    assert ku.hook_count(lm.model) == 0


def test_tracing_unit_item_equals_one_trace_per_kind(peaky):
    """The tracing unit computes an item with causal_traces; its record is what causal_trace per
    kind gave (the records computed before the switch stay valid without a version bump)."""
    from types import SimpleNamespace

    from kn_utils.experiments import tracing as unit
    from kn_utils.store import clean

    lm = peaky("llama")
    prompt, subject = PROMPTS["causal"]
    ctx = SimpleNamespace(lm=lm, sizes={"trace_samples": 3})
    item = {"set": "facts", "prompt": prompt, "subject": subject, "target": None, "noise": 0.5}
    rec = unit.compute(ctx, item)
    for kind in KINDS:
        alone = causal_trace(lm, prompt, subject, kind=kind, samples=3, noise=0.5, window=10)
        assert rec["kinds"][kind]["scores"] == clean(alone.scores.tolist(), 9)
        assert rec["kinds"][kind]["low"] == alone.low_score and rec["kinds"][kind]["high"] == alone.high_score
