"""The one scorer (kn_utils.scoring) and the one neuron-scaling hook, against one forward per query."""
import math

import pandas as pd
import pytest
import torch

import kn_utils as ku
from kn_utils import scoring, targets as tg
from kn_utils.hooks import hook_count, record, scale_neurons
from kn_utils.scoring import read_queries, score_targets

NEURONS = [(0, 3), (2, 5), (2, 17)]
CAUSAL_PAIRS = [("The capital of France is", "Paris"), ("Rome is the capital of", "Italy and more"),
                ("The dog", "runs"), ("The capital of France is", "Paris")]   # a repeat shares rows
MASKED_PAIRS = [("The capital of france is [MASK] .", "paris"), ("[MASK] is a city .", "paris city"),
                ("the dog [MASK] .", "runs")]


@torch.no_grad()
def _slow(lm, spec, neurons=None, factor=0.0, where="read"):
    """One unpadded forward per teacher-forced query; neurons scaled at that query's read position
    (``where="read"``), at the input's last token ("last") or everywhere ("all")."""
    logps, argmax = [], []
    for q in spec.queries:
        ids = torch.tensor([q.input_ids])
        if neurons:
            pos = {"read": [q.position], "last": [len(q.input_ids) - 1], "all": None}[where]
            with ku.enhance(lm, neurons, factor, positions=pos):
                logits = lm.model(input_ids=ids).logits[0, q.position]
        else:
            logits = lm.model(input_ids=ids).logits[0, q.position]
        lsm = logits.float().log_softmax(-1)
        logps.append(float(lsm[q.target_id]))
        argmax.append(int(lsm.argmax()))
    return logps, argmax


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
def test_scorer_matches_one_forward_per_query(tiny, family):
    lm = tiny(family)
    pairs = MASKED_PAIRS if lm.arch.is_masked_lm else CAUSAL_PAIRS
    specs = [tg.prepare(lm, p, t) for p, t in pairs]
    assert any(len(s.target_ids) > 1 for s in specs)   # teacher forcing is exercised
    for neurons, factor in ((None, 0.0), (NEURONS, 0.0), (NEURONS, 2.5)):
        fast = score_targets(lm, pairs, neurons=neurons, factor=factor, batch_size=2)
        for spec, got in zip(specs, fast):
            logps, argmax = _slow(lm, spec, neurons, factor)
            assert got.target_ids == spec.target_ids
            assert got.log_probs == pytest.approx(logps, abs=2e-5)
            assert got.argmax == tuple(argmax)
            assert got.accuracy == sum(a == t for a, t in zip(argmax, spec.target_ids)) / len(argmax)
            assert got.logp == pytest.approx(sum(logps), abs=1e-4)
    plain = score_targets(lm, pairs)
    scaled = score_targets(lm, pairs, neurons=NEURONS, factor=0.0)
    assert any(a.log_probs != b.log_probs for a, b in zip(plain, scaled))   # the hook acted
    assert hook_count(lm.model) == 0


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_scale_at_last_and_all(tiny, family):
    lm = tiny(family)
    pairs = MASKED_PAIRS if lm.arch.is_masked_lm else CAUSAL_PAIRS
    specs = [tg.prepare(lm, p, t) for p, t in pairs]
    queries = [q for s in specs for q in s.queries]
    for where in ("last", "all"):
        logp, argmax = read_queries(lm, queries, neurons=NEURONS, factor=3.0, scale_at=where,
                                    batch_size=3)
        slow = [_slow(lm, s, NEURONS, 3.0, where) for s in specs]
        assert logp.tolist() == pytest.approx([x for lp, _ in slow for x in lp], abs=2e-5)
        assert argmax.tolist() == [x for _, am in slow for x in am]


def test_target_functions_and_predict_agree(tiny):
    lm = tiny("llama")
    prompt, target = CAUSAL_PAIRS[1]
    spec = tg.prepare(lm, prompt, target)
    logps, _ = _slow(lm, spec)
    assert ku.target_log_probs(lm, prompt, target).tolist() == pytest.approx(logps, abs=2e-5)
    assert ku.target_probability(lm, prompt, target) == pytest.approx(math.exp(sum(logps)), rel=1e-4)
    top = ku.predict(lm, prompt, top_k=3)
    first = tg.prepare(lm, prompt, top[0][0]).target_ids[0] if top[0][0].strip() else None
    if first is not None and lm.tokenizer.decode([first]) == top[0][0]:
        assert ku.target_probability(lm, prompt, top[0][0]) == pytest.approx(top[0][1], rel=1e-4)
    # one place per name: the moved names are gone from their old modules (no silent forwards)
    from kn_utils import blimp_tasks
    from kn_utils.data import blimp
    from kn_utils.tracing import subject_span
    for old, names in ((blimp, ("accuracy", "pair_scores", "trace_items")),
                       (tg, ("logits_at", "predict", "target_log_probs", "target_probability"))):
        for name in names:
            assert not hasattr(old, name), f"{old.__name__}.{name} should be gone"
    assert subject_span is tg.subject_span and ku.blimp_accuracy is blimp_tasks.blimp_accuracy


def test_scorer_bad_inputs_leave_no_hooks(tiny):
    lm = tiny("llama")
    with pytest.raises(ValueError, match="neuron 9999 out of range"):
        score_targets(lm, CAUSAL_PAIRS, neurons=[(0, 9999)])
    with pytest.raises(ValueError, match="scale_at"):
        score_targets(lm, CAUSAL_PAIRS, neurons=NEURONS, scale_at="middle")
    with pytest.raises(ValueError, match="factor must be a finite number"):
        score_targets(lm, CAUSAL_PAIRS, neurons=NEURONS, factor=float("nan"))
    with pytest.raises(ValueError, match="batch_size"):
        score_targets(lm, CAUSAL_PAIRS, batch_size=0)
    with pytest.raises(ValueError, match="not a single one"):
        score_targets(lm, ("The dog", "runs"))
    with pytest.raises(ValueError, match=r"an item is a \(prompt, target\) pair"):
        score_targets(lm, ["The dog runs"])
    assert hook_count(lm.model) == 0


def test_prepared_target_is_passed_through(tiny):
    lm = tiny("bert")
    spec = tg.prepare(lm, "The capital of france is [MASK] .", "paris")
    assert tg.prepare(lm, "The capital of france is [MASK] .", spec) is spec
    assert tg.prepare(lm, spec.prompt, spec) is spec
    with pytest.raises(ValueError, match="prepared target was made for the prompt"):
        tg.prepare(lm, "the dog [MASK] .", spec)


def test_find_knowledge_neurons_prepares_each_pair_once(tiny, monkeypatch):
    lm = tiny("llama")
    calls = []
    real = tg._prepare_causal

    def counting(lm_, prompt, target, p_ids):
        calls.append((prompt, target))
        return real(lm_, prompt, target, p_ids)
    monkeypatch.setattr(tg, "_prepare_causal", counting)
    prompts = ["The capital of France is", "Paris is the capital of"]
    ku.find_knowledge_neurons(lm, prompts, "France", steps=2, progress=False,
                              negative_prompts=["The dog"], negative_targets="runs")
    assert sorted(calls) == sorted([(p, "France") for p in prompts] + [("The dog", "runs")])


# ---------------------------------------------------------------------------- the scaling hook
@torch.no_grad()
@pytest.mark.parametrize("family", ["gpt2", "opt", "bert"])   # OPT: MLP on [batch*positions, width]
def test_scale_neurons_writes_exactly_the_selection(tiny, family):
    """Recorded before and after the scaling hook in one forward: every entry of every layer is the
    input times its factor where selected and unchanged elsewhere (per-row positions and factors,
    shared positions / rows)."""
    lm = tiny(family)
    texts = ("The capital of france is [MASK] .", "the dog [MASK] .", "[MASK] is a city .") \
        if lm.arch.is_masked_lm else ("The capital of France is", "The dog", "Rome is the capital")
    ids, mask = tg.pad_batch(lm, [tg.prompt_ids(lm, t) for t in texts])
    width = ids.shape[1]
    pos, factors = torch.tensor([4, 1, 0]), torch.tensor([0.0, 2.0, -1.5])
    cases = [
        (dict(factor=factors, row_positions=pos), lambda b, p: float(factors[b]) if p == pos[b] else 1.0),
        (dict(factor=3.0, row_positions=pos), lambda b, p: 3.0 if p == pos[b] else 1.0),
        (dict(factor=factors, positions=[0, 2]), lambda b, p: float(factors[b]) if p in (0, 2) else 1.0),
        (dict(factor=0.5, positions=-1, rows=[1]), lambda b, p: 0.5 if (b, p) == (1, width - 1) else 1.0),
    ]
    for kwargs, factor_at in cases:
        with record(lm, "neurons") as before, scale_neurons(lm, NEURONS, **kwargs), \
                record(lm, "neurons") as after:
            lm.model(input_ids=ids, attention_mask=mask)
        for layer in range(lm.arch.n_layers):
            assert after[layer].shape == (3, width, lm.arch.n_neurons)
            expected = before[layer].clone()
            for l_, n in NEURONS:
                if l_ == layer:
                    for b in range(3):
                        for p in range(width):
                            expected[b, p, n] = before[layer][b, p, n] * factor_at(b, p)
            assert torch.equal(after[layer], expected), (kwargs, layer)
    assert hook_count(lm.model) == 0


def test_scale_neurons_bad_inputs(tiny):
    lm = tiny("llama")
    ids = torch.tensor([tg.prompt_ids(lm, "The dog runs")])
    with pytest.raises(ValueError, match="either row_positions"):
        with scale_neurons(lm, NEURONS, 0.0, positions=[0], row_positions=torch.tensor([0])):
            pass
    with pytest.raises(TypeError, match="row_positions must be an integer tensor"):
        with scale_neurons(lm, NEURONS, 0.0, row_positions=torch.tensor([0.5])):
            pass
    with pytest.raises(ValueError, match="1-D"):
        with scale_neurons(lm, NEURONS, torch.ones(2, 2)):
            pass
    with pytest.raises(TypeError, match="factor must be a number"):
        with scale_neurons(lm, NEURONS, "2"):
            pass
    with pytest.raises(ValueError, match="row_positions has 2 entries but the batch has 1 rows"):
        with scale_neurons(lm, NEURONS, 0.0, row_positions=torch.tensor([0, 1])), torch.no_grad():
            lm.model(input_ids=ids)
    with pytest.raises(ValueError, match="factor has 3 entries"):
        with scale_neurons(lm, NEURONS, torch.ones(3)), torch.no_grad():
            lm.model(input_ids=ids)
    assert hook_count(lm.model) == 0


# ---------------------------------------------------------------------------- Table 1
def test_table1_headline_is_accuracy_and_kn_rows_have_no_paper_numbers():
    def frame(editor):
        df = pd.DataFrame({"editor": editor, "relation": "P36", "known": [True, False],
                           "reliability_acc": [1.0, 0.5], "reliability_prob": [1.0, 0.0],
                           "generality_acc": [0.5, 0.5], "generality_prob": [1.0, 1.0],
                           "locality_acc": [1.0, 1.0], "locality_prob": [0.0, 1.0],
                           "symmetry_acc": [0.0, 0.5], "symmetry_prob": [1.0, 0.0],
                           "symmetry_acc_pre": [0.0, 0.0], "symmetry_prob_pre": [0.0, 1.0]})
        df.attrs["n_skipped"] = 0
        return df
    table = ku.summarize_edits({"rome": frame("rome"), "kn": frame("kn")}, print_table=False)
    cols = list(table.columns)
    for metric in ("reliability", "generality", "locality", "criterion"):
        assert cols.index(f"{metric}_acc") + 1 == cols.index(f"{metric}_prob")
    assert cols.index("reliability_acc") < cols.index("reliability_prob") < cols.index("generality_acc")
    rome = table[(table.editor == "rome") & (table.subset == "all")].iloc[0]
    assert rome["reliability_acc"] == 75.0 and rome["reliability_prob"] == 50.0
    assert rome["criterion_acc"] == 25.0 and rome["criterion_prob_pre"] == 50.0
    assert rome["paper_gpt2-xl_reliability"] == 99.79
    kn = table[table.editor == "kn"]
    assert len(kn) == 2 and kn.filter(like="paper_").isna().all().all()


def test_rome_reads_the_subject_where_subject_span_ends(tiny):
    """targets.subject_span is the one span function: ROME's rows read the last token of the
    subject's first occurrence after the generated prefix, even when the prefix holds the subject."""
    from kn_utils.editing.rome import compute

    for family in ("llama", "gpt2", "bert"):
        lm = tiny(family)
        if lm.arch.is_masked_lm:
            prompt, subject, template = "the capital of france is [MASK] .", "france", "france and paris . {}"
        else:
            prompt, subject, template = ("The Eiffel Tower is in Paris", "Eiffel Tower",
                                         "Eiffel Tower and more. {}")
        row = compute._rows(lm, template, prompt, subject, None)[0]
        text = tg.check_prompt(lm, template.format(prompt))
        _, (_, end) = tg.subject_span(lm, text, subject, start=template.index("{}"))
        _, (_, first_end) = tg.subject_span(lm, text, subject)
        assert row.subject_index == end - 1, family
        assert first_end - 1 < row.subject_index, family   # the prefix's occurrence is skipped
