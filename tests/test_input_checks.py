"""Bad inputs get one clear, early error (issue 8, "Inputs"); good inputs of every accepted type work
the same as plain ints.  Every error case also checks that no hook and no weight change is left."""
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

import kn_utils as ku
from kn_utils import targets as tg
from kn_utils.attribution import (coarse_neurons, find_knowledge_neurons, ig_query, layer_distribution,
                                  r2_similarity)
from kn_utils.checks import as_index, as_indices
from kn_utils.data import pararel
from kn_utils.editing import rome
from kn_utils.editing.kn import kn_edit
from kn_utils.editing.rome import ROMEHyperParams, rome_edit
from kn_utils.evaluation import evaluate_edits
from kn_utils.hooks import hook_count
from kn_utils.tracing import causal_trace, restored_score
from tiny_models import snapshot

PROMPT = "The capital of France is"


def assert_clean(lm, snap):
    assert hook_count(lm.model) == 0
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, snap[name]), name


def prompt_of(lm, n_tokens, last=""):
    """A prompt of "the the ... [last]" that tokenises to exactly ``n_tokens`` tokens (special
    tokens included; the mask placeholder counted as the model's mask token)."""
    k = n_tokens
    while True:
        text = " ".join(["the"] * k + ([last] if last else []))
        shown = text.replace(tg.MASK_PLACEHOLDER, lm.tokenizer.mask_token) if lm.arch.is_masked_lm \
            else text
        n = len(lm.tokenizer(shown)["input_ids"])
        if n == n_tokens:
            return text
        assert n > n_tokens and k > 1, "each 'the' is one token"
        k -= n - n_tokens


# ------------------------------------------------------------------------------- the index helper
def test_index_helper_accepts_integer_scalars_and_rejects_the_rest():
    for ok in (2, np.int64(2), np.int32(2), torch.tensor(2), torch.tensor(2, dtype=torch.int8)):
        assert as_index(ok, "layer", 3) == 2 and type(as_index(ok, "layer", 3)) is int
    for bad in (True, np.bool_(True), 1.0, 1.7, np.float32(1.0), "1", None, torch.tensor(1.0),
                torch.tensor([1])):
        with pytest.raises(TypeError, match="layer must be an integer"):
            as_index(bad, "layer", 3)
    with pytest.raises(ValueError, match=r"layer 3 out of range: valid values are 0\.\.2"):
        as_index(np.int64(3), "layer", 3)
    assert as_index(-3, "position", 3, negative=True) == -3
    assert as_indices(np.array([0, 2]), "unit", 3) == [0, 2]
    assert as_indices(torch.tensor([0, 2]), "unit", 3) == [0, 2]
    with pytest.raises(TypeError, match="dtype"):
        as_indices(np.array([0.0, 2.0]), "unit", 3)
    with pytest.raises(TypeError, match="dtype"):
        as_indices(torch.tensor([True, False]), "unit", 3)
    with pytest.raises(TypeError, match="string"):
        as_indices("01", "unit", 3)


@pytest.mark.parametrize("bad", [1.0, 1.7, True, "1"])
def test_float_bool_str_indices_are_type_errors_everywhere(tiny, bad, tmp_cache):
    """Before: int(1.7) == 1 silently chose layer / neuron / token 1."""
    lm = tiny("gpt2")
    snap = snapshot(lm)
    ids = tg.prompt_ids(lm, PROMPT)
    calls = {
        "record layers": lambda: ku.record(lm, "neurons", layers=[bad]).__enter__(),
        "record layer": lambda: ku.record(lm, "hidden", layers=bad).__enter__(),
        "suppress layer": lambda: ku.suppress(lm, [(bad, 3)]).__enter__(),
        "suppress neuron": lambda: ku.suppress(lm, [(0, bad)]).__enter__(),
        "scale units": lambda: ku.hooks.scale_activation(lm, "neurons", 0, 0.0, units=[bad]).__enter__(),
        "scale positions": lambda: ku.hooks.scale_activation(lm, "hidden", 0, 0.0,
                                                             positions=bad).__enter__(),
        "scale rows": lambda: ku.hooks.set_activation(lm, "hidden", 0, 0.0, rows=[bad]).__enter__(),
        "ig layers": lambda: ku.integrated_gradients(lm, PROMPT, "Paris", steps=2, layers=[bad]),
        "ig position": lambda: ig_query(lm, ids, bad, 5, steps=2),
        "trace tokens": lambda: causal_trace(lm, PROMPT, "France", samples=2, noise=0.1, tokens=[bad]),
        "restored token": lambda: restored_score(lm, PROMPT, "France", [(bad, 0)], samples=2),
        "restored layer": lambda: restored_score(lm, PROMPT, "France", [(1, bad)], samples=2),
        "kn_edit neuron": lambda: kn_edit(lm, [(0, bad)], "Paris", "Rome"),
        "rome layer": lambda: rome_edit(lm, PROMPT, "France", "Rome",
                                        ROMEHyperParams(layer=bad, mom2_adjustment=False)),
        "rome loss layer": lambda: rome_edit(lm, PROMPT, "France", "Rome",
                                             ROMEHyperParams(layer=0, v_loss_layer=bad,
                                                             mom2_adjustment=False)),
        "layer_distribution": lambda: layer_distribution([(bad, 0)], 3),
    }
    for what, call in calls.items():
        with pytest.raises(TypeError, match="must be an integer|must hold integers|integer tensor") as err:
            call()
        assert repr(bad) in str(err.value) or "dtype" in str(err.value), what
        assert_clean(lm, snap)


def test_numpy_and_torch_integers_work_like_ints(tiny):
    """Before: numpy integers were rejected with a message saying 'out of range'."""
    lm = tiny("llama")
    ids = torch.tensor([tg.prompt_ids(lm, PROMPT)])

    def logits_with(neurons, positions=None):
        with ku.suppress(lm, neurons, positions=positions), torch.no_grad():
            return lm.model(input_ids=ids).logits

    plain = logits_with([(1, 7), (2, 30)], positions=-1)
    assert not torch.equal(plain, lm.model(input_ids=ids).logits)
    assert torch.equal(logits_with([(np.int64(1), np.int32(7)), (torch.tensor(2), 30)],
                                   positions=np.int64(-1)), plain)
    with ku.record(lm, "neurons", layers=np.int64(2)) as a, torch.no_grad():
        lm.model(input_ids=ids)
    with ku.record(lm, "neurons", layers=[2]) as b, torch.no_grad():
        lm.model(input_ids=ids)
    assert list(a) == [2] and torch.equal(a[2], b[2])
    ig_np = ku.integrated_gradients(lm, PROMPT, "Paris", steps=2, layers=np.array([1, 2]))
    ig_int = ku.integrated_gradients(lm, PROMPT, "Paris", steps=2, layers=[1, 2])
    assert torch.equal(ig_np, ig_int)
    tr_np = causal_trace(lm, PROMPT, "France", samples=2, noise=0.1, tokens=np.array([3, 4]))
    tr_int = causal_trace(lm, PROMPT, "France", samples=2, noise=0.1, tokens=[3, 4])
    assert torch.equal(tr_np.scores.nan_to_num(-1), tr_int.scores.nan_to_num(-1))
    hp = ROMEHyperParams(layer=np.int64(1), v_loss_layer=torch.tensor(2)).resolve(lm)
    assert (hp.layer, hp.v_loss_layer) == (1, 2) and type(hp.layer) is int
    with pytest.raises(ValueError, match=r"layer 3 out of range: the model has layers 0\.\.2"):
        ku.suppress(lm, [(np.int64(3), 0)]).__enter__()
    with pytest.raises(ValueError, match=r"neuron 64 out of range: layer 0 has neurons 0\.\.63"):
        ku.suppress(lm, [(0, np.int64(64))]).__enter__()
    assert hook_count(lm.model) == 0


# ------------------------------------------------------------------------------- context length
@pytest.mark.parametrize("family", ["gpt2", "bert", "roberta", "llama"])
def test_prompt_longer_than_the_context_is_a_value_error(tiny, family):
    """Before: IndexError (GPT-2, RoBERTa), RuntimeError (BERT), a silent run (LLaMA / RoPE)."""
    lm = tiny(family)
    limit = lm.arch.max_positions
    assert limit == {"gpt2": 1024, "bert": 512, "roberta": 127, "llama": 2048}[family]
    masked = lm.arch.is_masked_lm

    def make(n):  # n tokens in all; masked LMs get the mask as the last word
        return prompt_of(lm, n, "[MASK]" if masked else "")

    fits = make(limit)
    assert len(tg.prompt_ids(lm, fits)) == limit
    assert len(ku.predict(lm, fits, top_k=2)) == 2          # exactly the context: runs
    too_long = make(limit + 1)
    snap = snapshot(lm)
    for call in (lambda: ku.predict(lm, too_long),
                 lambda: ku.target_probability(lm, too_long, "Paris"),
                 lambda: ku.integrated_gradients(lm, too_long, "Paris", steps=2),
                 lambda: causal_trace(lm, too_long, "the", samples=2, noise=0.1)):
        with pytest.raises(ValueError, match=f"{limit + 1} tokens is longer than .* context of {limit}"):
            call()
    assert_clean(lm, snap)
    if not masked:
        # the prompt fits, but the teacher-forced target would push the input past the context
        with pytest.raises(ValueError, match=f"context of {limit}"):
            tg.prepare(lm, make(limit - 1), "Paris Paris Paris")
        assert tg.prepare(lm, make(limit - 1), "Paris").queries[0].position == limit - 2


# ------------------------------------------------------------------------------- targets
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_trailing_whitespace_of_a_target_is_stripped(tiny, family):
    """Before: "Paris " was scored as " Paris" followed by a space token."""
    lm = tiny(family)
    prompt = "The capital of France is [MASK]." if lm.arch.is_masked_lm else PROMPT
    target = "paris" if family == "bert" else "Paris"
    plain = tg.prepare(lm, prompt, target)
    for variant in (target + " ", target + "\n", target + " \t\n", " " + target + "  "):
        spec = tg.prepare(lm, prompt, variant)
        assert spec.target_ids == plain.target_ids, repr(variant)
        assert spec.target == variant.rstrip()
        assert ku.target_probability(lm, prompt, variant) == ku.target_probability(lm, prompt, target)
    # multi-token targets keep their inner spaces
    two = tg.prepare(lm, prompt, "paris city" if family == "bert" else "Paris city")
    assert len(two.target_ids) == len(tg.prepare(lm, prompt, two.target + " ").target_ids) >= 2


@pytest.mark.slow
def test_trailing_whitespace_on_default_model(default_lm):
    lm = default_lm
    p = ku.target_probability(lm, PROMPT, "Paris")
    assert p > 0.5
    for variant in ("Paris ", "Paris\n", " Paris "):
        assert ku.target_probability(lm, PROMPT, variant) == p
    assert lm.arch.max_positions == 8192
    with pytest.raises(ValueError, match="8193 tokens is longer than .* context of 8192"):
        ku.predict(lm, prompt_of(lm, 8193))


def test_top_k(tiny):
    lm = tiny("gpt2")
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    assert len(ku.predict(lm, PROMPT, top_k=3)) == 3
    assert len(ku.predict(lm, PROMPT, top_k=np.int64(2))) == 2
    for bad in (-1, 0, True, 1.5, "3"):
        with pytest.raises(ValueError, match="top_k must be a positive integer"):
            ku.predict(lm, PROMPT, top_k=bad)
    with pytest.raises(ValueError, match=f"top_k={vocab + 1} exceeds the vocabulary of {vocab}"):
        ku.predict(lm, PROMPT, top_k=vocab + 1)


# ------------------------------------------------------------------------------- tracing
def test_causal_trace_tokens(tiny):
    lm = tiny("gpt2")
    with pytest.raises(ValueError, match="tokens is empty"):
        causal_trace(lm, PROMPT, "France", samples=2, noise=0.1, tokens=[])
    with pytest.raises(ValueError, match=r"token 99 out of range: the prompt has tokens 0\.\.4"):
        causal_trace(lm, PROMPT, "France", samples=2, noise=0.1, tokens=[1, 99])
    with pytest.raises(ValueError, match="token 7 out of range"):
        restored_score(lm, PROMPT, "France", [(7, 0)], samples=2)
    with pytest.raises(ValueError, match="a state is a .token, layer. pair"):
        restored_score(lm, PROMPT, "France", [3], samples=2)
    assert hook_count(lm.model) == 0


# ------------------------------------------------------------------------------- ROME settings
def test_rome_hparams_fail_early(tiny, tmp_cache, monkeypatch):
    """Before: a dict gave AttributeError; v_lr=nan failed only after the statistics pass."""
    lm = tiny("llama")
    snap = snapshot(lm)

    def no_stats(*args, **kwargs):
        raise AssertionError("the statistics pass started before the settings were checked")
    monkeypatch.setattr(rome.stats, "layer_stats", no_stats)
    monkeypatch.setattr(rome.templates, "context_templates", no_stats)
    with pytest.raises(TypeError, match=r"ROMEHyperParams or None, got dict .*ROMEHyperParams\(\*\*"):
        rome_edit(lm, PROMPT, "France", "Rome", {"layer": 1})
    bad = [("v_lr", math.nan), ("v_lr", math.inf), ("v_lr", 0.0), ("v_lr", -0.5), ("v_lr", "0.5"),
           ("clamp_norm_factor", math.nan), ("kl_factor", math.nan), ("kl_factor", -1.0),
           ("v_weight_decay", math.nan), ("early_stop_loss", math.nan),
           ("mom2_update_weight", 1.5), ("mom2_update_weight", math.nan),
           ("v_num_grad_steps", True), ("v_num_grad_steps", 2.0), ("mom2_n_samples", 0),
           ("mom2_adjustment", "yes"), ("context_template_length_params", [[5.5, 2]])]
    for name, value in bad:
        hp = ROMEHyperParams(layer=1, mom2_adjustment=True)
        setattr(hp, name, value)
        with pytest.raises(ValueError, match=name):
            rome_edit(lm, PROMPT, "France", "Rome", hp)
    assert_clean(lm, snap)


def test_evaluate_edits_arguments(tiny, monkeypatch):
    monkeypatch.setattr(pararel, "data_root", lambda data_dir=None: None)   # built-in mini set
    lm = tiny("llama")
    snap = snapshot(lm)

    def never(*args):
        raise AssertionError("an item was edited before the arguments were checked")
    with pytest.raises(ValueError, match="n_locality must be an integer >= 0, got -1"):
        evaluate_edits(lm, never, "P36", n=2, n_locality=-1, progress=False)
    with pytest.raises(TypeError, match="got dict"):
        evaluate_edits(lm, "rome", "P36", n=2, hparams={"layer": 1}, progress=False)
    with pytest.raises(ValueError, match="v_lr"):
        evaluate_edits(lm, "rome", "P36", n=2, hparams=ROMEHyperParams(v_lr=math.nan), progress=False)
    with pytest.raises(TypeError, match="KN editor hparams must be a dict"):
        evaluate_edits(lm, "kn", "P36", n=2, hparams=ROMEHyperParams(), progress=False)

    def returns_none(lm_, request):
        return None
    with pytest.raises(TypeError, match="returned NoneType for item 0, not an edit with .restore"):
        evaluate_edits(lm, returns_none, "P36", n=2, progress=False)
    assert_clean(lm, snap)


# ------------------------------------------------------------------------------- KN selection
def test_kn_thresholds_and_nan_maps(tiny):
    lm = tiny("gpt2")
    prompts = [PROMPT, "Paris is the capital of"]
    maps = torch.rand(2, lm.arch.n_layers, lm.arch.n_neurons, generator=torch.Generator().manual_seed(0))
    ok = find_knowledge_neurons(lm, prompts, "Paris", maps=maps, threshold=1.0, tau=1.0, adaptive=False)
    assert ok.neurons == [] and ok.r2 > 0
    for kwargs, match in [({"threshold": 0}, "threshold must lie in \\(0, 1\\]"),
                          ({"threshold": 1.5}, "threshold must lie in \\(0, 1\\]"),
                          ({"threshold": -0.2}, "threshold must lie in \\(0, 1\\]"),
                          ({"threshold": math.nan}, "threshold must be a finite number"),
                          ({"tau": 0}, "tau must lie in \\(0, 1\\]"),
                          ({"tau": 1.5}, "tau must lie in \\(0, 1\\]"),
                          ({"tau": math.nan}, "tau must lie in \\(0, 1\\]"),
                          ({"threshold": 120, "mode": "percentile"}, "\\[0, 100\\]")]:
        with pytest.raises(ValueError, match=match):
            find_knowledge_neurons(lm, prompts, "Paris", maps=maps, **kwargs)
    with pytest.raises(ValueError, match="threshold must lie in"):
        coarse_neurons(maps[0], threshold=0.0)
    assert coarse_neurons(maps[0], threshold=2.0, mode="absolute") == []  # absolute: any finite cut

    nan_maps = maps.clone()
    nan_maps[1, 0, 0] = math.nan
    # before: r2_similarity returned -1 for these and selection went on without a word
    with pytest.raises(ValueError, match=r"1 NaN / infinite values \(in 1 of 2 maps\)"):
        r2_similarity(nan_maps)
    with pytest.raises(ValueError, match="maps contain 1 NaN"):
        find_knowledge_neurons(lm, prompts, "Paris", maps=nan_maps)
    with pytest.raises(ValueError, match="NaN"):
        coarse_neurons(nan_maps[1])
    inf_maps = maps.clone()
    inf_maps[0, 1, 1] = math.inf
    with pytest.raises(ValueError, match="infinite"):
        r2_similarity(inf_maps)


# ------------------------------------------------------------------------------- whole-word subjects
IRAN = "Iranian officials met Iran's president in"


def test_subject_span_matches_the_whole_word_first(tiny):
    lm = tiny("llama")
    ids, (b, e) = ku.subject_span(lm, IRAN, "Iran")
    # before: the "Iran" of "Iranian" (token 0 or 1), now the one of "Iran's"
    text = lm.tokenizer.decode(ids[b:e]).strip()
    assert text == "Iran" and b > 2, (b, e, text)
    assert tg.find_subject(IRAN, "Iran") == IRAN.index("Iran's")
    assert tg.find_subject("Paris, France", "Paris") == 0
    assert tg.find_subject("the U.S. is", "U.S.") == 4          # punctuation ends a word too
    assert tg.find_subject("首都は東京です", "東京") == 3             # scripts written without spaces


@pytest.mark.parametrize("prompt", ["The Iranian officials met in", "Iranians met in"])
def test_a_subject_only_inside_longer_words_is_an_error(tiny, prompt):
    lm = tiny("llama")
    with pytest.raises(ValueError, match="only inside a longer word .*'Iranian"):
        ku.subject_span(lm, prompt, "Iran")


def test_rome_edit_uses_the_whole_word_and_refuses_in_word_subjects(tiny, tmp_cache, monkeypatch):
    from kn_utils.editing.rome import compute

    lm = tiny("llama")
    [row] = compute._rows(lm, "{}", IRAN, "Iran", None)
    assert row.subject_index == ku.subject_span(lm, IRAN, "Iran")[1][1] - 1
    snap = snapshot(lm)
    # refused before the templates are generated or any statistics computed
    monkeypatch.setattr(rome.templates, "_generate", lambda *a: pytest.fail("computed before the check"))
    with pytest.raises(ValueError, match="only inside a longer word"):
        rome_edit(lm, "The Iranian officials met in", "Iran", "Paris",
                  ROMEHyperParams(layer=1, v_num_grad_steps=1, context_template_length_params=[[3, 1]]))
    assert_clean(lm, snap)


# ------------------------------------------------------------------------------- CounterFact records
def _counterfact_folder(tmp_path, change):
    record = {"case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
              "subject": "Danielle Darrieux", "ground_truth": "French",
              "rephrase_prompt": "Danielle Darrieux speaks", "locality_prompt": "Michel Rocard speaks",
              "locality_ground_truth": "French"}
    good = dict(record, case_id=6)
    change(record)
    folder = tmp_path / "data" / "counterfact" / "easyedit-split"
    folder.mkdir(parents=True)
    (folder / "counterfact-edit.json").write_text(json.dumps([good, record]))
    return tmp_path / "data"


CF_DAMAGE = {
    "no target_new": (lambda r: r.pop("target_new"), "field 'target_new' is missing"),
    "null target_new": (lambda r: r.update(target_new=None), "field 'target_new' is null"),
    "empty ground_truth": (lambda r: r.update(ground_truth="  "), "field 'ground_truth' is empty"),
    "numeric subject": (lambda r: r.update(subject=3), "field 'subject' is int"),
    "null prompt": (lambda r: r.update(prompt=None), "field 'prompt' is null"),
    "subject not in prompt": (lambda r: r.update(subject="Rocard"), "not in its prompt"),
}


@pytest.mark.parametrize("damage", list(CF_DAMAGE))
def test_counterfact_records_with_missing_fields_are_refused(tiny, tmp_path, damage):
    from kn_utils.counterfact_eval import evaluate_counterfact
    from kn_utils.data.counterfact import load_counterfact

    change, message = CF_DAMAGE[damage]
    data = _counterfact_folder(tmp_path, change)
    path = data / "counterfact" / "easyedit-split" / "counterfact-edit.json"
    # before: a record without target_new was edited towards "nan" and counted a success
    with pytest.raises(ValueError, match=re.escape(f"{path}, record 1 (case_id 7): ") + ".*" + re.escape(message)):
        load_counterfact(data)
    assert len(load_counterfact(data, n=1)) == 1      # the records asked for are fine
    records = pd.DataFrame(json.loads(path.read_text()))   # a table handed over directly
    lm = tiny("llama")
    calls = []
    with pytest.raises(ValueError, match="record 1"):
        evaluate_counterfact(lm, lambda lm, req: calls.append(req), n=None, records=records, progress=False)
    assert calls == []                                  # refused before the first edit


@pytest.mark.parametrize("n", [0, -2, 1.5, True, "3"])
def test_counterfact_sizes(tiny, n):
    from kn_utils.counterfact_eval import evaluate_counterfact

    with pytest.raises(ValueError, match="positive integer"):   # before: 0 = all, -2 = all but two
        evaluate_counterfact(tiny("llama"), lambda lm, req: None, n=n, records=pd.DataFrame())


def test_known_facts_with_a_null_field_are_refused(tmp_path):
    from kn_utils.data.counterfact import load_known_facts

    folder = tmp_path / "counterfact"
    folder.mkdir()
    facts = [{"known_id": 0, "subject": "Paris", "attribute": "France", "prompt": "Paris is in"},
             {"known_id": 1, "subject": "Rome", "attribute": None, "prompt": "Rome is in"}]
    (folder / "known_1000.json").write_text(json.dumps(facts))
    with pytest.raises(ValueError, match=r"known_1000.json, record 1: .*field 'attribute' is null"):
        load_known_facts(tmp_path)      # before: target " None"
