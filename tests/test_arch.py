"""Architecture sites on a tiny random model of every supported family."""
import pytest
import torch
from torch import nn

import kn_utils as ku
from tiny_models import CAUSAL_FAMILIES, FAMILIES


def _ids(lm):
    text = "The capital of France is [MASK] ." if lm.arch.is_masked_lm else "The capital of France is"
    return torch.tensor([ku.targets.prompt_ids(lm, text)] * 2)


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_neuron_site_read_write_and_zero(tiny, family):
    lm = tiny(family)
    ids = _ids(lm)
    batch, n_pos = ids.shape
    with ku.record(lm, "neurons") as acts:
        clean = _logits(lm, ids)
    assert sorted(acts) == list(range(lm.arch.n_layers))
    for layer in acts:
        assert acts[layer].shape == (batch, n_pos, lm.arch.n_neurons)

    # Writing back exactly what was read leaves the logits unchanged.
    with ku.modify(lm, "neurons", {l: (lambda v, l=l: acts[l].clone()) for l in acts}):
        same = _logits(lm, ids)
    assert (same - clean).abs().max() < 1e-6

    # Zero one neuron at one position: that position changes; for causal models no earlier one does.
    layer, pos = lm.arch.n_layers - 1, n_pos - 2
    neuron = int(acts[layer][0, pos].abs().argmax())
    with ku.suppress(lm, [(layer, neuron)], positions=pos):
        zeroed = _logits(lm, ids)
    assert (zeroed[:, pos] - clean[:, pos]).abs().max() > 1e-6
    if not lm.arch.is_masked_lm:
        assert torch.equal(zeroed[:, :pos], clean[:, :pos])
    assert ku.hook_count(lm.model) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_other_sites_have_model_width(tiny, family):
    lm = tiny(family)
    ids = _ids(lm)
    for site in ("mlp", "attn", "hidden"):
        with ku.record(lm, site) as acts:
            _logits(lm, ids)
        assert acts[0].shape == (*ids.shape, lm.arch.d_model), site
    with ku.record(lm, "embed") as acts:
        _logits(lm, ids)
    assert acts[0].shape[:2] == ids.shape


def test_last_hidden_site_feeds_the_head(tiny):
    lm = tiny("llama")
    ids = _ids(lm)
    with ku.record(lm, "hidden", [lm.arch.n_layers - 1]) as acts:
        logits = _logits(lm, ids)
    h = acts[lm.arch.n_layers - 1]
    assert torch.allclose(lm.arch.unembed(lm.arch.final_norm(h)), logits, atol=1e-5)


def test_gpt2_neuron_is_post_gelu(tiny):
    lm = tiny("gpt2")
    ids = _ids(lm)
    block = lm.model.transformer.h[1]
    with ku.record(lm, "neurons", [1]) as acts, ku.record(lm, "hidden", [0]) as hidden:
        _logits(lm, ids)
    x = hidden[0]
    residual = x + block.attn(block.ln_1(x))[0]
    by_hand = block.mlp.act(block.mlp.c_fc(block.ln_2(residual)))
    assert torch.allclose(acts[1], by_hand, atol=1e-5)


def test_llama_neuron_is_act_gate_times_up(tiny):
    lm = tiny("llama")
    ids = _ids(lm)
    mlp = lm.model.model.layers[2].mlp
    inputs = {}
    handle = mlp.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0]))
    try:
        with ku.record(lm, "neurons", [2]) as acts:
            _logits(lm, ids)
    finally:
        handle.remove()
    by_hand = mlp.act_fn(mlp.gate_proj(inputs["x"])) * mlp.up_proj(inputs["x"])
    assert torch.allclose(acts[2], by_hand, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_value_slots_are_rows_per_neuron(tiny, family):
    lm = tiny(family)
    slots = lm.arch.value_slots(0)
    assert slots.shape == (lm.arch.n_neurons, lm.arch.d_model)
    unit = torch.zeros(1, 1, lm.arch.n_neurons)
    unit[..., 3] = 1.0
    out = lm.arch.mlp_out[0](unit) - lm.arch.mlp_out[0](torch.zeros_like(unit))
    assert torch.allclose(out[0, 0], slots[3], atol=1e-6)


def test_unknown_layout_names_what_it_found():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2, "model_type": "odd"})()
            self.stack = nn.ModuleList([nn.Sequential(nn.Conv1d(4, 4, 1)) for _ in range(2)])

    with pytest.raises(ku.UnsupportedArchitecture, match=r"stack \(Sequential x2\)"):
        ku.describe(Odd())
    with pytest.raises(ValueError, match="no .config"):
        ku.describe(nn.Linear(2, 2))


def test_the_embedded_model_is_llama_shaped(default_lm):
    arch = default_lm.arch
    assert arch.family == "llama" and arch.d_model == 576
    assert arch.names["mlp_out"][0] == "model.layers.0.mlp.down_proj"


def test_causal_families_listed():
    assert set(CAUSAL_FAMILIES) >= {"gpt2", "gptj", "gpt_neox", "opt", "llama", "mistral", "qwen2", "phi3"}
