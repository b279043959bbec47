"""Gemma 3's differences from LLaMA, on tiny random configs (the real weights: tests/test_gemma.py).

Post-norms (a norm after attention and after the MLP, before the residual add), embeddings scaled by
sqrt(d) inside the embedding module, GELU-tanh gated MLP, sliding-window attention layers.
"""
import math

import numpy as np
import pytest
import torch
import transformers as T

import kn_utils as ku
from kn_utils.attribution import integrated_gradients
from kn_utils.hooks import hook_count, record
from kn_utils.tracing import causal_trace, noise_level, subject_span
from kn_utils.reference import reference_ig, reference_trace
from test_attribution import rel_err
from test_tracing import PROMPTS
from tiny_models import CAUSAL_FAMILIES, H, bpe_tokenizer

PROMPT, SUBJECT = PROMPTS["causal"]   # 8 tokens: longer than the sliding window below


def _ids(lm, text=PROMPT):
    return torch.tensor([ku.targets.prompt_ids(lm, text)])


def sliding_gemma3(window=3, seed=0, peaky=True):
    """A tiny Gemma 3 whose sliding window is shorter than the test prompt (layer 1 global)."""
    torch.manual_seed(seed)
    tok = bpe_tokenizer()
    cfg = T.Gemma3TextConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id, hidden_size=H, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=64, sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    model = T.Gemma3ForCausalLM(cfg).eval()
    lm = ku.load_model(model, tokenizer=tok, device="cpu")
    if peaky:  # a far-from-uniform next-token distribution, so score differences mean something
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 60.0)
    return lm


@pytest.fixture(scope="module")
def gemma():
    return sliding_gemma3()


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_residual_stream_is_attn_plus_mlp(tiny, family):
    """The "attn" and "mlp" sites are what each block adds to the residual stream, in every family
    (Gemma: the outputs of post_attention_layernorm / post_feedforward_layernorm)."""
    lm = tiny(family)
    ids = _ids(lm)
    with torch.no_grad(), record(lm, "hidden") as hid, record(lm, "attn") as attn, \
            record(lm, "mlp") as mlp:
        lm.model(input_ids=ids)
    for layer in range(1, lm.arch.n_layers):
        step = hid[layer] - hid[layer - 1]
        torch.testing.assert_close(attn[layer] + mlp[layer], step, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_mlp_site_is_post_norm_of_projection(tiny, family):
    lm = tiny(family)
    block = lm.arch.blocks[1]
    assert lm.arch.names["mlp_add"][1].endswith("layers.1.post_feedforward_layernorm")
    assert lm.arch.names["attn_add"][1].endswith("layers.1.post_attention_layernorm")
    # random init leaves Gemma's norm weights at zero (scale 1 + w): give them a shape
    with torch.no_grad():
        block.post_feedforward_layernorm.weight.normal_()
    with torch.no_grad(), record(lm, "mlp", [1]) as mlp, record(lm, "mlp_proj", [1]) as proj, \
            record(lm, "attn", [1]) as attn:
        lm.model(input_ids=_ids(lm))
    torch.testing.assert_close(mlp[1], block.post_feedforward_layernorm(proj[1]), atol=1e-6, rtol=1e-5)
    assert (mlp[1] - proj[1]).abs().max() > 1e-2   # really a different tensor
    # the attention site is not o_proj's output but its post-norm
    with torch.no_grad(), record(lm, "attn", [1]) as again:
        lm.model(input_ids=_ids(lm))
    torch.testing.assert_close(attn[1], again[1])
    o_proj = lm.arch.attn_out[1]
    assert lm.arch.module("attn", 1)[0] is block.post_attention_layernorm and o_proj is block.self_attn.o_proj


def test_llama_post_attention_layernorm_is_not_a_post_norm(tiny):
    """In LLaMA blocks ``post_attention_layernorm`` is the pre-MLP norm: sites stay the projections."""
    lm = tiny("llama")
    assert not lm.arch.mlp_add and "mlp_add" not in lm.arch.names
    assert lm.arch.module("mlp", 0)[0] is lm.arch.module("mlp_proj", 0)[0] is lm.arch.mlp_out[0]
    assert lm.arch.module("attn", 0)[0] is lm.arch.attn_out[0]


def test_noise_level_is_measured_on_the_scaled_embedding(gemma):
    """Gemma's embedding module multiplies by sqrt(d). The corrupted run adds noise to that module's
    output, so "s3" is 3 x the std of that same output (not of the raw embedding table)."""
    lm = gemma
    ids = lm.tokenizer(SUBJECT, add_special_tokens=False)["input_ids"]
    raw = lm.arch.embed.weight.detach()[ids]
    with torch.no_grad(), record(lm, "embed") as emb:
        lm.model(input_ids=torch.tensor([ids]))
    torch.testing.assert_close(emb[0][0], raw * math.sqrt(H))   # the site includes the scaling
    level = noise_level(lm, [SUBJECT])
    assert level == pytest.approx(3 * float((raw * math.sqrt(H)).std()), rel=1e-6)
    assert level == pytest.approx(math.sqrt(H) * 3 * float(raw.std()), rel=1e-5)

    # ...and the corrupted run adds exactly the drawn noise at that level to the scaled embedding
    full_ids, (b, e) = subject_span(lm, PROMPT, SUBJECT)
    seen = []

    def spy(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
    handle = lm.arch.blocks[0].register_forward_pre_hook(spy, with_kwargs=True)
    try:
        trace = causal_trace(lm, PROMPT, SUBJECT, samples=3, noise="s3", tokens=[e - 1])
    finally:
        handle.remove()
    assert trace.noise == pytest.approx(noise_level(lm, [SUBJECT]), rel=1e-6)
    clean = lm.arch.embed(torch.tensor([full_ids]))[0].detach()
    draw = torch.from_numpy(np.random.RandomState(1).randn(3, e - b, H) * trace.noise).float()
    full = [s for s in seen if s.shape[:2] == (3, len(full_ids))]
    assert full
    torch.testing.assert_close(full[0][:, b:e], clean[b:e] + draw, rtol=0, atol=1e-5)
    torch.testing.assert_close(full[0][:, :b], clean[:b].expand(3, -1, -1), rtol=0, atol=0)


def test_sliding_window_matters_in_this_config(gemma):
    """The KV-cache checks below are only meaningful if the window changes the outputs."""
    wide = sliding_gemma3(window=4096)
    ids = _ids(gemma)
    with torch.no_grad():
        a, b = gemma.model(input_ids=ids).logits, wide.model(input_ids=ids).logits
    assert len(ids[0]) > gemma.model.config.sliding_window
    assert torch.equal(a[:, :3], b[:, :3])           # within the window: identical
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-3  # beyond it: the window is applied


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_trace_kv_shortcuts_exact_with_sliding_window(gemma, kind):
    want = reference_trace(gemma, PROMPT, SUBJECT, kind=kind, samples=3, noise=0.3, window=2)
    ref, low, high = want.scores, want.low_score, want.high_score
    assert float(ref.max() - ref.min()) > 1e-3
    for kwargs in ({}, dict(batch_size=4), dict(prefix_cache=False)):
        got = causal_trace(gemma, PROMPT, SUBJECT, kind=kind, samples=3, noise=0.3, window=2, **kwargs)
        assert abs(got.low_score - low) < 1e-5 and abs(got.high_score - high) < 1e-5
        assert (got.scores - ref).abs().max() < 1e-5, kwargs
    assert hook_count(gemma.model) == 0


@pytest.mark.parametrize("target", ["Paris", "New York city"])
def test_ig_kv_shortcut_exact_with_sliding_window(gemma, target):
    ref = reference_ig(gemma, PROMPT, target, steps=4)
    assert ref.abs().max() > 0
    for kwargs in ({}, dict(batch_size=5), dict(cache=False)):
        fast = integrated_gradients(gemma, PROMPT, target, steps=4, **kwargs)
        assert rel_err(fast, ref) <= 1e-4, kwargs


def test_rome_edits_the_projection_before_the_post_norm(gemma, tmp_path, monkeypatch):
    """v* lives at the projection's output ("mlp_proj"): the edited down_proj maps k0 to v*, and the
    post-MLP norm then sees exactly v* there. Weights are restored bit for bit."""
    monkeypatch.setenv("KN_UTILS_CACHE", str(tmp_path))
    lm = gemma
    snap = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    hp = ku.ROMEHyperParams(layer=1, v_num_grad_steps=6, context_template_length_params=[[3, 2]],
                            mom2_adjustment=False)
    with ku.rome_edit(lm, "The capital of France is", "France", "Rome", hp) as edit:
        module = lm.arch.mlp_out[1]
        with torch.no_grad():
            out = module(edit.k0[None]).reshape(-1)   # ROME's code: k0 -> v*
        assert torch.allclose(out, edit.v_star, atol=1e-4 * edit.v_star.norm().item())
        assert edit.v_star.shape == (lm.arch.d_model,)
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, snap[n]), n
    assert hook_count(lm.model) == 0


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "bert", "gpt2"])
def test_logits_read_only_where_needed_equal_full_logits(tiny, family):
    """read_logits projects only the read (row, position) pairs onto the vocabulary (Gemma: 262k x
    640); the values equal the full logits there, softcapping (Gemma 2) included, and gradients
    flow through them."""
    from kn_utils.engine import read_logits
    from kn_utils.targets import pad_batch

    lm = tiny(family)
    text = ["The capital of France is [MASK] .", "Paris is [MASK] big city"] if lm.arch.is_masked_lm \
        else ["The capital of France is", "Paris is a big city"]
    ids, mask = pad_batch(lm, [ku.targets.prompt_ids(lm, t) for t in text])
    rows, pos = [0, 1, 1, 0], [1, 0, 3, 2]
    with torch.no_grad():
        full = lm.model(input_ids=ids, attention_mask=mask).logits
        got = read_logits(lm, rows, pos, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got, full[rows, pos], atol=1e-5, rtol=1e-5)
    assert hook_count(lm.model) == 0
    # the projection really saw only the pairs
    seen = []
    handle = lm.arch.unembed.register_forward_hook(lambda m, a, out: seen.append(a[0].shape))
    try:
        with torch.no_grad():
            read_logits(lm, rows, pos, input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    assert seen == [torch.Size([1, 4, lm.arch.unembed.in_features])]


def test_kn_edit_uses_the_embedding_table_not_its_scaled_output(gemma):
    """Decision for Gemma (√d-scaled embeddings): the KN edit's e(t) is the row of the embedding
    *table*, as Dai's and the paper's code take ``word_embeddings.weight``; with tied weights that row
    is also the unembedding's, the direction the value slot writes towards.  Not the row × √d that
    the embedding module outputs."""
    from kn_utils.editing.kn import first_token_id

    lm = gemma
    table = lm.arch.embed.weight.detach().double()
    old, new = first_token_id(lm, "Paris", None), first_token_id(lm, "Rome", None)
    with torch.no_grad():
        scaled = lm.arch.embed(torch.tensor([[new]])).double()[0, 0]
    assert not torch.allclose(scaled, table[new])   # the module does scale: the two choices differ
    before = lm.arch.value_slots(1)[[3, 5]].detach().double().clone()
    with ku.kn_edit(lm, [(1, 3), (1, 5)], "Paris", "Rome", lambda1=1.0, lambda2=8.0):
        after = lm.arch.value_slots(1)[[3, 5]].detach().double()
        want = before + (8.0 * table[new] - table[old])
        assert torch.allclose(after, want.to(after.dtype).double(), atol=1e-6)
