import pytest
import torch

import kn_utils as ku
from kn_utils.editing.base import WeightEdit
from kn_utils.editing import rome
from kn_utils.editing.rome import ROMEEdit, ROMEHyperParams, layer_stats, model_key, rome_edit
from tiny_models import snapshot, assert_same


@pytest.fixture
def stats_passes(monkeypatch):
    """A spy: one entry per statistics pass over the corpus (a cache hit reads no corpus)."""
    calls, real = [], rome.stats._corpus_texts
    monkeypatch.setattr(rome.stats, "_corpus_texts", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def small_hp(**kw):
    base = dict(layer=1, v_num_grad_steps=4, context_template_length_params=[[3, 2]],
                mom2_adjustment=False, mom2_n_samples=600, mom2_sample="tokens", mom2_dataset="wikitext")
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
    # the edited projection maps k0 (ROME's code; k* before this became the default) to v* exactly
    # (up to float32 rounding)
    module = lm.arch.mlp_out[edit.layer]
    with torch.no_grad():
        out = module(edit.k0[None]).reshape(-1)
    assert torch.allclose(out, edit.v_star, atol=1e-3 * edit.v_star.norm().item())
    edit.restore()
    assert_same(lm, snap)
    assert ku.predict(lm, prompt, 1)[0][0] != " Rome"
    # the same update as a context manager, leaving through an exception
    again = ROMEEdit(lm, edit.request, edit.hparams, edit.u, edit.lam, edit.k_star, edit.v_star,
                     edit.v_init, edit.info, k0=edit.k0, v0=edit.v0)
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
def test_formula_update_matches_reference(tiny, tmp_cache, data_dir, family, mom2):
    """update="formula": the paper's formula literally, Ŵ k* = v* (the default before ROME's code's)."""
    lm = tiny(family)
    hp = small_hp(mom2_adjustment=mom2, mom2_sample="tokens", update="formula")
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


def test_covariance_cache_hit(tiny, tmp_cache, data_dir, stats_passes):
    lm = tiny("llama")
    first = layer_stats(lm, 0, "wikitext", 200, data_dir=data_dir, progress=False)
    assert len(stats_passes) == 1
    path = rome.stats_path(lm, 0, "wikitext", 200)
    assert path.exists() and str(path).startswith(str(tmp_cache / "stats"))
    mtime = path.stat().st_mtime_ns
    second = layer_stats(lm, 0, "wikitext", 200, data_dir=data_dir, progress=False)
    assert len(stats_passes) == 1 and path.stat().st_mtime_ns == mtime
    assert torch.equal(first, second)
    # a different sample count or layer is a different entry
    layer_stats(lm, 0, "wikitext", 100, data_dir=data_dir, progress=False)
    assert len(stats_passes) == 2
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
    with pytest.raises(ValueError, match="configuration 'cov'.*'paper'.*'rome'"):
        ROMEHyperParams.preset("gpt2-xl", "cov")


@pytest.mark.parametrize("name", ["gpt2-xl", "llama-2-7b", "default", "gemma-3-270m"])
def test_presets_paper_and_rome(name):
    """The paper's configuration (its hparams/ROME/*.yaml: C off) is the default; ROME's turns C on
    over 100,000 random texts; both share every other setting."""
    paper, published = ROMEHyperParams.preset(name), ROMEHyperParams.preset(name, "rome")
    assert paper == ROMEHyperParams.preset(name, "paper")
    assert paper.mom2_adjustment is False and published.mom2_adjustment is True
    assert (published.mom2_n_samples, published.mom2_sample) == (100_000, "texts")
    assert paper.update == published.update == "rome_code"
    # Gemma's layer was swept per configuration (benchmarks/layer_sweep_gemma_paper.csv: covariance off)
    differ = {"mom2_adjustment"} | ({"layer"} if name == "gemma-3-270m" else set())
    assert {k: v for k, v in vars(paper).items() if k not in differ} == \
        {k: v for k, v in vars(published).items() if k not in differ}


def test_for_model_configs(tiny):
    lm = tiny("llama")
    assert ROMEHyperParams.for_model(lm).mom2_adjustment is False
    with pytest.warns(UserWarning, match=f"{rome.CPU_MOM2_TEXTS:,} random texts.*100,000"):
        hp = ROMEHyperParams.for_model(lm, "rome")
    assert hp.mom2_adjustment is True and hp.mom2_n_samples == rome.CPU_MOM2_TEXTS
    for name, value in (("update", "literal"), ("mom2_sample", "words")):
        with pytest.raises(ValueError, match=name):
            small_hp(**{name: value}).resolve(lm)


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
    monkeypatch.setattr(rome.compute, "compute_v", broken)
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


# ------------------------------------------------------------------------------------------ ROME's code
def _bare_key_and_output(lm, layer, prompt, subject):
    """ROME's ``get_module_input_output_at_word`` for the template "{}", written plainly: the input
    and output of the layer's output projection at the subject's last token of the bare prompt."""
    ids = lm.tokenizer(prompt)["input_ids"]
    last = len(lm.tokenizer(prompt[:prompt.index(subject) + len(subject)])["input_ids"]) - 1
    with ku.record(lm, "neurons", layer) as keys, ku.record(lm, "mlp_proj", layer) as outs, torch.no_grad():
        lm.model(torch.tensor([ids]))
    return keys[layer][0, last].double(), outs[layer][0, last].double()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mom2", [False, True])
def test_rome_code_update(tiny, tmp_cache, data_dir, family, mom2):
    """The default update is ROME's code's: the edited layer maps k0 (bare prompt) to v*, and ΔW is
    ROME's left vector C⁻¹k*/‖C⁻¹k*‖ times its compute_v right vector (v* − v0) / (k0 · left)."""
    lm = tiny(family)
    prompt, subject = "The capital of France is", "France"
    hp = small_hp(mom2_adjustment=mom2)
    assert hp.update == "rome_code"
    k0, v0 = _bare_key_and_output(lm, 1, prompt, subject)
    c = layer_stats(lm, 1, "wikitext", 600, data_dir=data_dir, progress=False) if mom2 else None
    module = lm.arch.mlp_out[1]
    with rome_edit(lm, prompt, subject, "Rome", hp, data_dir=data_dir) as edit:
        assert torch.allclose(edit.k0.double(), k0, rtol=1e-5, atol=1e-6)
        # after the edit the layer maps k0 to v* (float64 product of the stored float32 weights)
        w = module.weight.detach().double()
        bias = module.bias.detach().double() if getattr(module, "bias", None) is not None else 0.0
        out = (k0 @ w if type(module).__name__ == "Conv1D" else w @ k0) + bias
        v_star = edit.v_star.double()
        assert ((out - v_star).norm() / v_star.norm()).item() <= 1e-5
        # ROME's compute_u / compute_v, plainly
        k_star = edit.k_star.double()
        left = k_star if c is None else torch.linalg.solve(c.double(), k_star)
        left = left / left.norm()
        right = (v_star - v0) / torch.dot(k0, left)
        expected = torch.outer(left, right)                  # value slots: [n_neurons, d_model]
        got = edit.update_matrix()
        assert ((got - expected).norm() / expected.norm()).item() <= 1e-5
        # and it is not the formula's update: k* is not mapped to v* (the two rules differ here)
        out_star = (k_star @ w if type(module).__name__ == "Conv1D" else w @ k_star) + bias
        assert ((out_star - v_star).norm() / v_star.norm()).item() > 1e-4


# ------------------------------------------------------------------------------------------ record(stop=)
def test_record_stop_ends_the_forward_after_the_last_layer(tiny):
    lm = tiny("llama")
    ids = torch.tensor([lm.tokenizer("The capital of France is")["input_ids"]])
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(lm.arch.blocks)]
    try:
        with torch.no_grad(), ku.record(lm, "neurons", [0, 1]) as full:
            lm.model(ids)
        assert ran == [0, 1, 2]
        ran.clear()
        after = []
        with torch.no_grad(), ku.record(lm, "neurons", [0, 1], stop=True) as stopped:
            lm.model(ids)
            after.append("body went on")
        assert ran == [0] and after == []            # block 1 stopped in its MLP, block 2 never ran
    finally:
        for h in handles:
            h.remove()
    assert set(stopped) == {0, 1} and all(torch.equal(stopped[i], full[i]) for i in (0, 1))
    assert ku.hook_count(lm.model) == 0
    # an inner stop ends only its own record; the outer one saw what ran
    with torch.no_grad(), ku.record(lm, "neurons", 2) as outer:
        with ku.record(lm, "neurons", 0, stop=True) as inner:
            lm.model(ids)
    assert 0 in inner and 2 not in outer
    # ROME's keys come from the stopped forward
    keys = rome.layer_keys(lm, 1, ids, torch.ones_like(ids))
    assert torch.equal(keys, full[1]) and ku.hook_count(lm.model) == 0


# ------------------------------------------------------------------------------------------ ROME's sample
def test_layer_stats_over_random_texts_match_reference(tiny, tmp_cache, data_dir, stats_passes):
    """mom2_n_samples counts texts (ROME): a seeded random sample, each text truncated to the model's
    context, all its (non-special) tokens counted."""
    lm = tiny("gpt2")
    n_texts = 7
    fast = layer_stats(lm, 1, "wikitext", n_texts=n_texts, seed=3, data_dir=data_dir, batch_tokens=100,
                       progress=False)
    from kn_utils.data.text import load_texts
    texts = load_texts("wikitext", data_dir)
    chosen = torch.randperm(len(texts), generator=torch.Generator().manual_seed(3))[:n_texts].tolist()
    context = lm.arch.max_positions or 2048
    special = set(lm.tokenizer.all_special_ids)
    total, seen = torch.zeros(lm.arch.n_neurons, lm.arch.n_neurons, dtype=torch.float64), 0
    for i in chosen:
        ids = lm.tokenizer(texts[i])["input_ids"][:context]
        with ku.record(lm, "neurons", 1) as acts, torch.no_grad():
            lm.model(torch.tensor([ids]))
        for t, token in enumerate(ids):
            if token not in special:
                total += torch.outer(acts[1][0, t].double(), acts[1][0, t].double())
                seen += 1
    assert torch.allclose(fast.double(), total / seen, atol=1e-6, rtol=1e-4)
    assert len(stats_passes) == 1
    again = layer_stats(lm, 1, "wikitext", n_texts=n_texts, seed=3, data_dir=data_dir, progress=False)
    assert torch.equal(again, fast)
    assert len(stats_passes) == 1                           # read back, not recomputed
    other = layer_stats(lm, 1, "wikitext", n_texts=n_texts, seed=4, data_dir=data_dir, progress=False)
    assert len(stats_passes) == 2 and not torch.equal(other, fast)
    # the preset's way reaches the same statistics
    hp = small_hp(mom2_adjustment=True, mom2_sample="texts", mom2_n_samples=n_texts, seed=3)
    assert torch.equal(rome.effective_mom2(lm, hp.resolve(lm), data_dir=data_dir).c, fast.double())
    assert len(stats_passes) == 2


def test_covariance_without_a_corpus_fails_clearly(tiny, tmp_cache, monkeypatch):
    import sys
    lm = tiny("llama")
    monkeypatch.setattr("kn_utils.data.text.data_root", lambda data_dir=None: None)
    monkeypatch.setitem(sys.modules, "datasets", None)      # no `datasets` package either
    snap = snapshot(lm)
    hp = small_hp(mom2_adjustment=True, mom2_dataset="auto")
    with pytest.raises(ValueError, match=r"need a text corpus.*KN_DATA_DIR.*mom2_adjustment=False"):
        rome_edit(lm, "The capital of France is", "France", "Rome", hp)
    assert_same(lm, snap)
    assert ku.hook_count(lm.model) == 0
    # the paper's configuration needs no corpus
    rome_edit(lm, "The capital of France is", "France", "Rome", small_hp(mom2_dataset="auto")).restore()
    assert_same(lm, snap)


# ------------------------------------------------------------------------------------------ v* suffix path
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "opt", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("loss_layer", [None, 1])
def test_v_star_suffix_path_matches_full_forwards(tiny, family, loss_layer):
    """v*'s Adam steps over the positions from the first subject end on (the rest once into a KV
    cache, rows left-padded) give the v* of the plain loop that runs every position every step."""
    from kn_utils.editing.rome import compute

    lm = tiny(family)
    if not compute.suffix_supported(lm):
        pytest.skip(f"{family}: forward takes no position_ids")
    # prefixes of different lengths, so rows need padding and subject ends differ
    templates = ["{}", "Once upon a time. {}", "It is. {}", "A long story of the old days began. {}"]
    hp = small_hp(layer=1, v_num_grad_steps=6, v_loss_layer=loss_layer).resolve(lm)
    prompt, subject = "The capital of France is", "France"
    results = {}
    from kn_utils.hooks import grad_ready
    for suffix in (False, True):
        with grad_ready(lm.model):
            results[suffix] = compute.compute_v(lm, hp, templates, prompt, subject, "Rome ville",
                                                suffix=suffix)
    (v_full, init_full, info_full), (v_fast, init_fast, info_fast) = results[False], results[True]
    assert info_fast["suffix"] and not info_full["suffix"]
    assert info_fast["positions_per_step"] < info_full["positions_per_step"]
    assert ((init_fast - init_full).norm() / init_full.norm()).item() <= 1e-5
    assert ((v_fast - v_full).norm() / v_full.norm()).item() <= 1e-4
    assert info_fast["steps"] == info_full["steps"]
    assert max(abs(a - b) for a, b in zip(info_fast["nll"], info_full["nll"])) <= 1e-4


def test_v_star_suffix_refused_for_a_masked_lm(tiny):
    from kn_utils.editing.rome import compute
    from kn_utils.hooks import grad_ready

    lm = tiny("bert")
    hp = small_hp(layer=1).resolve(lm)
    with grad_ready(lm.model), pytest.raises(ValueError, match="suffix=True"):
        compute.compute_v(lm, hp, ["{}"], "The capital of France is [MASK].", "France", "Rome",
                          suffix=True)
