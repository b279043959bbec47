"""The batching engine's pieces against plain forwards: rows joining late, widened KV caches, logits
read at one position.  (The methods built on it are checked end to end in test_attribution.py and
test_tracing.py against kn_utils.reference.)"""
import pytest
import torch

from kn_utils import engine, hooks, models
from kn_utils.hooks import hook_count, modify

PROMPT = "The capital of France is"


def _ids(lm, text=PROMPT):
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


def _scaler(rows_to_factor, last=False):
    """A site writer multiplying given rows (at every position, or the ``last`` only) by given
    factors, out of place."""
    def fn(value):
        factor = torch.ones(value.shape[0], value.shape[1] if last else 1, 1, dtype=value.dtype)
        for row, f in rows_to_factor.items():
            factor[row, -1] = f
        return value * factor
    return fn


def test_widening_row_layout():
    plan = engine.Widening(2, [0, 3, 0, 1])
    assert plan.rows_at == [2, 8, 8, 10] and plan.rows_in == plan.rows_at
    assert plan.group(0) == slice(2, 4) and plan.group(3) == slice(8, 10)
    after = engine.Widening(2, [1, 0, 2], after=True)
    assert after.rows_at == [4, 4, 8] and after.rows_in == [2, 4, 4]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "bert"])
@pytest.mark.parametrize("position", [2, -1])
def test_read_logits_at_one_position_equals_full_logits(tiny, family, position):
    lm = tiny(family)
    ids = _ids(lm).expand(3, -1)
    with torch.no_grad():
        full = lm.model(input_ids=ids).logits[:, position]
        got = engine.read_logits(lm, None, position, input_ids=ids)
        pairs = engine.read_logits(lm, [0, 2], [position, 1], input_ids=ids)
        whole = lm.model(input_ids=ids).logits
    assert got.shape == full.shape
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pairs, torch.stack([whole[0, position], whole[2, 1]]), rtol=1e-5,
                               atol=1e-6)
    assert hook_count(lm.model) == 0


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "gemma3", "bert"])
def test_rows_joining_late_equal_full_rows(tiny, family):
    """Rows that join at block 1 (and 2) with their own neuron scaling there give the logits of a
    plain batch in which every row runs every block."""
    lm = tiny(family)
    ids, read = _ids(lm), 3
    plan = engine.Widening(1, [0, 2, 1])  # rows 1, 2 join at block 1; row 3 at block 2
    writers = {1: _scaler({1: 0.0, 2: 3.0}), 2: _scaler({3: -1.0})}
    with torch.no_grad():
        got = engine.forward(lm, ids, read, widening=plan, site="neurons", writers=writers)
        plain = {1: _scaler({1: 0.0, 2: 3.0}), 2: _scaler({3: -1.0})}
        with modify(lm, "neurons", plain):
            want = lm.model(input_ids=ids.expand(4, -1)).logits[:, read]
    assert got.shape == want.shape == (4, want.shape[-1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want[1] - want[0]).abs().max() > 1e-4  # the writes change something
    assert hook_count(lm.model) == 0


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_block_output_rows_join_after_the_block_with_a_widened_cache(tiny, family):
    """``after``: rows changing block l's output join after block l; the prefix cache of a 2-row
    carrier is widened to each block's rows.  Equals two full-sequence plain forwards."""
    lm = tiny(family)
    ids, start = _ids(lm), 2
    n_tok, n_layers = ids.shape[1], lm.arch.n_layers
    carrier = ids.expand(2, -1)
    assert engine.joins_after_block(lm, "hidden") and not engine.joins_after_block(lm, "mlp")
    plan = engine.Widening(2, [1] + [0] * (n_layers - 1), after=True)  # 2 rows join after block 0
    past = engine.prefix_cache(lm, carrier[:, :start])
    engine.widen_cache(past, plan.rows_in, 2)
    with torch.no_grad():
        got = engine.forward(lm, carrier[:, start:], n_tok - 1 - start, past=past,
                             attention_mask=torch.ones(2, n_tok, dtype=torch.long), widening=plan,
                             site="hidden", writers={0: _scaler({2: 0.5, 3: 2.0}, last=True)})
        with modify(lm, "hidden", {0: _scaler({2: 0.5, 3: 2.0}, last=True)}):
            want = lm.model(input_ids=ids.expand(4, -1)).logits[:, -1]
    assert got.shape == want.shape == (4, want.shape[-1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want[2] - want[0]).abs().max() > 1e-4 and hook_count(lm.model) == 0


def test_default_rows_follow_the_budget(tiny):
    lm = tiny("llama")
    per = engine.row_bytes(lm, 10, saved=True)
    assert per == lm.arch.n_layers * (8 * lm.arch.d_model + 3 * lm.arch.n_neurons) * 4 * 10
    assert engine.default_rows(lm, per, 100 * per) == 100
    assert engine.default_rows(lm, per, 100 * per, maximum=7) == 7
    assert engine.default_rows(lm, per, per // 2, minimum=3) == 3
    assert engine.use_prefix_cache(lm, None) and not engine.use_prefix_cache(lm, False)
    assert not engine.use_prefix_cache(tiny("bert"), True)  # a masked LM has no prefix to reuse


def test_moved_names_live_in_one_place():
    """The batching mechanics live in engine only: no silent forward from hooks / models (it closed
    an import circle hooks <-> engine)."""
    for name in ("batch_widener", "gather_logits", "narrow_logits", "read_logits"):
        assert callable(getattr(engine, name)) and not hasattr(hooks, name)
    assert not hasattr(models, "cache_kwarg") and not hasattr(models, "returned_cache")
    with pytest.raises(AttributeError, match="no_such_name"):
        hooks.no_such_name  # noqa: B018


def test_uneven_rows_in_an_unlayered_cache_are_an_error():
    class Flat:  # a cache with no per-layer rows
        def batch_select_indices(self, index):
            raise AssertionError("must not be called")
    with pytest.raises(ValueError, match="prefix_cache=False"):
        engine.widen_cache(Flat(), [2, 4], 2)
