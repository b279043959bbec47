"""KN interventions (suppress / enhance) and KN weight edits (Dai's update, erasure)."""
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from kn_utils.attribution import integrated_gradients
from kn_utils.editing.kn import (first_token_id, intervene, intervention_summary, kn_edit, kn_erase,
                                 measure_intervention)
from kn_utils.hooks import enhance, hook_count, record, suppress
from kn_utils.scoring import target_probability
from kn_utils.targets import prepare, prompt_ids, read_position

CAUSAL = ["The capital of France is", "Paris is the capital city of the country"]
MASKED = ["The capital of [MASK] is paris .", "[MASK] is the city ."]
NEURONS = [(0, 3), (2, 10), (2, 11)]


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_params_equal(model, snap, except_names=()):
    for name, p in model.named_parameters():
        if name not in except_names:
            assert torch.equal(p, snap[name]), name


def test_intervene_changes_only_chosen_neurons(tiny):
    lm = tiny("llama")
    ids = torch.tensor([prompt_ids(lm, CAUSAL[1])])
    pos = torch.tensor([4])
    for factor in (0.0, 2.0):
        with record(lm, "neurons") as before, intervene(lm, NEURONS, factor, pos), \
                record(lm, "neurons") as after, torch.no_grad():
            lm.model(input_ids=ids)
        for layer in range(lm.arch.n_layers):
            expected = before[layer].clone()
            for l_, n in NEURONS:
                if l_ == layer:
                    expected[0, 4, n] *= factor
            assert torch.equal(after[layer], expected)
            assert not torch.equal(after[layer], before[layer]) or layer == 1
    assert hook_count(lm.model) == 0


def _reference(lm, prompts, tokens, neurons, hook):
    rows = []
    for prompt in prompts:
        ids = prompt_ids(lm, prompt)
        r = read_position(lm, ids)
        with torch.no_grad():
            pre = lm.model(input_ids=torch.tensor([ids])).logits[0, r].softmax(-1)
            with hook(lm, neurons, positions=r):
                post = lm.model(input_ids=torch.tensor([ids])).logits[0, r].softmax(-1)
        for t in tokens:
            tid = prepare(lm, prompt, t).target_ids[0]
            rows.append((float(pre[tid]), float(post[tid])))
    return np.array(rows)


@pytest.mark.parametrize("family,prompts,tokens", [
    ("gpt2", CAUSAL, ["Paris", "France", "New York"]),
    ("llama", CAUSAL, ["Paris", " city"]),
    ("bert", MASKED, ["france", "paris", "city"]),
])
def test_measure_intervention_matches_per_prompt_hooks(tiny, family, prompts, tokens):
    lm = tiny(family)
    for mode, hook in (("suppress", suppress), ("enhance", enhance)):
        df = measure_intervention(lm, prompts, tokens, NEURONS, mode=mode, batch_size=2)
        assert list(df.columns) == ["prompt", "token", "token_id", "pre", "post"]
        assert len(df) == len(prompts) * len(tokens)
        ref = _reference(lm, prompts, tokens, NEURONS, hook)
        np.testing.assert_allclose(df[["pre", "post"]].to_numpy(), ref, rtol=1e-4, atol=1e-9)
        assert (df["pre"] != df["post"]).any()
    one = [t for t in tokens if len(prepare(lm, prompts[0], t).target_ids) == 1][0]
    row = df[(df.prompt == prompts[0]) & (df.token == one)].iloc[0]
    assert row.pre == pytest.approx(target_probability(lm, prompts[0], one), rel=1e-4)
    assert hook_count(lm.model) == 0


def test_measure_intervention_bad_inputs(tiny):
    lm = tiny("gpt2")
    for kwargs, match in [
        (dict(prompts=[], tokens=["a"], neurons=NEURONS), "no prompts"),
        (dict(prompts=CAUSAL, tokens=[], neurons=NEURONS), "no tokens"),
        (dict(prompts=CAUSAL, tokens=["a"], neurons=[]), "no neurons"),
        (dict(prompts=CAUSAL, tokens=["a"], neurons=[(9, 0)]), "layer 9"),
        (dict(prompts=CAUSAL, tokens=["a"], neurons=[(0, 999)]), "neuron 999"),
        (dict(prompts=CAUSAL, tokens=[" "], neurons=NEURONS), "empty target"),
        (dict(prompts=["", "x"], tokens=["a"], neurons=NEURONS), "empty prompt"),
        (dict(prompts=CAUSAL, tokens=["a"], neurons=NEURONS, mode="zero"), "mode"),
        (dict(prompts=CAUSAL, tokens=["a"], neurons=NEURONS, positions=3), "positions"),
    ]:
        with pytest.raises(ValueError, match=match):
            measure_intervention(lm, **kwargs)
    assert hook_count(lm.model) == 0


def test_intervention_summary():
    pre = [0.1, 0.2, 0.3, 0.5, 0.6, 0.4]
    post = [0.05, 0.1, 0.2, 0.6, 0.9, 0.5]
    df = pd.DataFrame({"prompt": list("abcabc"), "token": ["x"] * 3 + ["y"] * 3,
                                         "pre": pre, "post": post})
    s = intervention_summary(df)
    assert list(s.token) == ["x", "y"]
    x = s.iloc[0]
    assert x.pre_mean == pytest.approx(0.2) and x.post_mean == pytest.approx(0.35 / 3)
    assert x.rel_change == pytest.approx((0.35 / 3 - 0.2) / (0.35 / 3))
    test = stats.ttest_ind(pre[:3], post[:3])
    assert x.t == pytest.approx(test.statistic) and x.p == pytest.approx(test.pvalue) and x.n == 3
    y = s.iloc[1]
    assert y.rel_change == pytest.approx((2.0 / 3 - 0.5) / 0.5)


def test_first_token_id_leading_space(default_lm):
    lm = default_lm
    tid = first_token_id(lm, "Paris")
    assert tid == first_token_id(lm, " Paris")
    assert tid == prepare(lm, "The capital of France is", "Paris").target_ids[0]
    assert lm.tokenizer.decode([tid]) == " Paris"


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_kn_edit_changes_exactly_the_slots_and_restores(tiny, family):
    lm = tiny(family)
    old_t, new_t = ("france", "paris") if lm.arch.is_masked_lm else ("Paris", "Rome")
    snap = snapshot(lm.model)
    names = {p: n for n, p in lm.model.named_parameters()}
    edited = {names[lm.arch.mlp_out[layer].weight] for layer, _ in NEURONS}
    emb = lm.arch.embed.weight.detach()
    e_old, e_new = emb[first_token_id(lm, old_t)], emb[first_token_id(lm, new_t)]

    edit = kn_edit(lm, NEURONS + [NEURONS[0]], old_t, new_t, lambda1=1.0, lambda2=8.0)
    assert edit.applied
    assert_params_equal(lm.model, snap, except_names=edited)
    for layer in {l_ for l_, _ in NEURONS}:
        slots = lm.arch.value_slots(layer)
        before = snap[names[lm.arch.mlp_out[layer].weight]]
        before = before if slots.shape == before.shape else before.T
        for n in range(lm.arch.n_neurons):
            if (layer, n) in NEURONS:   # a repeated neuron is edited once
                torch.testing.assert_close(slots[n], before[n] - e_old + 8.0 * e_new)
            else:
                assert torch.equal(slots[n], before[n])
    edit.restore()
    assert_params_equal(lm.model, snap)
    edit.restore()  # idempotent
    assert_params_equal(lm.model, snap)


def test_kn_erase_and_exception_inside_with(tiny):
    lm = tiny("gpt2")
    snap = snapshot(lm.model)
    with pytest.raises(RuntimeError, match="inside"):
        with kn_erase(lm, NEURONS):
            for layer, n in NEURONS:
                assert torch.count_nonzero(lm.arch.value_slots(layer)[n]) == 0
            assert snap["transformer.h.0.mlp.c_proj.weight"][3].abs().sum() > 0  # GPT-2: [in, out]
            raise RuntimeError("failure inside the with body")
    assert_params_equal(lm.model, snap)
    with pytest.raises(RuntimeError):
        with kn_edit(lm, NEURONS, "Paris", "Rome"):
            raise RuntimeError("again")
    assert_params_equal(lm.model, snap)


def test_kn_edit_bad_inputs_leave_weights(tiny):
    lm = tiny("llama")
    snap = snapshot(lm.model)
    for args, match in [((NEURONS, "", "Rome"), "empty target_old"),
                        ((NEURONS, "Paris", " "), "empty target_new"),
                        (([(0, 3), (7, 0)], "Paris", "Rome"), "layer 7"),
                        (([(0, 64)], "Paris", "Rome"), "neuron 64"),
                        (([], "Paris", "Rome"), "no neurons"),
                        (([5], "Paris", "Rome"), "pair")]:
        with pytest.raises(ValueError, match=match):
            kn_edit(lm, *args)
    with pytest.raises(ValueError, match="no neurons"):
        kn_erase(lm, [])
    assert_params_equal(lm.model, snap)


def test_kn_edit_moves_probability_on_default_model(default_lm):
    """The update pushes the residual towards e(new): P(new) rises, P(old) falls (tied embeddings)."""
    lm, prompt = default_lm, "The capital of France is"
    acts = integrated_gradients(lm, prompt, "Paris", method="activation")
    top = acts[-4:].flatten().topk(4).indices
    neurons = [(lm.arch.n_layers - 4 + int(i) // lm.arch.n_neurons, int(i) % lm.arch.n_neurons)
               for i in top]
    p_old, p_new = target_probability(lm, prompt, "Paris"), target_probability(lm, prompt, "Rome")
    snap = snapshot(lm.model)
    with kn_edit(lm, neurons, "Paris", "Rome"):
        q_old, q_new = target_probability(lm, prompt, "Paris"), target_probability(lm, prompt, "Rome")
    assert q_new > p_new and q_old < p_old
    assert_params_equal(lm.model, snap)
