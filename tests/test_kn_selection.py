"""Knowledge-neuron selection: coarse → refined neurons, adaptive τ, negative examples, statistics."""
from collections import Counter

import pytest
import torch

from kn_utils.attribution import (attribution_maps, coarse_neurons, find_knowledge_neurons,
                                  layer_distribution, r2_similarity)
from kn_utils.hooks import hook_count

PROMPTS = ["The capital of France is", "France's capital city is", "The French capital is",
           "Paris is in"]


def synthetic_maps(lm, n_prompts, fractions, seed=0):
    """Maps where neuron k is coarse (score 1 vs ≤ 0.1 noise) in the first round(f·n) prompts.

    Each prompt also gets its own anchor neuron at 1.0, coarse in that prompt only, so that the
    noise of a prompt without planted neurons stays below 0.2 × its maximum.
    """
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(n_prompts, lm.arch.n_layers, lm.arch.n_neurons, generator=g) * 0.1
    for i in range(n_prompts):
        maps[i, lm.arch.n_layers - 1, 40 + i] = 1.0
    planted = []
    for k, f in enumerate(fractions):
        layer, neuron = k % lm.arch.n_layers, 3 * k + 1
        maps[: round(f * n_prompts), layer, neuron] = 1.0
        planted.append((layer, neuron))
    return maps, planted


def reference_refine(maps, tau, threshold=0.2):
    """Refined neurons by explicit counting, as in Dai et al.'s description."""
    counts = Counter()
    for m in maps:
        top = m.max()
        for layer in range(m.shape[0]):
            for neuron in range(m.shape[1]):
                if m[layer, neuron] > threshold * top:
                    counts[layer, neuron] += 1
    return sorted(n for n, c in counts.items() if c / len(maps) > tau)


def test_refinement_matches_counting(tiny):
    lm = tiny("gpt2")
    fractions = [1.0, 0.9, 0.8, 0.75, 0.7, 0.6, 0.3, 0.1]
    maps, planted = synthetic_maps(lm, 20, fractions)
    res = find_knowledge_neurons(lm, ["p"] * 20, "t", maps=maps, adaptive=False, max_neurons=100)
    assert res.neurons == reference_refine(maps, 0.7)
    assert res.neurons == sorted(planted[:4])  # 0.7 exactly is not MORE than τ
    assert res.n_initial == 4 and res.tau == 0.7 and res.converged
    assert res.coarse[0] == coarse_neurons(maps[0])
    assert res.counts[planted[0]] == 20 and res.n_prompts == 20
    assert res.r2 == pytest.approx(r2_similarity(maps))
    assert res.scores is None


def test_adaptive_raises_tau_until_at_most_five(tiny):
    lm = tiny("gpt2")
    fractions = [1.0, 0.95, 0.9, 0.9, 0.85, 0.85, 0.8, 0.75]  # 8 neurons above τ = 0.7
    maps, planted = synthetic_maps(lm, 20, fractions)
    res = find_knowledge_neurons(lm, ["p"] * 20, "t", maps=maps, return_scores=True)
    assert res.converged and 2 <= len(res.neurons) <= 5
    assert res.n_initial == 8
    assert res.tau == pytest.approx(0.85)   # 0.75 → 7 kept, 0.8 → 6, 0.85 → 4
    assert res.neurons == reference_refine(maps, res.tau)
    assert torch.equal(res.scores, maps)
    assert [k for _, k in res.history] == [8, 7, 6, 4]


def test_adaptive_lowers_tau_when_too_few(tiny):
    lm = tiny("gpt2")
    maps, planted = synthetic_maps(lm, 20, [0.65, 0.6, 0.4])
    res = find_knowledge_neurons(lm, ["p"] * 20, "t", maps=maps)
    assert res.n_initial == 0 and res.converged
    assert res.tau == pytest.approx(0.55) and res.neurons == sorted(planted[:2])


def test_adaptive_reports_when_no_tau_fits(tiny):
    lm = tiny("gpt2")
    # Eight neurons in every prompt: no τ < 1 separates them, τ = 1 keeps none.
    maps, planted = synthetic_maps(lm, 10, [1.0] * 8 + [0.1])
    res = find_knowledge_neurons(lm, ["p"] * 10, "t", maps=maps, max_iter=3)
    assert not res.converged and "3 tau steps did not reach" in res.message
    assert res.neurons == sorted(planted[:8]) and res.tau == pytest.approx(0.85)
    union = set().union(*map(set, res.coarse))
    assert set(res.neurons) != union  # never the union of coarse neurons


def test_adaptive_jump_over_window_keeps_stricter_set(tiny):
    lm = tiny("gpt2")
    maps, planted = synthetic_maps(lm, 20, [1.0] * 6 + [0.3])   # 6 at τ ≤ 0.95, 0 at τ = 1
    res = find_knowledge_neurons(lm, ["p"] * 20, "t", maps=maps, max_iter=20)
    assert not res.converged and "no tau gives 2-5" in res.message
    assert res.neurons == [] and res.tau == 1.0


def test_non_adaptive_message(tiny):
    lm = tiny("gpt2")
    maps, _ = synthetic_maps(lm, 10, [0.1])
    res = find_knowledge_neurons(lm, ["p"] * 10, "t", maps=maps, adaptive=False)
    assert res.neurons == [] and not res.converged and "adaptive=False" in res.message


def test_negative_examples_remove_shared_neurons(tiny):
    lm = tiny("gpt2")
    maps, planted = synthetic_maps(lm, 10, [1.0, 1.0, 0.9, 0.9])
    neg, _ = synthetic_maps(lm, 6, [1.0, 0.0, 1.0, 0.0], seed=1)
    plain = find_knowledge_neurons(lm, ["p"] * 10, "t", maps=maps)
    assert plain.neurons == sorted(planted)
    res = find_knowledge_neurons(lm, ["p"] * 10, "t", maps=maps, negative_prompts=["q"] * 6,
                                 negative_maps=neg)
    assert res.negative == sorted([planted[0], planted[2]])
    assert res.neurons == sorted([planted[1], planted[3]])
    assert not set(res.neurons) & set(res.negative)


def test_end_to_end_with_negatives_on_tiny_model(tiny):
    lm = tiny("llama")
    res = find_knowledge_neurons(lm, PROMPTS[:3], "Paris", steps=3, progress=False,
                                 return_scores=True)
    assert res.scores.shape == (3, lm.arch.n_layers, lm.arch.n_neurons)
    assert res.converged == (2 <= len(res.neurons) <= 5)
    assert res.converged or res.message
    # The same prompts as negatives: every neuron refined at the start τ must go.
    same = find_knowledge_neurons(lm, PROMPTS[:3], "Paris", maps=res.scores, adaptive=False,
                                  negative_prompts=PROMPTS[:3], negative_maps=res.scores)
    assert same.neurons == []
    assert hook_count(lm.model) == 0


def test_list_targets_and_bad_inputs(tiny):
    lm = tiny("gpt2")
    maps = attribution_maps(lm, PROMPTS[:2], ["Paris", "Paris"], steps=2, progress=False)
    res = find_knowledge_neurons(lm, PROMPTS[:2], ["Paris", "Paris"], maps=maps)
    assert res.n_prompts == 2
    with pytest.raises(ValueError, match="no prompts"):
        find_knowledge_neurons(lm, [], "Paris")
    with pytest.raises(ValueError, match="empty target"):
        find_knowledge_neurons(lm, PROMPTS[:2], "")
    with pytest.raises(ValueError, match="2 prompts but 3"):
        find_knowledge_neurons(lm, PROMPTS[:2], ["a", "b", "c"])
    with pytest.raises(ValueError, match="shape"):
        find_knowledge_neurons(lm, PROMPTS[:2], "Paris", maps=maps[:1])
    with pytest.raises(ValueError, match="negative_targets is required"):
        find_knowledge_neurons(lm, PROMPTS[:2], ["a", "b"], maps=maps, negative_prompts=["x"])
    with pytest.raises(ValueError, match="tau"):
        find_knowledge_neurons(lm, PROMPTS[:2], "Paris", maps=maps, tau=1.5)
    assert hook_count(lm.model) == 0


def test_layer_distribution():
    s = layer_distribution([(0, 1), (2, 5), (2, 7)], 4)
    assert s.tolist() == [1, 0, 2, 0] and list(s.index) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="out of range"):
        layer_distribution([(4, 0)], 4)
