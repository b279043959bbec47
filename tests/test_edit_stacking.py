"""Stacked weight edits restore correctly in any order (issue 8, "Edits").

The contract (kn_utils/editing/base.py): while edits are live the weights are exactly what applying
the live edits, in the order they were applied, to the unedited model gives; when the last one is
restored the weights are the originals, bit for bit; ``edit.applied`` says whether an edit is live.
The reference below recomputes that state from a copy of the unedited weights with its own code.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kn_utils as ku
from kn_utils.editing.base import WeightEdit, live_edits
from kn_utils.editing.kn import KNEdit, kn_edit, kn_erase
from kn_utils.editing.rome import ROMEHyperParams, rome_edit
from tiny_models import snapshot, assert_same

PROMPT = "The capital of France is"


class RankOne(WeightEdit):
    """A ROME-like edit: adds u λᵀ (float64, cast once) to the value slots of each listed layer."""

    def __init__(self, lm, layers, seed):
        super().__init__(lm, f"rank one on {layers}")
        g = torch.Generator().manual_seed(seed)
        self.updates = {layer: torch.outer(torch.randn(lm.arch.n_neurons, generator=g, dtype=torch.float64),
                                           torch.randn(lm.arch.d_model, generator=g, dtype=torch.float64))
                        for layer in layers}

    def _apply(self):
        for layer, update in self.updates.items():
            self._save(self.lm.arch.mlp_out[layer].weight)
            slots = self.lm.arch.value_slots(layer)
            slots.add_(update.to(slots.dtype))


def reference(lm, originals, edits):
    """Weights after applying ``edits`` in order to the unedited weights, computed independently
    (tiny LLaMA: a down_proj weight is [d_model, n_neurons], its value slots are the transpose)."""
    names = {id(p): n for n, p in lm.model.named_parameters()}
    out = {n: t.clone() for n, t in originals.items()}
    for edit in edits:
        if isinstance(edit, RankOne):
            for layer, update in edit.updates.items():
                w = out[names[id(lm.arch.mlp_out[layer].weight)]]
                w.T.add_(update.to(w.dtype))
        elif isinstance(edit, KNEdit):
            for layer, units in edit.by_layer.items():
                slots = out[names[id(lm.arch.mlp_out[layer].weight)]].T
                idx = torch.as_tensor(units)
                if edit.erase:
                    slots[idx] = 0
                else:
                    slots[idx] = (slots[idx].double() + edit._delta).to(slots.dtype)
        else:
            raise AssertionError(f"no reference for {edit!r}")
    return out


def assert_state(lm, originals, live):
    want = reference(lm, originals, live)
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, want[name]), name
    assert live_edits(lm.model) == live


# ---------------------------------------------------------------------------------- the case
def test_two_kn_edits_restored_in_application_order(tiny):
    """Before: restoring the first, then the second, left the first edit's change in the weights."""
    lm = tiny("llama")
    snap = snapshot(lm)
    first = kn_edit(lm, [(1, 3), (1, 5)], "Paris", "Rome")
    second = kn_erase(lm, [(1, 5), (1, 9)])
    assert first.applied and second.applied
    assert_state(lm, snap, [first, second])
    first.restore()
    assert not first.applied and second.applied
    assert_state(lm, snap, [second])          # as if only the erase had ever been applied
    second.restore()
    assert not first.applied and not second.applied
    assert_same(lm, snap)
    assert live_edits(lm.model) == []
    assert "not applied" in repr(first) and "not applied" in repr(second)


def test_two_rome_edits_restored_in_any_order(tiny, tmp_cache):
    lm = tiny("llama")
    snap = snapshot(lm)
    hp = ROMEHyperParams(layer=1, v_num_grad_steps=3, context_template_length_params=[[3, 1]],
                         mom2_adjustment=False)
    for order in ("first-first", "last-first"):
        a = rome_edit(lm, PROMPT, "France", "Rome", hp)
        after_a = snapshot(lm)
        b = rome_edit(lm, "The capital of Canada is", "Canada", "Paris", hp)
        assert a.applied and b.applied
        slots = lm.arch.value_slots(1)
        if order == "first-first":
            a.restore()
            assert not a.applied and b.applied
            # the weights are the original ones plus b's update alone
            want = snap["model.layers.1.mlp.down_proj.weight"].clone()
            want.T.add_(b.update_matrix().to(want.dtype))
            assert torch.equal(slots, want.T)
            b.restore()
        else:
            b.restore()
            assert_same(lm, after_a)           # last-in-first-out: exactly the state before b
            a.restore()
        assert not a.applied and not b.applied
        assert_same(lm, snap)


def test_failed_apply_keeps_the_other_live_edits(tiny):
    class Broken(WeightEdit):
        def _apply(self):
            w = self.lm.arch.mlp_out[1].weight
            self._save(w)
            w.mul_(3.0)
            raise RuntimeError("half-way")

    lm = tiny("llama")
    snap = snapshot(lm)
    live = kn_edit(lm, [(1, 3)], "Paris", "Rome")
    broken = Broken(lm, "broken")
    with pytest.raises(RuntimeError, match="half-way"):
        broken.apply()
    assert not broken.applied and live.applied
    assert_state(lm, snap, [live])
    live.restore()
    assert_same(lm, snap)


def test_nested_with_blocks_and_a_restore_inside(tiny):
    lm = tiny("llama")
    snap = snapshot(lm)
    outer = RankOne(lm, [1], seed=0)
    inner = RankOne(lm, [1, 2], seed=1)
    with outer:
        with inner:
            assert_state(lm, snap, [outer, inner])
            outer.restore()                    # out of order, inside the inner block
            assert_state(lm, snap, [inner])
            assert outer.apply() is outer      # re-applied: now after inner
            assert_state(lm, snap, [inner, outer])
        assert_state(lm, snap, [outer])
    assert_same(lm, snap)
    assert not outer.applied and not inner.applied


def test_edits_of_two_models_are_independent(tiny):
    lm, other = tiny("llama"), tiny("llama", seed=1)
    snap, other_snap = snapshot(lm), snapshot(other)
    a, b = RankOne(lm, [1], seed=0).apply(), RankOne(other, [1], seed=0).apply()
    a.restore()
    assert_same(lm, snap)
    assert b.applied and live_edits(other.model) == [b]
    b.restore()
    assert_same(other, other_snap)


# ---------------------------------------------------------------------------------- property test
_POOL = {}


def _pool(tiny):
    """Six edits overlapping layer 1's down_proj (and layer 2's): KN updates, a KN erase,
    ROME-like rank-one updates, one of them over two parameters."""
    if not _POOL:
        lm = tiny("llama")
        _POOL["lm"] = lm
        _POOL["edits"] = [
            KNEdit(lm, [(1, 3), (1, 5), (2, 7)], target_old="Paris", target_new="Rome"),
            KNEdit(lm, [(1, 5), (1, 9)], target_old="Rome", target_new="Paris", lambda1=0.5,
                   lambda2=3.0),
            KNEdit(lm, [(1, 3), (2, 7), (2, 8)], erase=True),
            RankOne(lm, [1], seed=0),
            RankOne(lm, [1], seed=1),
            RankOne(lm, [1, 2], seed=2),
        ]
    return _POOL["lm"], _POOL["edits"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["apply", "restore"]), st.integers(0, 5)), max_size=24),
       final=st.permutations(range(6)))
def test_random_stacks_restore_bit_exactly(tiny, ops, final):
    lm, edits = _pool(tiny)
    originals = snapshot(lm)
    live = []
    for op, i in ops:
        edit = edits[i]
        if op == "apply":
            edit.apply()
            if edit not in live:
                live.append(edit)
        else:
            edit.restore()
            if edit in live:
                live.remove(edit)
        assert [e.applied for e in edits] == [e in live for e in edits]
        assert_state(lm, originals, live)
    for i in final:   # restore whatever is live, in a random order
        edits[i].restore()
        if edits[i] in live:
            live.remove(edits[i])
        assert_state(lm, originals, live)
    assert_same(lm, originals)
    assert not any(e.applied for e in edits) and live_edits(lm.model) == []
    assert ku.hook_count(lm.model) == 0
