"""Everything on the real Gemma-3-270M weights (the second embedded model), as on SmolLM2.

Slow (loads a 270M model with a 262,144-token vocabulary on the CPU): ``pytest -m gemma``.
"""
import math
import time

import pytest
import torch

import kn_utils as ku
from kn_utils import cache, models, registry
from kn_utils.editing.rome import ROMEHyperParams
from kn_utils.hooks import hook_count, record
from kn_utils.tracing import noise_level, subject_span
from kn_utils.reference import reference_ig, reference_trace
from test_attribution import rel_err

pytestmark = [pytest.mark.slow, pytest.mark.gemma]

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"


@pytest.fixture(scope="module")
def gemma():
    return ku.load_model("gemma-3-270m", device="cpu")


def small_hp(lm, **kw):
    """The model's preset with fewer steps / prefixes and C = I, to keep CPU time down."""
    hp = ROMEHyperParams.for_model(lm)
    hp.mom2_adjustment = False
    hp.context_template_length_params = [[5, 3]]
    hp.v_num_grad_steps = 12
    for k, v in kw.items():
        setattr(hp, k, v)
    return hp


def test_registry_entry_matches_the_loaded_model(gemma):
    entry = registry.EMBEDDED["gemma-3-270m"]
    arch = gemma.arch
    assert arch.family == entry.family == "gemma3_text"
    assert (arch.n_layers, arch.n_neurons, arch.d_model) == (entry.layers, entry.neurons, entry.d_model)
    assert arch.unembed.weight.shape[0] == entry.vocab == 262_144
    assert "gemma-3-270m" in registry.embedded_list() and "Gemma Terms" in registry.embedded_list()


def test_gemma_knows_facts(gemma):
    top = ku.predict(gemma, PROMPT, top_k=3)
    assert top[0][0] == " Paris" and top[0][1] > 0.5
    assert ku.predict(gemma, "Alan Turing works in the field of", top_k=1)[0][0] == " computer"
    assert ku.target_probability(gemma, PROMPT, "Paris") == pytest.approx(top[0][1], rel=1e-5)


def test_second_load_reads_the_cache_not_the_gguf(gemma, monkeypatch):
    import transformers

    original = transformers.AutoModelForCausalLM.from_pretrained

    def no_gguf(*args, **kwargs):
        if "gguf_file" in kwargs:
            raise AssertionError("the GGUF was read again instead of the cache")
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    start = time.perf_counter()
    again = ku.load_model("gemma-3-270m", device="cpu")
    assert time.perf_counter() - start < 60
    assert registry.gemma_gguf_path().parent == cache.cache_dir() / "gguf"
    for a, b in zip(gemma.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)


def test_sites_and_noise_on_real_weights(gemma):
    """mlp / attn = what each block adds to the residual (post-norm outputs); the noise level is
    measured on the embedding module's scaled output, which is what the corruption adds to."""
    lm = gemma
    ids = torch.tensor([ku.targets.prompt_ids(lm, PROMPT)])
    with torch.no_grad(), record(lm, "hidden") as hid, record(lm, "attn") as attn, \
            record(lm, "mlp") as mlp, record(lm, "mlp_proj") as proj, record(lm, "embed") as emb:
        lm.model(input_ids=ids)
    for layer in range(1, lm.arch.n_layers):
        step = hid[layer] - hid[layer - 1]
        assert (attn[layer] + mlp[layer] - step).abs().max() <= 1e-4 * step.abs().max()
    assert (mlp[5] - proj[5]).abs().max() > 1e-2 * proj[5].abs().max()
    sub = lm.tokenizer(SUBJECT, add_special_tokens=False)["input_ids"]
    raw = lm.arch.embed.weight.detach()[sub]
    torch.testing.assert_close(emb[0][0, 1:1 + len(sub)], raw * math.sqrt(lm.arch.d_model))
    assert noise_level(lm, [SUBJECT]) == pytest.approx(3 * float(raw.std()) * math.sqrt(640), rel=1e-4)


def test_ig_matches_reference_loop(gemma):
    layers = [0, 5, 11, 17]
    ref = reference_ig(gemma, PROMPT, "Paris", steps=4, layers=layers)
    fast = integrated = ku.integrated_gradients(gemma, PROMPT, "Paris", steps=4, layers=layers, batch_size=6)
    assert rel_err(fast, ref) <= 1e-4
    full = ku.integrated_gradients(gemma, PROMPT, "Paris", steps=4)
    assert full.shape == (18, 2048) and rel_err(full[layers], ref[layers]) <= 1e-4
    assert integrated.abs().max() > 0 and hook_count(gemma.model) == 0


def test_trace_matches_reference_loop(gemma):
    """The MLP kind (post-norm site, 10-layer windows) against the one-forward-per-cell loop (about
    3 minutes on one CPU thread); every kind's KV-prefix path against the path without it."""
    level = noise_level(gemma, [SUBJECT])
    want = reference_trace(gemma, PROMPT, SUBJECT, kind="mlp", samples=3, noise=level, window=10)
    ref, low, high = want.scores, want.low_score, want.high_score
    got = ku.causal_trace(gemma, PROMPT, SUBJECT, kind="mlp", samples=3, noise=level, window=10)
    assert got.answer == " Paris" and high - low > 0.1   # the noise really breaks the fact
    assert abs(got.low_score - low) < 1e-5 and abs(got.high_score - high) < 1e-5
    assert (got.scores - ref).abs().max() <= 1e-5
    assert float(ref.max() - ref.min()) > 0.1
    for kind in ("hidden", "attn"):
        a = ku.causal_trace(gemma, PROMPT, SUBJECT, kind=kind, samples=3, noise=level)
        b = ku.causal_trace(gemma, PROMPT, SUBJECT, kind=kind, samples=3, noise=level, prefix_cache=False)
        assert (a.scores - b.scores).abs().max() <= 1e-5, kind
    assert hook_count(gemma.model) == 0


def test_rome_flips_the_fact_and_restores(gemma):
    lm = gemma
    snap = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    hp = small_hp(lm)
    assert hp.layer == ROMEHyperParams.preset("gemma-3-270m").layer
    with ku.rome_edit(lm, PROMPT, SUBJECT, "Rome", hp) as edit:
        assert ku.predict(lm, PROMPT, 1)[0][0] == " Rome"
        module = lm.arch.mlp_out[edit.layer]
        with torch.no_grad():
            out = module(edit.k0[None]).reshape(-1)   # ROME's code: k0 -> v*
        assert torch.allclose(out, edit.v_star, atol=1e-3 * edit.v_star.norm().item())
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, snap[n]), n
    assert ku.predict(lm, PROMPT, 1)[0][0] == " Paris" and hook_count(lm.model) == 0


def test_kn_suppression_changes_the_target_probability(gemma):
    prompts = [PROMPT, "The Eiffel Tower is in the city of", "The Eiffel Tower can be found in"]
    kn = ku.find_knowledge_neurons(gemma, prompts, "Paris", steps=10, progress=False)
    assert kn.neurons and all(0 <= l < 18 and 0 <= i < 2048 for l, i in kn.neurons)
    before = ku.target_probability(gemma, PROMPT, "Paris")
    ids, _ = subject_span(gemma, PROMPT, SUBJECT)
    with ku.suppress(gemma, kn.neurons, positions=len(ids) - 1):
        after = ku.target_probability(gemma, PROMPT, "Paris")
    assert abs(after - before) > 0.01 * before
    assert ku.target_probability(gemma, PROMPT, "Paris") == before and hook_count(gemma.model) == 0


@pytest.mark.parametrize("relation", ["P36", "P1376", "P101"])
def test_edit_evaluation_runs_on_each_relation(gemma, data_dir, relation):
    df = ku.evaluate_edits(gemma, "rome", relation, n=1 if relation != "P101" else 3, data_dir=data_dir,
                           hparams=small_hp(gemma, v_num_grad_steps=8), progress=False)
    assert len(df) >= 1, df.attrs.get("skipped")
    crit = "synonym" if relation == "P101" else "symmetry"
    # (locality needs neighbours that a one-item run does not load: not checked here)
    for col in ("reliability_prob", "reliability_acc", f"{crit}_prob", f"{crit}_acc"):
        assert df[col].notna().all() and df[col].between(0, 1).all(), col
    assert (df["p_new_post"] > df["p_new_pre"]).all()
    assert (df["layer"] == ROMEHyperParams.preset("gemma-3-270m").layer).all()
    assert hook_count(gemma.model) == 0
