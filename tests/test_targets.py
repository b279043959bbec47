"""Prompts, targets, read positions and the documented input errors."""
import pytest
import torch

import kn_utils as ku
from kn_utils.targets import prepare, read_position


def test_leading_space_and_no_bos_in_target(default_lm):
    a = prepare(default_lm, "The capital of France is", "Paris")
    b = prepare(default_lm, "The capital of France is", " Paris")
    c = prepare(default_lm, "The capital of France is ", "Paris")
    assert a.target_ids == b.target_ids == c.target_ids
    assert default_lm.tokenizer.decode(a.target_ids) == " Paris"
    special = set(default_lm.tokenizer.all_special_ids)
    assert not special & set(a.target_ids)


def test_multi_token_targets_are_teacher_forced(default_lm):
    spec = prepare(default_lm, "The capital of France is", "New York City")
    assert len(spec.target_ids) == 3 and len(spec.groups()) == 1
    prompt_len = len(ku.targets.prompt_ids(default_lm, "The capital of France is"))
    assert [q.position for q in spec.queries] == [prompt_len - 1, prompt_len, prompt_len + 1]
    assert spec.queries[0].input_ids[prompt_len:] == spec.target_ids[:2]  # gold tokens, not argmax
    # product over tokens = P of the whole continuation, checked against one plain forward
    full = torch.tensor([list(spec.queries[0].input_ids) + [spec.target_ids[-1]]])
    with torch.no_grad():
        logp = default_lm.model(full).logits[0].log_softmax(-1)
    by_hand = sum(float(logp[prompt_len - 1 + j, t]) for j, t in enumerate(spec.target_ids))
    assert ku.target_probability(default_lm, "The capital of France is", "New York City") == pytest.approx(
        torch.tensor(by_hand).exp().item(), rel=1e-4)


def test_masked_lm_mask_position_and_multi_token(tiny):
    lm = tiny("bert")
    spec = prepare(lm, "The capital of France is [MASK] .", "Paris")
    assert lm.tokenizer.convert_ids_to_tokens(list(spec.target_ids)) == ["Paris"]
    q = spec.queries[0]
    assert q.input_ids[q.position] == lm.tokenizer.mask_token_id
    multi = prepare(lm, "The capital of France is [MASK] .", "Parisx")
    assert len(multi.target_ids) > 1
    # query j masks tokens j.. and shows gold tokens before j
    for j, query in enumerate(multi.queries):
        assert query.input_ids[query.position] == lm.tokenizer.mask_token_id
        assert list(query.input_ids[query.position - j:query.position]) == list(multi.target_ids[:j])


def test_roberta_accepts_bracket_mask_and_gets_leading_space(tiny):
    lm = tiny("roberta")
    spec = prepare(lm, "The capital of France is [MASK].", "Paris")
    assert lm.tokenizer.decode(list(spec.target_ids)) == " Paris"
    assert read_position(lm, spec.queries[0].input_ids) == spec.queries[0].position


@pytest.mark.parametrize("prompt,match", [
    ("", "empty prompt"), ("   ", "empty prompt"), (None, "empty prompt"),
    ("The capital of France is Paris.", r"exactly one mask token .* found 0"),
    ("[MASK] is the capital of [MASK].", r"exactly one mask token .* found 2"),
])
def test_bad_masked_prompts(tiny, prompt, match):
    with pytest.raises(ValueError, match=match):
        ku.predict(tiny("bert"), prompt)


def test_bad_targets_and_causal_masks(tiny, default_lm):
    with pytest.raises(ValueError, match="empty target"):
        ku.target_probability(default_lm, "The capital of France is", "  ")
    with pytest.raises(ValueError, match="cut the prompt at the mask"):
        ku.predict(default_lm, "The capital of France is [MASK].")
    with pytest.raises(ValueError, match="empty prompt"):
        ku.target_probability(tiny("gpt2"), "", "Paris")
    lm = tiny("bert")
    # a target made only of a special token tokenises to nothing
    with pytest.raises(ValueError, match="tokenises to nothing"):
        prepare(lm, "The capital of France is [MASK] .", "[SEP]")
    assert ku.hook_count(lm.model) == 0


def test_batched_logits_match_single_runs(tiny):
    lm = tiny("llama")
    prompts = ["The capital of France is", "Hi", "One two three four five six"]
    seqs = [ku.targets.prompt_ids(lm, p) for p in prompts]
    batched = ku.scoring.logits_at(lm, seqs, [len(s) - 1 for s in seqs])
    for i, s in enumerate(seqs):
        with torch.no_grad():
            single = lm.model(torch.tensor([s])).logits[0, -1]
        assert torch.allclose(batched[i], single, atol=1e-5)


def test_pad_batch_left_ends_rows_together(tiny):
    lm = tiny("llama")
    seqs = [[5, 6, 7], [8]]
    right_ids, right_mask = ku.targets.pad_batch(lm, seqs)
    left_ids, left_mask = ku.targets.pad_batch(lm, seqs, left=True)
    assert right_mask.tolist() == [[1, 1, 1], [1, 0, 0]] and left_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left_ids[0].tolist() == [5, 6, 7] and left_ids[1, -1].item() == 8
    assert left_ids[1, 0].item() == right_ids[1, 1].item()   # the same pad token on either side
