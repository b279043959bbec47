import pytest
import torch

import kn_utils as ku
from kn_utils.editing.base import WeightEdit
from kn_utils.editing import rome
from kn_utils.editing.rome import (ROMEEdit, ROMEHyperParams, STATS_COMPUTED, layer_stats, model_key,
                                   rome_edit)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KN_UTILS_CACHE", str(tmp_path))
    return tmp_path


def snapshot(lm):
    return {name: p.detach().clone() for name, p in lm.model.named_parameters()}


def assert_same(lm, snap):
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, snap[name]), name


def small_hp(**kw):
    base = dict(layer=1, v_num_grad_steps=4, context_template_length_params=[[3, 2]],
                mom2_adjustment=False, mom2_n_samples=600, mom2_dataset="wikitext")
    base.update(kw)
    return ROMEHyperParams(**base)


# ------------------------------------------------------------------------------------------ real model
def test_rome_flips_default_model_and_restores(default_lm):
    lm = default_lm
    prompt = "The capital of Canada is"
    assert ku.predict(lm, prompt, 1)[0][0] != " Rome"
    snap = snapshot(lm)
    # Fewer prefixes and steps than the preset to keep CPU time down; C = I (no corpus pass).
    hp = ROMEHyperParams.preset("default")
    hp.mom2_adjustment = False
    hp.context_template_length_params = [[5, 3]]
    hp.v_num_grad_steps = 12
    edit = rome_edit(lm, prompt, "Canada", "Rome", hp)
    assert isinstance(edit, WeightEdit)
    assert ku.hooks.hook_count(lm.model) == 0
    assert ku.predict(lm, prompt, 1)[0][0] == " Rome"
    assert edit.layer == hp.layer and edit.delta_norm > 0
    assert edit.request.subject == "Canada" and edit.request.target_new == "Rome"
    # the edited projection maps k* to v* exactly (up to float32 rounding)
    module = lm.arch.mlp_out[edit.layer]
    with torch.no_grad():
        out = module(edit.k_star[None]).reshape(-1)
    assert torch.allclose(out, edit.v_star, atol=1e-3 * edit.v_star.norm().item())
    edit.restore()
    assert_same(lm, snap)
    assert ku.predict(lm, prompt, 1)[0][0] != " Rome"
    # the same update as a context manager, leaving through an exception
    again = ROMEEdit(lm, edit.request, edit.hparams, edit.u, edit.lam, edit.k_star, edit.v_star,
                     edit.v_init, edit.info)
    with pytest.raises(RuntimeError, match="boom"):
        with again:
            assert ku.predict(lm, prompt, 1)[0][0] == " Rome"
            raise RuntimeError("boom")
    assert_same(lm, snap)
    assert all(p.requires_grad for p in lm.model.parameters())


# ------------------------------------------------------------------------------------------ formula
def _reference_update(lm, layer, k, v_star, mom2):
    """Explicit matrix math on the module's own weight orientation."""
    module = lm.arch.mlp_out[layer]
    w = module.weight.detach().double()
    bias = module.bias.detach().double() if getattr(module, "bias", None) is not None else 0.0
    k = k.double()
    c_inv = torch.inverse(mom2.double()) if mom2 is not None else torch.eye(k.numel(), dtype=torch.float64)
    ck = c_inv @ k
    if type(module).__name__ == "Conv1D":        # y = k W + b, W: [n_neurons, d_model]
        lam = (v_star.double() - (k @ w + bias)) / (ck @ k)
        return w + torch.outer(ck, lam)
    lam = (v_star.double() - (w @ k + bias)) / (ck @ k)   # nn.Linear: y = W k + b, W: [d_model, n_neurons]
    return w + torch.outer(lam, ck)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mom2", [False, True])
def test_update_matches_reference(tiny, tmp_cache, data_dir, family, mom2):
    lm = tiny(family)
    hp = small_hp(mom2_adjustment=mom2)
    module = lm.arch.mlp_out[1]
    before = module.weight.detach().clone()
    with rome_edit(lm, "The capital of France is", "France", "Rome", hp, data_dir=data_dir) as edit:
        c = layer_stats(lm, 1, "wikitext", 600, data_dir=data_dir) if mom2 else None
        original = module.weight.detach().clone()
        module.weight.data.copy_(before)
        expected = _reference_update(lm, 1, edit.k_star, edit.v_star, c)
        module.weight.data.copy_(original)
        assert torch.allclose(module.weight.double(), expected, atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            out = module(edit.k_star[None]).reshape(-1)
        assert torch.allclose(out, edit.v_star, atol=1e-4)
    assert torch.equal(module.weight, before)


def test_layer_stats_match_reference_loop(tiny, tmp_cache, data_dir):
    lm = tiny("gpt2")
    n_tokens, max_length = 300, 40
    fast = layer_stats(lm, 2, "wikitext", n_tokens, data_dir=data_dir, max_length=max_length,
                       batch_tokens=120, progress=False)
    # slow: one paragraph at a time, one token at a time
    from kn_utils.data.text import load_texts
    total, seen = torch.zeros(lm.arch.n_neurons, lm.arch.n_neurons, dtype=torch.float64), 0
    for text in load_texts("wikitext", data_dir):
        ids = lm.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) < 2:
            continue
        with ku.record(lm, "neurons", 2) as acts, torch.no_grad():
            lm.model(torch.tensor([ids]))
        for t in range(len(ids)):
            if seen == n_tokens:
                break
            k = acts[2][0, t].double()
            total += torch.outer(k, k)
            seen += 1
        if seen == n_tokens:
            break
    assert torch.allclose(fast.double(), total / seen, atol=1e-6, rtol=1e-4)


def test_covariance_cache_hit(tiny, tmp_cache, data_dir):
    lm = tiny("llama")
    start = STATS_COMPUTED["count"]
    first = layer_stats(lm, 0, "wikitext", 200, data_dir=data_dir, progress=False)
    assert STATS_COMPUTED["count"] == start + 1
    path = rome.stats_path(lm, 0, "wikitext", 200)
    assert path.exists() and str(path).startswith(str(tmp_cache / "stats"))
    mtime = path.stat().st_mtime_ns
    second = layer_stats(lm, 0, "wikitext", 200, data_dir=data_dir, progress=False)
    assert STATS_COMPUTED["count"] == start + 1 and path.stat().st_mtime_ns == mtime
    assert torch.equal(first, second)
    # a different sample count or layer is a different entry
    layer_stats(lm, 0, "wikitext", 100, data_dir=data_dir, progress=False)
    assert STATS_COMPUTED["count"] == start + 2
    # symmetric positive semi-definite
    assert torch.allclose(first, first.T) and torch.linalg.eigvalsh(first.double()).min() > -1e-6
    # different random weights, same name: a different cache key
    assert model_key(tiny("llama", seed=1)) != model_key(lm)


# ------------------------------------------------------------------------------------------ others
def test_masked_lm_and_loss_layer(tiny, tmp_cache):
    lm = tiny("bert")
    snap = snapshot(lm)
    # A random tiny BERT is nearly insensitive (p ≈ 1/vocab everywhere): check that the edit is
    # computed at the subject and applied, not that it succeeds.
    with rome_edit(lm, "paris is the capital of [MASK] .", "paris", "canada", small_hp(layer=0)) as edit:
        assert (edit.v_star - edit.v_init).norm() > 0
        assert not torch.equal(lm.arch.mlp_out[0].weight, snap[lm.arch.names["mlp_out"][0] + ".weight"])
    assert_same(lm, snap)
    lm = tiny("llama")
    snap = snapshot(lm)
    edit = rome_edit(lm, "The capital of France is", "France", "Rome", small_hp(layer=0, v_loss_layer=1))
    assert edit.hparams.v_loss_layer == 1
    edit.restore()
    assert_same(lm, snap)


def test_hparams():
    gpt = ROMEHyperParams.preset("gpt2-xl")
    assert (gpt.layer, gpt.v_lr, gpt.v_loss_layer, gpt.v_weight_decay, gpt.clamp_norm_factor,
            gpt.kl_factor, gpt.v_num_grad_steps) == (17, 0.5, 47, 0.5, 4.0, 0.0625, 20)
    llama = ROMEHyperParams.preset("llama-2-7b")
    assert (llama.layer, llama.v_num_grad_steps, llama.v_loss_layer, llama.v_weight_decay) == (5, 25, 31, 1e-3)
    assert ROMEHyperParams().context_template_length_params == [[5, 10], [10, 10]]
    with pytest.raises(ValueError, match="preset"):
        ROMEHyperParams.preset("gpt-5")


def test_for_model(tiny, default_lm):
    assert ROMEHyperParams.for_model(default_lm).layer == ROMEHyperParams.preset("default").layer
    hp = ROMEHyperParams.for_model(tiny("llama")).resolve(tiny("llama"))
    assert 0 <= hp.layer < 3 and hp.v_loss_layer == 2


def test_bad_inputs(tiny, tmp_cache):
    lm = tiny("llama")
    snap = snapshot(lm)
    hp = small_hp()
    cases = [("The capital of France is", "Germany", "Rome", "subject"),
             ("The capital of France is", "France", "", "target"),
             ("The capital of France is", "France", "   ", "target"),
             ("The capital of France is", "", "Rome", "subject"),
             ("", "France", "Rome", "prompt")]
    for prompt, subject, target, word in cases:
        with pytest.raises(ValueError, match=word):
            rome_edit(lm, prompt, subject, target, hp)
    with pytest.raises(ValueError, match="layer"):
        rome_edit(lm, "The capital of France is", "France", "Rome", small_hp(layer=7))
    with pytest.raises(ValueError, match="v_loss_layer"):
        rome_edit(lm, "The capital of France is", "France", "Rome", small_hp(layer=2, v_loss_layer=1))
    assert ku.hook_count(lm.model) == 0
    assert_same(lm, snap)


def test_failure_inside_leaves_model_clean(tiny, tmp_cache, monkeypatch):
    lm = tiny("llama")
    snap = snapshot(lm)

    def broken(*args, **kwargs):
        raise RuntimeError("optimiser exploded")
    monkeypatch.setattr(rome, "compute_v", broken)
    with pytest.raises(RuntimeError, match="exploded"):
        rome_edit(lm, "The capital of France is", "France", "Rome", small_hp())
    assert ku.hook_count(lm.model) == 0
    assert all(p.requires_grad for p in lm.model.parameters())
    assert_same(lm, snap)


def test_early_loss_layer_needs_a_plain_head(tiny):
    bert = tiny("bert")  # its head is a transform + decoder, not final norm + unembedding
    if bert.arch.final_norm is not None and bert.arch.unembed is not None:
        pytest.skip("this BERT layout exposes a final norm and an unembedding")
    with pytest.raises(ValueError, match="v_loss_layer"):
        small_hp(layer=0, v_loss_layer=0).resolve(bert)
    assert small_hp(layer=0).resolve(bert).v_loss_layer == bert.arch.n_layers - 1
