"""kn_utils.fig6b: mechanics on a tiny model (paired before/after, flips, restore)."""
import pytest
import torch

from kn_utils import kn_edit
from kn_utils.data.blimp import minimal_pairs
from kn_utils.fig6b import accuracy_interval, fig6b_edit_effect
from kn_utils.blimp_tasks import pair_scores
from kn_utils.stats import wilson


@pytest.fixture(scope="module")
def setup(tiny, data_dir):
    lm = tiny("llama")
    pairs = minimal_pairs(lm, "dna_1", data_dir=data_dir, n=24)
    return lm, pairs


def _state(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def test_suppress_matches_pair_scores_reference(setup):
    lm, pairs = setup
    neurons = [(1, 3), (2, 10), (2, 40)]
    res = fig6b_edit_effect(lm, pairs, neurons, factor=0.0)
    ref_before = pair_scores(lm, pairs)["correct"].astype(int).tolist()
    ref_after = pair_scores(lm, pairs, neurons=neurons, factor=0.0)["correct"].astype(int).tolist()
    assert res.pairs["correct_before"].tolist() == ref_before
    assert res.pairs["correct_after"].tolist() == ref_after
    g2b = sum(b == 1 and a == 0 for b, a in zip(ref_before, ref_after))
    b2g = sum(b == 0 and a == 1 for b, a in zip(ref_before, ref_after))
    a = res.accuracy
    assert (a.good_to_bad, a.bad_to_good, a.n) == (g2b, b2g, len(pairs))
    assert a.before == pytest.approx(sum(ref_before) / len(pairs))
    assert a.after == pytest.approx(sum(ref_after) / len(pairs))
    assert a.diff == pytest.approx(a.after - a.before) and a.lo <= a.diff <= a.hi
    assert (a.after_lo, a.after_hi) == wilson(sum(ref_after), len(pairs)) == accuracy_interval(ref_after)
    row = res.summary()
    assert row["flip_rate"] == pytest.approx(100 * (g2b + b2g) / len(pairs))
    assert res.verdict.verdict in ("changes", "no change shown") or res.verdict.verdict.startswith("undecided")
    # the margin moved: suppression of real neurons changes the log-probabilities
    assert (res.pairs["margin_after"] != res.pairs["margin_before"]).any()


def test_identity_interventions_change_nothing(setup):
    lm, pairs = setup
    for res in (fig6b_edit_effect(lm, pairs, [(1, 3)], factor=1.0), fig6b_edit_effect(lm, pairs, [])):
        assert res.accuracy.good_to_bad == res.accuracy.bad_to_good == 0
        assert res.accuracy.diff == 0 and res.margin.diff == pytest.approx(0, abs=1e-5)
        assert res.verdict.verdict == "no change shown" or res.verdict.verdict.startswith("undecided")


def test_weight_edit_is_scored_inside_and_restored_bit_identical(setup):
    lm, pairs = setup
    before = _state(lm)
    res = fig6b_edit_effect(lm, pairs, edit=lambda: kn_edit(lm, [(2, 5), (2, 6)], "this", "these", lambda2=50.0))
    after = _state(lm)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with kn_edit(lm, [(2, 5), (2, 6)], "this", "these", lambda2=50.0):
        ref = pair_scores(lm, pairs)["correct"].astype(int).tolist()
    assert res.pairs["correct_after"].tolist() == ref


def test_bad_input(setup):
    lm, pairs = setup
    with pytest.raises(ValueError, match="needs neurons"):
        fig6b_edit_effect(lm, pairs)
    with pytest.raises(ValueError, match="'suppress' or a callable"):
        fig6b_edit_effect(lm, pairs, [(1, 1)], edit="erase")
    with pytest.raises(ValueError, match="prompt, good, bad"):
        fig6b_edit_effect(lm, pairs.drop(columns="bad"), [(1, 1)])
    with pytest.raises(TypeError, match="neither"):
        fig6b_edit_effect(lm, pairs, edit=lambda: 42)
