"""ROME in two steps (rome_compute, apply_rome), v* steps from the edited layer, v* of several
requests in one batch: each checked against the one-call / plain path on the same inputs."""
import pytest
import torch

import kn_utils as ku
from kn_utils.editing import rome
from kn_utils.editing.rome import ROMEHyperParams, ROMEUpdate, apply_rome, compute, rome_compute, rome_edit
from kn_utils.hooks import grad_ready
from tiny_models import assert_same, snapshot

FAMILIES = ["llama", "gpt2", "gemma3", "opt", "gpt_neox", "qwen2"]
TEMPLATES = ["{}", "Once upon a time. {}", "It is. {}", "A long story of the old days began. {}"]
REQUESTS = [("The capital of France is", "France", "Rome ville"), ("Paris is the capital city of", "Paris", "Berlin"),
            ("The dog of the old man sees", "dog", "cats"), ("London is in", "London", "Canada")]


def small_hp(**kw):
    base = dict(layer=1, v_num_grad_steps=4, context_template_length_params=[[3, 2]],
                mom2_adjustment=False, mom2_n_samples=600, mom2_sample="tokens", mom2_dataset="wikitext")
    base.update(kw)
    return ROMEHyperParams(**base)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_compute_then_apply_equals_rome_edit(tiny, tmp_cache, family):
    lm = tiny(family)
    prompt = "The capital of France is" + (" [MASK]." if family == "bert" else "")
    snap = snapshot(lm)
    hp = small_hp()
    edit = rome_edit(lm, prompt, "France", "Rome", hp)
    edited = {name: p.detach().clone() for name, p in lm.model.named_parameters()}
    edit.restore()
    assert_same(lm, snap)
    updates = rome_compute(lm, [(prompt, "France", "Rome")], hp)
    assert_same(lm, snap)                          # computing applies nothing
    assert len(updates) == 1 and isinstance(updates[0], ROMEUpdate)
    assert torch.equal(updates[0].u, edit.u) and torch.equal(updates[0].lam, edit.lam)
    assert torch.equal(updates[0].v_star, edit.v_star)
    two_step = apply_rome(lm, updates)
    for name, p in lm.model.named_parameters():   # bit for bit the one-call edit
        assert torch.equal(p, edited[name]), name
    assert two_step.delta_norm == edit.delta_norm and two_step.layer == edit.layer
    two_step.restore()
    assert_same(lm, snap)
    assert ku.hook_count(lm.model) == 0


def test_several_updates_are_one_restorable_edit(tiny, tmp_cache):
    lm = tiny("llama")
    snap = snapshot(lm)
    hp = small_hp()
    requests = [{"prompt": p, "subject": s, "target_new": t} for p, s, t in REQUESTS[:3]]
    updates = rome_compute(lm, requests, hp)
    assert [u.request.subject for u in updates] == ["France", "Paris", "dog"]
    # applied one by one in order: the same weights as the one edit of all three
    singles = [apply_rome(lm, u) for u in updates]
    stepwise = {name: p.detach().clone() for name, p in lm.model.named_parameters()}
    for e in reversed(singles):
        e.restore()
    assert_same(lm, snap)
    with apply_rome(lm, updates) as edit:
        assert edit.updates == updates and edit.delta_norm > 0
        for name, p in lm.model.named_parameters():
            assert torch.equal(p, stepwise[name]), name
        with pytest.raises(ValueError, match="one update"):
            edit.update_matrix()
    assert_same(lm, snap)


def test_bad_requests_fail_before_compute(tiny, tmp_cache, monkeypatch):
    lm = tiny("llama")
    monkeypatch.setattr(compute, "compute_values", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(ValueError, match="subject 'Rome' not in prompt"):
        rome_compute(lm, [REQUESTS[0], ("The capital of France is", "Rome", "Paris")], small_hp())
    with pytest.raises(ValueError, match="missing"):
        rome_compute(lm, [{"prompt": "The capital of France is", "subject": "France"}], small_hp())
    with pytest.raises(ValueError, match="at least one request"):
        rome_compute(lm, [], small_hp())
    with pytest.raises(ValueError, match="ROMEUpdate"):
        apply_rome(lm, [])


def _counting_block0(lm, monkeypatch):
    """Calls of block 0's own forward (a replayed block does not call it)."""
    calls = []
    cls = type(lm.arch.blocks[0])
    real = cls.forward

    def counted(self, *args, **kwargs):
        if self is lm.arch.blocks[0]:
            calls.append(1)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(cls, "forward", counted)
    return calls


@pytest.mark.parametrize("family", FAMILIES + ["bert"])
@pytest.mark.parametrize("loss_layer", [None, 1])
def test_v_star_from_the_edited_layer_matches_every_block(tiny, family, loss_layer, monkeypatch):
    """Steps that replay the first step's input to the edited layer give the v* of steps that run
    every block (suffix path for causal LMs, every position for BERT)."""
    lm = tiny(family)
    if family == "bert" and loss_layer is not None:
        pytest.skip("BERT reads logits at the last layer only")
    templates, prompt = (["{}"], "The capital of France is [MASK].") if family == "bert" \
        else (TEMPLATES, "The capital of France is")
    hp = small_hp(layer=1, v_num_grad_steps=6, v_loss_layer=loss_layer).resolve(lm)
    calls = _counting_block0(lm, monkeypatch)
    results = {}
    with grad_ready(lm.model):
        for from_layer in (False, True):
            calls.clear()
            results[from_layer] = compute.compute_v(lm, hp, templates, prompt, "France", "Rome ville",
                                                    from_layer=from_layer)
            results[from_layer][2]["block0_calls"] = len(calls)
    (v_all, init_all, info_all), (v_fast, init_fast, info_fast) = results[False], results[True]
    assert info_fast["from_layer"] and not info_all["from_layer"]
    # one forward per loss (+ the suffix path's prefix cache): all but the first skip block 0
    assert info_all["block0_calls"] - info_fast["block0_calls"] == info_all["steps"] > 0
    assert info_fast["steps"] == info_all["steps"]
    assert torch.allclose(init_fast, init_all, rtol=0, atol=1e-6 * init_all.norm().item())
    assert ((v_fast - v_all).norm() / v_all.norm()).item() <= 1e-5
    assert max(abs(a - b) for a, b in zip(info_fast["nll"], info_all["nll"])) <= 1e-5
    assert ku.hook_count(lm.model) == 0 and "forward" not in vars(lm.arch.blocks[0])


def _early_stop_between(lm, hp, requests):
    """An early-stop loss at which the requests stop after different numbers of steps (alone)."""
    probe = [compute.compute_v(lm, hp, TEMPLATES, *r) for r in requests]
    finals = sorted(info["nll"][2] for _, _, info in probe)
    return (finals[0] + finals[1]) / 2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("loss_layer", [None, 1])
def test_v_star_of_a_batch_matches_one_at_a_time(tiny, family, loss_layer):
    lm = tiny(family)
    hp = small_hp(layer=1, v_num_grad_steps=8, v_loss_layer=loss_layer).resolve(lm)
    with grad_ready(lm.model):
        hp.early_stop_loss = _early_stop_between(lm, hp, REQUESTS)
        alone = [compute.compute_v(lm, hp, TEMPLATES, *r) for r in REQUESTS]
        together = compute.compute_values(lm, hp, TEMPLATES, REQUESTS)
    steps = [info["steps"] for _, _, info in alone]
    assert len(set(steps)) > 1, steps              # the per-request early stop is exercised
    if loss_layer is not None:
        # an early read-out layer is computed one request at a time (see compute_values): exact
        for (v1, i1, _), (v2, i2, info2) in zip(alone, together):
            assert torch.equal(v1, v2) and torch.equal(i1, i2) and info2["batch"] == 1
        return
    # a request that stopped leaves the batch: the next forward runs only the others' rows
    n_rows = together[0][2]["rows_per_step"][0]
    for (_, _, info1), (_, _, info2) in zip(alone, together):
        rows = info2["rows_per_step"]
        assert len(rows) == len(info1["nll"]) and rows[0] == n_rows
        assert all(later <= earlier for earlier, later in zip(rows, rows[1:]))
        alive = [sum(len(info["nll"]) > step for _, _, info in alone) for step in range(len(rows))]
        assert [n_rows * a // len(REQUESTS) for a in alive] == rows, (rows, alive)
    assert min(info["rows_per_step"][-1] for _, _, info in together) < n_rows
    for (v1, i1, info1), (v2, i2, info2) in zip(alone, together):
        assert info2["batch"] == len(REQUESTS) and info2["steps"] == info1["steps"]
        assert ((i2 - i1).norm() / i1.norm()).item() <= 1e-5
        assert ((v2 - v1).norm() / v1.norm()).item() <= 1e-4
        assert max(abs(a - b) for a, b in zip(info1["nll"], info2["nll"])) <= 1e-4


def test_rome_compute_batches_several_requests(tiny, tmp_cache):
    lm = tiny("qwen2")
    hp = small_hp(v_num_grad_steps=5)
    batched = rome_compute(lm, REQUESTS, hp)
    assert all(u.info["batch"] == len(REQUESTS) for u in batched)
    for request, update in zip(REQUESTS, batched):
        alone = rome_compute(lm, [request], hp)[0]
        assert alone.info["batch"] == 1
        assert ((update.v_star - alone.v_star).norm() / alone.v_star.norm()).item() <= 1e-4
        assert torch.equal(update.k_star, alone.k_star)
        assert torch.allclose(update.lam, alone.lam, rtol=1e-3, atol=1e-4 * alone.lam.norm().item())
