"""The adaptive tau search's two rules: today's strict "more than tau of the prompts" with exact tau
steps (default) and the paper code's floating-point stepping (``tau_mode="paper"``)."""
from __future__ import annotations

import pytest
import torch

from kn_utils.attribution import find_knowledge_neurons

N = 40  # 0.65 * 40 = 26 and 0.6 * 40 = 24: tau * n is an integer on the way down
COUNTS = {(0, 1): 36, (1, 2): 26, (1, 3): 25, (0, 4): 25}  # neuron -> prompts it is coarse in


def _maps(lm, counts=COUNTS, n=N):
    maps = torch.zeros(n, lm.arch.n_layers, lm.arch.n_neurons)
    for (layer, unit), c in counts.items():
        maps[:c, layer, unit] = 1.0  # coarse (above 0.2 of the prompt's maximum) in the first c prompts
    return maps


def _reference(counts, n, tau, step, mode, lo=2, hi=5):
    """The search written out by hand: paper = the floating-point loop of the paper's code."""
    p, taus = tau, []
    for k in range(21):
        t = p if mode == "paper" else round(tau - k * step, 10)
        if mode == "paper":
            kept = {x for x, c in counts.items() if c > n * t}
        else:
            kept = {x for x, c in counts.items() if c > n * t + 1e-9}
        taus.append(t)
        if lo <= len(kept) <= hi:
            return sorted(kept), t
        p -= step
    raise AssertionError("no tau found")


@pytest.mark.parametrize("mode", ["strict", "paper"])
def test_both_rules_match_the_hand_written_search(tiny, mode):
    lm = tiny("llama")
    prompts = [f"prompt {i}" for i in range(N)]
    res = find_knowledge_neurons(lm, prompts, "x", maps=_maps(lm), tau_mode=mode, progress=False)
    neurons, tau = _reference(COUNTS, N, 0.7, 0.05, mode)
    assert res.converged and res.neurons == neurons and res.tau == tau
    assert res.n_initial == 1  # only the 36-of-40 neuron at the start (0.7 * 40 = 28 in both rules)


def test_paper_mode_keeps_a_neuron_shared_by_exactly_tau_n_prompts(tiny):
    lm = tiny("llama")
    prompts = [f"prompt {i}" for i in range(N)]
    strict = find_knowledge_neurons(lm, prompts, "x", maps=_maps(lm), progress=False)
    paper = find_knowledge_neurons(lm, prompts, "x", maps=_maps(lm), tau_mode="paper", progress=False)
    # strict: 26/40 is not MORE than 0.65, so tau goes on to 0.6, where the two 25s join
    assert strict.tau == 0.6 and strict.neurons == [(0, 1), (0, 4), (1, 2), (1, 3)]
    assert [t for t, _ in strict.history] == [0.7, 0.65, 0.6]
    # paper: 0.7 - 0.05 = 0.6499999999999999 < 0.65, so 26/40 already counts and the search stops there
    assert paper.tau == 0.7 - 0.05 < 0.65 and paper.neurons == [(0, 1), (1, 2)]
    assert [n for _, n in paper.history] == [1, 2]
    # the default is the strict rule
    assert find_knowledge_neurons(lm, prompts, "x", maps=_maps(lm), tau_mode="strict",
                                  progress=False).neurons == strict.neurons


def test_modes_agree_where_tau_n_is_never_an_integer(tiny):
    lm = tiny("llama")
    n = 17
    counts = {(0, 1): 15, (1, 2): 11, (1, 3): 10, (0, 4): 9}
    prompts = [f"prompt {i}" for i in range(n)]
    a = find_knowledge_neurons(lm, prompts, "x", maps=_maps(lm, counts, n), progress=False)
    b = find_knowledge_neurons(lm, prompts, "x", maps=_maps(lm, counts, n), tau_mode="paper", progress=False)
    assert a.neurons == b.neurons and a.tau == pytest.approx(b.tau, abs=1e-12)


def test_unknown_tau_mode_is_refused_before_any_work(tiny):
    lm = tiny("llama")
    with pytest.raises(ValueError, match=r"tau_mode must be one of 'strict', 'paper', got 'loose'"):
        find_knowledge_neurons(lm, ["a b", "c d"], "x", tau_mode="loose", progress=False)
