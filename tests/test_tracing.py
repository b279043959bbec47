"""Causal tracing: the batched path against a plain one-forward-per-cell loop, noise, inputs, AIE."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import kn_utils as ku
from kn_utils.hooks import hook_count, modify, record
from kn_utils.reference import reference_trace
from kn_utils.targets import read_position
from kn_utils.tracing import (TOKEN_CLASSES, aggregate_traces, average_indirect_effect, causal_trace,
                              draw_noise, layer_window, noise_level, restored_score, subject_span,
                              token_classes)
from tiny_models import CAUSAL_FAMILIES, tiny_model

PROMPTS = {
    "causal": ("The big old capital of France is", "capital of France"),
    "masked": ("The capital of france is [MASK] .", "capital of"),
}


def peaky_lm(family, seed=0):
    """A tiny random model whose next-token distribution is far from uniform.

    Random tiny models put ~1/vocab on every token, so absolute differences of 1e-5 would say
    nothing; a scaled (untied) unembedding makes probabilities of order 0.1-1.
    """
    model, tok = tiny_model(family, seed)
    lm = ku.load_model(model, tokenizer=tok, device="cpu")
    head = lm.arch.unembed
    head.weight = torch.nn.Parameter(head.weight.detach() * 60.0)
    return lm


@pytest.fixture(scope="module")
def peaky():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = peaky_lm(family)
        return cache[family]
    return get


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_fast_path_equals_reference_loop(peaky, family, kind):
    lm = peaky(family)
    prompt, subject = PROMPTS["masked" if lm.arch.is_masked_lm else "causal"]
    want = reference_trace(lm, prompt, subject, kind=kind, samples=3, noise=0.3, window=2)
    ref, low, high = want.scores, want.low_score, want.high_score
    got = causal_trace(lm, prompt, subject, kind=kind, samples=3, noise=0.3, window=2)
    assert got.scores.shape == ref.shape == (len(got.tokens), lm.arch.n_layers)
    assert abs(got.low_score - low) < 1e-5 and abs(got.high_score - high) < 1e-5
    assert (got.scores - ref).abs().max() < 1e-5
    # the comparison means something: the model is peaky and the noise moves the answer (tiny
    # random BERTs read the mask mostly from its own embedding, so their effects are smaller and
    # the agreement is checked 10x tighter there)
    signal = 2e-5 if lm.arch.is_masked_lm else 1e-3
    assert high > 0.05 and abs(high - low) > signal
    assert float(ref.max() - ref.min()) > signal
    if lm.arch.is_masked_lm:
        assert (got.scores - ref).abs().max() < 1e-6
    # every chunking and both the KV-prefix and full-row paths give the same numbers
    for kwargs in (dict(batch_size=3), dict(batch_size=7, prefix_cache=False)):
        other = causal_trace(lm, prompt, subject, kind=kind, samples=3, noise=0.3, window=2, **kwargs)
        assert (other.scores - got.scores).abs().max() < 1e-5


@pytest.mark.parametrize("family", [f for f in CAUSAL_FAMILIES if f not in ("gpt2", "llama")])
def test_prefix_cache_matches_full_rows_every_causal_family(peaky, family):
    lm = peaky(family)
    prompt, subject = PROMPTS["causal"]
    a = causal_trace(lm, prompt, subject, kind="mlp", samples=2, noise=0.3, window=2)
    b = causal_trace(lm, prompt, subject, kind="mlp", samples=2, noise=0.3, window=2,
                     prefix_cache=False)
    assert (a.scores - b.scores).abs().max() < 1e-5
    assert hook_count(lm.model) == 0


def test_noise_follows_rome_recipe(peaky):
    expected = np.random.RandomState(1).randn(4, 3, 32) * 0.25
    assert np.array_equal(draw_noise(4, 3, 32, 0.25), expected)
    # the corrupted run inside the tracer uses exactly that draw: record what reaches block 0
    # (LLaMA feeds the embeddings to the first block unchanged)
    lm = peaky("llama")
    prompt, subject = PROMPTS["causal"]
    ids, (b, e) = subject_span(lm, prompt, subject)
    seen = []

    def spy(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden.detach().clone())
    handle = lm.arch.blocks[0].register_forward_pre_hook(spy, with_kwargs=True)
    try:
        causal_trace(lm, prompt, subject, samples=4, noise=0.25, tokens=[e - 1])
    finally:
        handle.remove()
    clean = lm.arch.embed(torch.tensor([ids]))[0]
    draw = torch.from_numpy(np.random.RandomState(1).randn(4, e - b, lm.arch.d_model) * 0.25).float()
    # the first full-length corrupted batch: 4 samples of the whole prompt
    full = [s for s in seen if s.shape[:2] == (4, len(ids))]
    assert full, "no corrupted full-length run seen"
    for row in range(4):
        torch.testing.assert_close(full[0][row, b:e], clean[b:e] + draw[row], rtol=0, atol=1e-6)
        torch.testing.assert_close(full[0][row, :b], clean[:b], rtol=0, atol=0)
        torch.testing.assert_close(full[0][row, e:], clean[e:], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_restoring_everything_gives_clean_score(peaky, family):
    lm = peaky(family)
    prompt, subject = PROMPTS["masked" if lm.arch.is_masked_lm else "causal"]
    ids, _ = subject_span(lm, prompt, subject)
    trace = causal_trace(lm, prompt, subject, samples=3, noise=0.3, tokens=[0])
    every = [(t, layer) for t in range(len(ids)) for layer in range(lm.arch.n_layers)]
    assert abs(restored_score(lm, prompt, subject, every, samples=3, noise=0.3)
               - trace.high_score) < 1e-5
    assert abs(restored_score(lm, prompt, subject, [], samples=3, noise=0.3) - trace.low_score) < 1e-6
    assert abs(trace.high_score - trace.low_score) > 1e-4


def test_subject_span_uses_character_offsets(tiny):
    lm = tiny("llama")
    ids, (b, e) = subject_span(lm, "The Eiffel Tower is in Paris", "Eiffel Tower")
    assert "".join(lm.tokenizer.decode([i]) for i in ids[b:e]) == " Eiffel Tower"
    assert lm.tokenizer.decode(ids[:b]).strip() == "The"
    # first occurrence; a subject at the very start
    ids, (b, e) = subject_span(lm, "Paris is the capital. Paris", "Paris")
    assert b == 0 and lm.tokenizer.decode(ids[b:e]) == "Paris"
    bert = tiny("bert")
    ids, (b, e) = subject_span(bert, "The capital of france is [MASK] .", "capital of")
    assert bert.tokenizer.decode(ids[b:e]) == "capital of"


def test_window_matches_rome():
    assert list(layer_window(0, 48, 10)) == list(range(0, 5))
    assert list(layer_window(20, 48, 10)) == list(range(15, 25))
    assert list(layer_window(46, 48, 10)) == list(range(41, 48))


def test_bad_inputs_raise_and_leave_no_hooks(tiny):
    lm = tiny("gpt2")
    before = hook_count(lm.model)
    prompt = "The capital of France is"
    bad = [
        dict(subject="Germany"), dict(subject=""), dict(subject="France", kind="neurons"),
        dict(subject="France", samples=0), dict(subject="France", noise=-1.0),
        dict(subject="France", noise="loud"), dict(subject="France", window=0),
        dict(subject="France", batch_size=0), dict(subject="France", target=" "),
        dict(subject="France", tokens=[99]),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            causal_trace(lm, prompt, **kwargs)
        assert hook_count(lm.model) == before
    with pytest.raises(ValueError, match="Germany"):
        causal_trace(lm, prompt, "Germany")
    with pytest.raises(ValueError):
        causal_trace(lm, "", "France")
    with pytest.raises(ValueError):
        average_indirect_effect(lm, [], samples=2)
    with pytest.raises(ValueError):
        noise_level(lm, [])
    assert hook_count(lm.model) == before


def test_target_and_noise_level(peaky):
    lm = peaky("llama")
    prompt, subject = PROMPTS["causal"]
    free = causal_trace(lm, prompt, subject, samples=2, noise=0.3, tokens=[0])
    forced = causal_trace(lm, prompt, subject, samples=2, noise=0.3, tokens=[0], target=free.answer)
    assert forced.answer_id == free.answer_id and forced.correct
    assert abs(forced.high_score - free.high_score) < 1e-6
    other = causal_trace(lm, prompt, subject, samples=2, noise=0.3, tokens=[0], target=" Berlin")
    assert other.answer == lm.tokenizer.decode(lm.tokenizer(" Berlin")["input_ids"][:1])
    # s3 = 3 x the std of the subject's token embeddings
    ids = lm.tokenizer(subject, add_special_tokens=False)["input_ids"]
    expected = 3 * float(lm.arch.embed.weight.detach()[ids].float().std())
    assert abs(noise_level(lm, [subject]) - expected) < 1e-6
    s3 = causal_trace(lm, prompt, subject, samples=2, noise="s3", tokens=[0])
    assert abs(s3.noise - expected) < 1e-6


def test_token_classes():
    classes = token_classes(10, (2, 5))
    assert classes == {"first subject token": [2], "middle subject tokens": [3],
                       "last subject token": [4], "first subsequent token": [5],
                       "further tokens": [6, 7, 8], "last token": [9]}
    one = token_classes(4, (0, 1))
    assert one["first subject token"] == one["last subject token"] == [0]
    assert one["middle subject tokens"] == []


def test_average_indirect_effect_against_manual(peaky):
    lm = peaky("gpt2")
    items = pd.DataFrame({"prompt": ["The big old capital of France is", "The dog sees the cat and"],
                          "subject": ["capital of France", "dog"]})
    df, traces = average_indirect_effect(lm, items, kind="hidden", samples=2, noise=0.3,
                                         return_traces=True, progress=False)
    assert len(traces) == 2 and set(df.token_class) <= set(TOKEN_CLASSES)
    assert list(df.columns[:3]) == ["kind", "token_class", "layer"]
    for name in ("last subject token", "last token", "further tokens"):
        effects = []
        for tr in traces:
            for idx in token_classes(len(tr.tokens), tr.subject_range, tr.read_position)[name]:
                effects.append((tr.scores[idx] - tr.low_score).numpy())
        effects = np.stack(effects)
        part = df[df.token_class == name].sort_values("layer")
        np.testing.assert_allclose(part.aie, effects.mean(0), atol=1e-6)
        np.testing.assert_allclose(part.ci95, 1.96 * effects.std(0) / np.sqrt(len(effects)), atol=1e-6)
        assert (part.n == len(effects)).all()
    again = aggregate_traces(traces)
    pd.testing.assert_frame_equal(again.drop(columns="kind"), df.drop(columns="kind"))
    # only_correct drops items whose target the model does not predict
    wrong = items.assign(target=[" zzzz", traces[1].answer])
    kept = average_indirect_effect(lm, wrong, samples=2, noise=0.3, progress=False)
    assert kept.attrs["n_items"] == 1 and kept.attrs["n_skipped"] == 1


def test_real_model_known_fact(default_lm):
    prompt, subject = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
    _, (b, e) = subject_span(default_lm, prompt, subject)
    trace = causal_trace(default_lm, prompt, subject, samples=3, noise="s3", tokens=[e - 1])
    assert trace.answer.strip() == "Paris"
    assert trace.high_score > trace.low_score + 0.05
    assert hook_count(default_lm.model) == 0


def test_known_facts_and_counterfact(data_dir):
    from kn_utils.data.counterfact import load_counterfact, load_known_facts

    known = load_known_facts(data_dir, n=5)
    assert len(known) == 5 and known.subject[0] == "Vinson Massif"
    assert known.target[0] == " Antarctica"
    raw = json.loads((data_dir / "counterfact" / "known_1000.json").read_text())
    assert len(load_known_facts(data_dir)) == len(raw)
    cf = load_counterfact(data_dir, split="edit", n=3)
    assert {"prompt", "subject", "target_new", "ground_truth"} <= set(cf.columns) and len(cf) == 3
    with pytest.raises(ValueError):
        load_counterfact(data_dir, split="test")
    with pytest.raises(ValueError):
        load_known_facts(data_dir, n=0)


def test_builtin_known_facts():
    from kn_utils.data.counterfact import load_known_facts

    facts = load_known_facts(builtin=True)
    assert len(facts) >= 25
    assert all(s in p for s, p in zip(facts.subject, facts.prompt))


def test_filter_known(peaky):
    from kn_utils.tracing import filter_known

    lm = peaky("llama")
    prompt = PROMPTS["causal"][0]
    top = ku.predict(lm, prompt, 1)[0][0]
    items = pd.DataFrame({"prompt": [prompt, prompt, prompt], "subject": ["France"] * 3,
                          "target": [" zzzz", top, top]})
    kept = filter_known(lm, items)
    assert list(kept.target) == [top, top]
    assert len(filter_known(lm, items, n=1)) == 1


def test_figures_are_written(peaky, tmp_path):
    from kn_utils.plotting import (plot_aie, plot_edit_success_by_layer, plot_trace,
                                   plot_trace_panels)

    lm = peaky("gpt2")
    prompt, subject = PROMPTS["causal"]
    traces = {k: causal_trace(lm, prompt, subject, kind=k, samples=2, noise=0.3, window=2)
              for k in ("hidden", "mlp", "attn")}
    fig = plot_trace_panels(traces, save="panels", folder=tmp_path)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    b, e = traces["hidden"].subject_range
    assert [lab.endswith("*") for lab in labels] == [b <= i < e for i in range(len(labels))]
    plot_trace(traces["mlp"], save="single", folder=tmp_path)
    aie = {k: aggregate_traces([tr]) for k, tr in traces.items()}
    plot_aie(aie, save="aie", folder=tmp_path)
    sweep = pd.DataFrame({"layer": [0, 1, 2], "efficacy": [1.0, 0.9, 0.5], "paraphrase": [0.5, 0.4, 0.1]})
    plot_edit_success_by_layer(sweep, save="sweep", folder=tmp_path)
    for name in ("panels", "single", "aie", "sweep"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0 and (tmp_path / f"{name}.pdf").exists()
    with pytest.raises(ValueError):
        plot_edit_success_by_layer(sweep.drop(columns="efficacy"))
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # built without pyplot: nothing left open in a script


@pytest.mark.slow  # the CLI end to end
def test_trace_command(tmp_path):
    from kn_utils.cli import main
    from tiny_models import save_tiny

    model = save_tiny("gpt2", tmp_path / "tiny-gpt2")
    out = tmp_path / "results"
    rc = main(["trace", "--model", model, "--device", "cpu", "--prompt", "The capital of France is",
               "--subject", "France", "--samples", "2", "--window", "2", "--out", str(out)])
    assert rc == 0
    table = pd.read_csv(out / "trace_france.csv")
    assert set(table.kind) == {"hidden", "mlp", "attn"} and len(table) == 3 * 5 * 3
    assert (out / "trace_france.png").exists() and (out / "trace_france.pdf").exists()
    assert main(["trace", "--model", model, "--device", "cpu", "--prompt", "The capital of France is",
                 "--subject", "Germany", "--out", str(out)]) == 2
