"""Integrated gradients: the fast batched path against a plain per-layer loop, completeness, inputs."""
import math

import pytest
import torch

from kn_utils.attribution import (attribution_maps, coarse_neurons, ig_alphas, ig_query,
                                  integrated_gradients, r2_similarity)
from kn_utils.hooks import hook_count, modify, record, scale_activation
from kn_utils.reference import reference_ig
from kn_utils.scoring import target_probability
from kn_utils.targets import prepare

MASKED_PROMPT = "The capital of [MASK] is paris ."
CAUSAL_PROMPT = "The capital of France is"


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def prompt_for(lm):
    return MASKED_PROMPT if lm.arch.is_masked_lm else CAUSAL_PROMPT


@pytest.mark.parametrize("family,target", [
    ("bert", "france"), ("bert", "francecity"),           # WordPiece: "france", "##c" ... multi-token
    ("gpt2", "Paris"), ("gpt2", "New York city"),
    ("llama", "Paris"), ("llama", "New York city"),
])
@pytest.mark.parametrize("points", ["linspace", "left"])
def test_fast_path_matches_reference_loop(tiny, family, target, points):
    lm = tiny(family)
    prompt = prompt_for(lm)
    n_tokens = len(prepare(lm, prompt, target).target_ids)
    assert (n_tokens > 1) == (target in ("francecity", "New York city"))
    ref = reference_ig(lm, prompt, target, steps=8, points=points)
    assert ref.abs().max() > 0
    fast = integrated_gradients(lm, prompt, target, steps=8, points=points)
    assert fast.shape == (lm.arch.n_layers, lm.arch.n_neurons) and fast.dtype == torch.float32
    assert rel_err(fast, ref) <= 1e-4
    # Chunks that split layers and steps unevenly, and the path without the KV cache.
    odd = integrated_gradients(lm, prompt, target, steps=8, points=points, batch_size=5, cache=False)
    assert rel_err(odd, ref) <= 1e-4
    assert hook_count(lm.model) == 0


@pytest.mark.parametrize("family", ["roberta", "gptj", "gpt_neox", "opt", "mistral", "qwen2",
                                    "gemma2", "gemma3", "phi3"])
def test_fast_path_matches_reference_other_families(tiny, family):
    lm = tiny(family)
    prompt = "The capital of <mask> is paris ." if lm.arch.is_masked_lm else CAUSAL_PROMPT
    ref = reference_ig(lm, prompt, "Paris" if not lm.arch.is_masked_lm else "France", steps=4)
    fast = integrated_gradients(lm, prompt, "Paris" if not lm.arch.is_masked_lm else "France",
                                steps=4, batch_size=6)
    assert rel_err(fast, ref) <= 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama", "phi3"])
def test_pre_activation_site_matches_reference(tiny, family):
    """The paper's original-code site (before the nonlinearity) through the same fast path."""
    lm = tiny(family)
    ref = reference_ig(lm, CAUSAL_PROMPT, "Paris", steps=4, site="pre_act")
    fast = integrated_gradients(lm, CAUSAL_PROMPT, "Paris", steps=4, site="pre_act", batch_size=6)
    assert fast.shape == ref.shape and rel_err(fast, ref) <= 1e-4
    # Really a different site (IG maps of tiny random models can nearly agree: silu(αg) ≈ α silu(g)).
    pre = integrated_gradients(lm, CAUSAL_PROMPT, "Paris", site="pre_act", method="activation")
    post = integrated_gradients(lm, CAUSAL_PROMPT, "Paris", method="activation")
    assert rel_err(pre[:, :lm.arch.n_neurons], post) > 0.1


def test_default_model_matches_reference(default_lm):
    prompt, target = "Paris is the capital of", "France"
    layers = [0, 1, 15, 28, 29]  # first / late-expanded chunks; the loop is slow on all 30
    ref = reference_ig(default_lm, prompt, target, steps=4, layers=layers)
    fast = integrated_gradients(default_lm, prompt, target, steps=4, layers=layers, batch_size=6)
    assert rel_err(fast, ref) <= 1e-4
    full = integrated_gradients(default_lm, prompt, target, steps=4)
    assert rel_err(full[layers], ref[layers]) <= 1e-4
    assert hook_count(default_lm.model) == 0
    assert all(not p.grad_fn and p.requires_grad for p in default_lm.model.parameters())


def test_leading_space_and_multi_token_on_default_model(default_lm):
    lm, prompt = default_lm, "The capital of France is"
    layers = [27, 28, 29]
    a = integrated_gradients(lm, prompt, "Paris", steps=3, layers=layers)
    b = integrated_gradients(lm, prompt, " Paris", steps=3, layers=layers)
    assert torch.equal(a, b) and a[layers].abs().max() > 0
    assert a[:27].abs().max() == 0  # layers not asked for stay zero

    spec = prepare(lm, "The city is", "New York")
    assert len(spec.target_ids) == 2
    both = integrated_gradients(lm, "The city is", "New York", steps=3, layers=layers)
    first = integrated_gradients(lm, "The city is", "New", steps=3, layers=layers)
    second = integrated_gradients(lm, "The city is New", "York", steps=3, layers=layers)
    assert rel_err(both, (first + second) / 2) <= 1e-4
    assert rel_err(both, first) > 1e-2  # the second token really contributes


@pytest.mark.parametrize("family", ["gpt2", "bert"])
@pytest.mark.parametrize("points", ["left", "linspace"])
def test_completeness(tiny, family, points):
    """Sum of a layer's attributions ≈ P(target) − P(target | layer zeroed at the read position).

    Let g(α) = Σ_i w_i ∂P/∂w_i(α w); IG's exact value is ∫₀¹ g = ΔP.  With m points:
    left:     (1/m) Σ_{k<m} g(k/m)          = ∫g − (g(1) − g(0))/(2m) + O(1/m²)
    linspace: (1/m) Σ_k g(k/(m−1))          = ∫g + (g(0) + g(1) − 2∫g)/(2m) + O(1/m²)
    so we allow twice the first-order term (covering the O(1/m²) rest) plus fp32 rounding.
    """
    lm, m = tiny(family), 200
    prompt, target = (MASKED_PROMPT, "france") if family == "bert" else (CAUSAL_PROMPT, "Paris")
    q = prepare(lm, prompt, target).queries[0]
    layer = 1
    attr = integrated_gradients(lm, prompt, target, steps=m, points=points)
    g = _g_at(lm, q, layer, [0.0, 1.0])
    p_full = target_probability(lm, prompt, target)
    with scale_activation(lm, "neurons", layer, 0.0, positions=q.position):
        p_zero = target_probability(lm, prompt, target)
    delta = p_full - p_zero
    assert abs(delta) > 1e-9
    first_order = (abs(g[1] - g[0]) if points == "left" else abs(g[0] + g[1] - 2 * delta)) / (2 * m)
    tol = 2 * first_order + 1e-5 * abs(delta)
    assert abs(float(attr[layer].sum()) - delta) <= tol
    # The check has teeth: the allowed error is a small fraction of ΔP and of the other layers' ΔP.
    assert tol < 0.05 * abs(delta)
    with scale_activation(lm, "neurons", 0, 0.0, positions=q.position):
        delta0 = p_full - target_probability(lm, prompt, target)
    assert abs(float(attr[layer].sum()) - delta0) > tol


def _g_at(lm, q, layer, alphas):
    ids = torch.tensor([list(q.input_ids)])
    with torch.no_grad(), record(lm, "neurons", layer) as rec:
        lm.model(input_ids=ids)
    act = rec[layer][0, q.position]
    out = []
    for a in alphas:
        x = (a * act).clone().requires_grad_(True)

        def write(value):
            value = value.clone()
            value[:, q.position] = x
            return value
        with modify(lm, "neurons", {layer: write}):
            p = lm.model(input_ids=ids).logits[0, q.position].softmax(-1)[q.target_id]
        (grad,) = torch.autograd.grad(p, x)
        out.append(float((act * grad).sum()))
    return out


def test_activation_method(tiny):
    lm = tiny("llama")
    q = prepare(lm, CAUSAL_PROMPT, "Paris").queries[0]
    with torch.no_grad(), record(lm, "neurons") as rec:
        lm.model(input_ids=torch.tensor([list(q.input_ids)]))
    acts = integrated_gradients(lm, CAUSAL_PROMPT, "Paris", method="activation")
    expected = torch.stack([rec[layer][0, q.position] for layer in range(lm.arch.n_layers)])
    assert torch.allclose(acts, expected, rtol=1e-5, atol=1e-7)


def test_ig_query_matches_integrated_gradients(tiny):
    lm = tiny("gpt2")
    q = prepare(lm, CAUSAL_PROMPT, "Paris").queries[0]
    a = ig_query(lm, q.input_ids, q.position, q.target_id, steps=4)
    b = integrated_gradients(lm, CAUSAL_PROMPT, "Paris", steps=4)
    assert torch.equal(a, b)


def test_attribution_maps_shapes_and_targets(tiny):
    lm = tiny("gpt2")
    prompts = [CAUSAL_PROMPT, "The capital of Italy is"]
    maps = attribution_maps(lm, prompts, ["Paris", "Rome"], steps=3, progress=False)
    assert maps.shape == (2, lm.arch.n_layers, lm.arch.n_neurons)
    assert torch.equal(maps[1], integrated_gradients(lm, prompts[1], "Rome", steps=3))
    same = attribution_maps(lm, prompts, "Paris", steps=3, progress=False)
    assert torch.equal(same[0], maps[0])


@pytest.mark.parametrize("call,match", [
    (lambda lm: integrated_gradients(lm, "", "Paris"), "empty prompt"),
    (lambda lm: integrated_gradients(lm, CAUSAL_PROMPT, "  "), "empty target"),
    (lambda lm: integrated_gradients(lm, CAUSAL_PROMPT, "Paris", layers=[0, 99]), "layer 99"),
    (lambda lm: integrated_gradients(lm, CAUSAL_PROMPT, "Paris", layers=[]), "layers is empty"),
    (lambda lm: integrated_gradients(lm, CAUSAL_PROMPT, "Paris", steps=0), "steps"),
    (lambda lm: integrated_gradients(lm, CAUSAL_PROMPT, "Paris", points="right"), "points"),
    (lambda lm: integrated_gradients(lm, CAUSAL_PROMPT, "Paris", method="grad"), "method"),
    (lambda lm: integrated_gradients(lm, CAUSAL_PROMPT, "Paris", batch_size=0), "batch_size"),
    (lambda lm: integrated_gradients(lm, CAUSAL_PROMPT, "Paris", site="attn"), "site"),
    (lambda lm: attribution_maps(lm, [], "Paris", progress=False), "no prompts"),
    (lambda lm: attribution_maps(lm, ["a", "b"], ["x"], progress=False), "2 prompts but 1"),
    (lambda lm: attribution_maps(lm, ["a", ""], "x", progress=False), "empty prompt"),
])
def test_bad_inputs(tiny, call, match):
    lm = tiny("gpt2")
    with pytest.raises(ValueError, match=match):
        call(lm)
    assert hook_count(lm.model) == 0


def test_state_restored_after_error_inside_ig(tiny, monkeypatch):
    lm = tiny("llama")
    lm.model.train()
    import kn_utils.attribution as attribution

    def boom(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(attribution.torch.autograd, "grad", boom)
    with pytest.raises(RuntimeError):
        integrated_gradients(lm, CAUSAL_PROMPT, "Paris", steps=2)
    assert hook_count(lm.model) == 0
    assert lm.model.training and all(p.requires_grad for p in lm.model.parameters())
    lm.model.eval()


def test_r2_similarity():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(4, 6, generator=g)
    assert r2_similarity(m[:1].expand(5, -1) * torch.arange(1, 6)[:, None]) == pytest.approx(1.0)
    assert r2_similarity(torch.eye(7)) == pytest.approx(0.0, abs=1e-12)
    # Reference: the largest singular value of the normalised matrix, directly.
    normed = m / m.norm(dim=1, keepdim=True)
    s1 = float(torch.linalg.svdvals(normed.double())[0])
    assert r2_similarity(m.reshape(4, 2, 3)) == pytest.approx((s1 ** 2 - 1) / 3)
    assert 0 <= r2_similarity(m) <= 1
    assert math.isnan(r2_similarity(m[:1]))


def test_coarse_neurons():
    s = torch.tensor([[0.1, 1.0, 0.25], [0.19, -2.0, 0.5]])
    assert coarse_neurons(s) == [(0, 1), (0, 2), (1, 2)]
    assert coarse_neurons(s, threshold=0.3) == [(0, 1), (1, 2)]
    assert coarse_neurons(s, threshold=0.2, mode="absolute") == [(0, 1), (0, 2), (1, 2)]
    assert coarse_neurons(s, threshold=50, mode="percentile") == [(0, 1), (0, 2), (1, 2)]
    assert coarse_neurons(-s.abs()) == []
    with pytest.raises(ValueError, match="mode"):
        coarse_neurons(s, mode="top")
    with pytest.raises(ValueError, match="one map"):
        coarse_neurons(s[None])
