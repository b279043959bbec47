"""Hook context managers: clean-up on error, values written, gradients, random nestings."""
from contextlib import ExitStack

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kn_utils as ku


def _ids(lm):
    return torch.tensor([ku.targets.prompt_ids(lm, "The capital of France is")])


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


class Boom(Exception):
    pass


def _all_contexts(lm):
    return [
        lambda: ku.record(lm, "neurons"),
        lambda: ku.record(lm, "hidden", [0, 1]),
        lambda: ku.suppress(lm, [(0, 1), (2, 5)]),
        lambda: ku.enhance(lm, [(1, 3)], factor=3.0, positions=-1),
        lambda: ku.set_activation(lm, "mlp", 1, 0.5, units=[0, 2], positions=[0]),
        lambda: ku.add_activation(lm, "attn", 2, 1.0, rows=[0]),
        lambda: ku.scale_activation(lm, "embed", None, 2.0),
        lambda: ku.modify(lm, "pre_act", {0: lambda v: v * 0}),
    ]


def test_no_hook_survives_a_raising_body(tiny):
    lm = tiny("llama")
    before = ku.hook_count(lm.model)
    for make in _all_contexts(lm):
        with pytest.raises(Boom):
            with make():
                assert ku.hook_count(lm.model) > before
                lm.model(_ids(lm))
                raise Boom()
        assert ku.hook_count(lm.model) == before


def test_bad_neuron_leaves_no_hook(tiny):
    lm = tiny("gpt2")
    with pytest.raises(ValueError, match="neuron 9999 out of range"):
        with ku.suppress(lm, [(0, 1), (1, 9999)]):
            pass
    with pytest.raises(ValueError, match="layer 7 out of range"):
        with ku.suppress(lm, [(7, 1)]):
            pass
    with pytest.raises(ValueError, match="layer -1 out of range"):
        with ku.record(lm, "neurons", [-1]):
            pass
    with pytest.raises(ValueError, match="no neurons given"):
        with ku.suppress(lm, []):
            pass
    with pytest.raises(ValueError, match="unknown site"):
        with ku.record(lm, "residual"):
            pass
    assert ku.hook_count(lm.model) == 0


def test_set_scale_add_touch_only_the_selection(tiny):
    lm = tiny("llama")
    ids = torch.cat([_ids(lm)] * 3)
    with ku.record(lm, "neurons", [1]) as clean:
        _logits(lm, ids)
    edits = {
        "set": (lambda: ku.set_activation(lm, "neurons", 1, 7.0, units=[4, 9], positions=[2], rows=[1]),
                lambda x: torch.full_like(x, 7.0)),
        "scale": (lambda: ku.scale_activation(lm, "neurons", 1, -2.0, units=[4, 9], positions=[2], rows=[1]),
                  lambda x: -2.0 * x),
        "add": (lambda: ku.add_activation(lm, "neurons", 1, 0.25, units=[4, 9], positions=[2], rows=[1]),
                lambda x: x + 0.25),
    }
    for name, (make, expected) in edits.items():
        with make(), ku.record(lm, "neurons", [1]) as seen:
            # the recording hook runs after the edit hook, so it sees the written values
            _logits(lm, ids)
        want = clean[1].clone()
        want[1, 2, [4, 9]] = expected(clean[1][1, 2, [4, 9]])
        assert torch.equal(seen[1], want), name


def test_gradients_flow_through_written_values(tiny):
    lm = tiny("gpt2")
    scale = torch.tensor(0.5, requires_grad=True)
    with ku.modify(lm, "neurons", {1: lambda v: v * scale}):
        out = lm.model(_ids(lm)).logits[0, -1].logsumexp(-1)
    out.backward()
    assert scale.grad is not None and scale.grad.abs() > 0
    assert ku.hook_count(lm.model) == 0


def test_suppress_and_enhance_change_only_chosen_neurons(tiny):
    lm = tiny("qwen2")
    ids = _ids(lm)
    with ku.record(lm, "neurons", [2]) as clean:
        _logits(lm, ids)
    chosen = [(2, 3), (2, 11)]
    for ctx, factor in ((ku.suppress(lm, chosen), 0.0), (ku.enhance(lm, chosen), 2.0)):
        with ctx, ku.record(lm, "neurons", [2]) as seen:
            _logits(lm, ids)
        changed = (seen[2] != clean[2]).any(dim=(0, 1)).nonzero().flatten().tolist()
        assert changed == [3, 11]
        assert torch.equal(seen[2][..., [3, 11]], clean[2][..., [3, 11]] * factor)


@st.composite
def _plans(draw):
    return draw(st.lists(st.tuples(st.integers(0, 7), st.booleans()), min_size=1, max_size=5))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=_plans())
def test_random_nestings_leave_the_model_untouched(tiny, plan):
    lm = tiny("gpt2")
    ids = _ids(lm)
    reference = _logits(lm, ids)
    makers = _all_contexts(lm)
    try:
        with ExitStack() as stack:
            for which, raise_here in plan:
                stack.enter_context(makers[which]())
                _logits(lm, ids)
                if raise_here:
                    raise Boom()
    except Boom:
        pass
    assert ku.hook_count(lm.model) == 0
    assert torch.equal(_logits(lm, ids), reference)
