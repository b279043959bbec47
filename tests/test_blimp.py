import json
import re
import sys
import warnings

import numpy as np
import pytest
import torch

import kn_utils as ku
from kn_utils import blimp_tasks
from kn_utils.data import BuiltinDataWarning, blimp
from kn_utils.hooks import hook_count
from kn_utils.scoring import target_log_probs
from kn_utils.targets import prepare


def _rows(data_dir, uid, n):
    with open(data_dir / "blimp" / f"{uid}.jsonl") as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.fixture
def no_hub(monkeypatch):
    def fail(uid):
        raise ValueError("hub disabled in this test")
    monkeypatch.setattr(blimp, "_from_hub", fail)


# ---------------------------------------------------------------------------- names and loading
def test_short_names_and_unknown_paradigm():
    assert blimp.resolve_uid("with_adj_1") == "determiner_noun_agreement_with_adjective_1"
    assert blimp.resolve_uid("dna_adj_2") == "determiner_noun_agreement_with_adj_2"
    assert blimp.resolve_uid("determiner_noun_agreement_with_adj_1") == \
        "determiner_noun_agreement_with_adjective_1"
    assert blimp.resolve_uid("dna_irr_1") == "determiner_noun_agreement_irregular_1"
    assert set(blimp.PAPER_PARADIGMS) <= set(blimp.paradigms())
    with pytest.raises(ValueError, match="unknown BLiMP paradigm 'dna_9'.*determiner_noun_agreement_1"):
        blimp.load_paradigm("dna_9")
    with pytest.raises(ValueError, match="positive integer"):
        blimp.load_paradigm("dna_1", n=0)
    with pytest.raises(ValueError, match="source"):
        blimp.load_paradigm("dna_1", source="web")


def test_files_first(data_dir):
    rows = blimp.load_paradigm("dna_1", data_dir=data_dir, n=3)
    assert rows == _rows(data_dir, "determiner_noun_agreement_1", 3)


def test_builtin_fallback(tmp_path, no_hub):
    with pytest.warns(BuiltinDataWarning, match="built-in mini set builtin:blimp_mini.jsonl"):
        rows = blimp.load_paradigm("regular_plural_subject_verb_agreement_1", data_dir=tmp_path)
    assert len(rows) >= 20 and {r["UID"] for r in rows} == {"regular_plural_subject_verb_agreement_1"}
    assert set(blimp.PAPER_PARADIGMS) <= set(blimp.builtin_paradigms())
    with pytest.raises(ValueError, match="no BLiMP data for 'adjunct_island'"):
        blimp.load_paradigm("adjunct_island", data_dir=tmp_path)
    with pytest.raises(ValueError, match="no BLiMP file"):
        blimp.load_paradigm("dna_1", data_dir=tmp_path, source="files")


def test_malformed_line_names_file_and_line(tmp_path, no_hub):
    folder = tmp_path / "blimp"
    folder.mkdir()
    path = folder / "determiner_noun_agreement_1.jsonl"
    good = json.dumps(blimp._builtin_rows()[0])
    # line 3 is blank (skipped, but counted), line 4 is cut off: the error must say line 4, not line 1
    path.write_text(f"{good}\n{good}\n\n{good[:40]}\n{good}\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 4: not valid JSON"):
        blimp.load_paradigm("dna_1", data_dir=tmp_path)
    path.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 2: expected a JSON object"):
        blimp.load_paradigm("dna_1", data_dir=tmp_path)
    path.write_text(f"{good}\n\n{good}\n")
    rows = blimp.load_paradigm("dna_1", data_dir=tmp_path)
    assert len(rows) == 2 and rows.source == f"{path} (2 items)"


def test_hub_needs_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ValueError, match="pip install datasets"):
        blimp.load_paradigm("dna_1", source="hub")


def test_differing_word():
    g, b = "Most legislatures haven't disliked children.", "Most legislatures hasn't disliked children."
    s, eg, eb = blimp._differing_word(g, b)
    assert (g[s:eg], b[s:eb]) == ("haven", "hasn")
    s, eg, eb = blimp._differing_word("These men left.", "These man left.")
    assert (s, eg, eb) == (6, 9, 9)
    s, eg, eb = blimp._differing_word("this sketch.", "this sketches.")
    assert ("this sketch."[s:eg], "this sketches."[s:eb]) == ("sketch", "sketches")
    assert blimp._differing_word("a b c", "x b y") is None  # two words differ
    assert blimp._differing_word("same", "same") is None


# ---------------------------------------------------------------------------- decoder prompts
def test_decoder_prefix_and_leading_space(default_lm, data_dir):
    df = blimp.minimal_pairs(default_lm, "dna_1", data_dir=data_dir, n=6)
    rows = _rows(data_dir, "determiner_noun_agreement_1", 6)
    assert list(df["prompt"]) == [r["one_prefix_prefix"] for r in rows]
    assert list(df["good"]) == [r["one_prefix_word_good"] for r in rows]
    first = df.iloc[0]
    assert (first.prompt, first.good_token, first.bad_token) == ("Raymond is selling this", " sketch",
                                                               " sketches")
    assert first.n_good_tokens == 1
    assert df.iloc[1].good_token == " grocery store" and df.iloc[1].n_good_tokens == 2
    assert list(df["determiner"]) == [r["one_prefix_prefix"].split()[-1].lower() for r in rows]
    assert all((g == "plural") == (d in ("these", "those")) for g, d in zip(df["group"], df["determiner"]))
    assert df.attrs["n_skipped"] == 0 and df.attrs["source"].endswith("determiner_noun_agreement_1.jsonl")


def test_decoder_rejects_two_prefix(tiny, data_dir):
    with pytest.raises(ValueError, match="two-prefix.*causal LM"):
        blimp.minimal_pairs(tiny("llama"), "dna_2", data_dir=data_dir, n=5)
    with pytest.raises(ValueError, match="two-prefix"):
        blimp.minimal_pairs(tiny("gpt2"), "regular_plural_subject_verb_agreement_2", data_dir=data_dir,
                            n=5)


def test_sva_and_anaphor_groups(tiny, data_dir):
    lm = tiny("llama")  # same tokenizer as the default model, instant forward passes
    df = blimp.minimal_pairs(lm, "regular_plural_subject_verb_agreement_1", data_dir=data_dir, n=40)
    rows = {int(r["pairID"]): r for r in _rows(data_dir, "regular_plural_subject_verb_agreement_1", 40)}
    for r in df.itertuples():
        verb = r.good
        # reference: an auxiliary table, or which of the two forms carries the extra -s
        if verb in ("are", "were", "have", "aren't", "weren't", "haven't", "don't", "do"):
            want = "plural"
        elif verb in ("is", "was", "has", "isn't", "wasn't", "hasn't", "doesn't", "does"):
            want = "singular"
        else:
            want = "singular" if len(r.good) > len(r.bad) else "plural"
        assert r.group == want, (r.prompt, verb)
        assert r.subject == rows[r.pair_id]["one_prefix_prefix"].split()[-1]
    assert set(df["group"]) == {"singular", "plural"}
    gender = blimp.minimal_pairs(lm, "anaphor_gender", data_dir=data_dir, n=20)
    want = {"herself": "female", "himself": "male", "itself": "neuter"}
    assert all(want[g] == grp for g, grp in zip(gender["good"], gender["group"]))
    number = blimp.minimal_pairs(lm, "anaphor_number", data_dir=data_dir, n=20)
    assert all((g == "themselves") == (grp == "plural") for g, grp in zip(number["good"], number["group"]))


# ---------------------------------------------------------------------------- masked prompts
def test_masked_single_token_difference(tiny, data_dir):
    bert = tiny("bert")
    df = blimp.minimal_pairs(bert, "dna_2", data_dir=data_dir, n=30)
    rows = {int(r["pairID"]): r for r in _rows(data_dir, "determiner_noun_agreement_2", 30)}
    assert len(df) + df.attrs["n_skipped"] == 30
    for r in df.itertuples():
        assert r.prompt.count("[MASK]") == 1
        assert r.prompt.replace("[MASK]", r.good) == rows[r.pair_id]["sentence_good"]
        assert r.prompt.replace("[MASK]", r.bad) == rows[r.pair_id]["sentence_bad"]
        assert r.determiner == r.good.lower()
        assert r.group == ("plural" if r.good.lower() in ("these", "those") else "singular")
        assert r.n_good_tokens == r.n_bad_tokens == 1
    # type 1 with the tiny WordPiece vocabulary: most nouns are several pieces -> skipped, counted
    df1 = blimp.minimal_pairs(bert, "dna_1", data_dir=data_dir, n=30)
    assert df1.attrs["n_skipped"] > 0 and len(df1) + df1.attrs["n_skipped"] == 30
    assert all("tokens, not one" in why for _, why in df1.attrs["skipped"])
    kept = {int(r["pairID"]) for r in _rows(data_dir, "determiner_noun_agreement_1", 30)
            if len(prepare(bert, "x [MASK] .", r["one_prefix_word_good"]).target_ids) == 1
            and len(prepare(bert, "x [MASK] .", r["one_prefix_word_bad"]).target_ids) == 1}
    assert set(df1["pair_id"]) == kept
    with pytest.raises(ValueError, match="single token"):
        blimp.minimal_pairs(bert, "dna_1", data_dir=data_dir, n=30, on_unusable="error")


def test_dna2_template_expansion(tiny, data_dir):
    bert = tiny("bert")
    rows = _rows(data_dir, "determiner_noun_agreement_2", 20)
    ex = blimp.expand_templates(bert, "dna_2", data_dir=data_dir, n=20, n_templates=4)
    pairs = list(dict.fromkeys((r["two_prefix_prefix_good"].split()[-1].lower(), r["two_prefix_word"])
                               for r in rows))
    assert ex.attrs["n_pairs"] == len(pairs) and ex.attrs["n_templates"] == 4
    assert len(ex) == 4 * len(pairs)
    assert list(dict.fromkeys(zip(ex["determiner"], ex["noun"]))) == pairs
    for (det, noun), bag in ex.groupby(["determiner", "noun"], sort=False):
        assert len(bag) == 4
        for prompt, row in zip(bag["prompt"], rows[:4]):
            head = row["two_prefix_prefix_good"].rsplit(" ", 1)[0]
            tail = row["sentence_good"][len(row["two_prefix_prefix_good"]) + 1 + len(row["two_prefix_word"]):]
            assert prompt == f"{head} [MASK] {noun}{tail}"
        assert set(bag["good"]) == {det}
        assert set(bag["group"]) == {"plural" if det in ("these", "those") else "singular"}
    adj = blimp.expand_templates(bert, "with_adj_2", data_dir=data_dir, n=3, n_templates=1)
    row = _rows(data_dir, "determiner_noun_agreement_with_adj_2", 1)[0]
    adjective = row["two_prefix_prefix_good"].split()[-1]
    assert all(f"[MASK] {adjective} " in p for p in adj["prompt"])  # the adjective stays in place
    with pytest.raises(ValueError, match="type-2"):
        blimp.expand_templates(bert, "dna_1", data_dir=data_dir, n=5)
    with pytest.raises(ValueError, match="masked LM"):
        blimp.expand_templates(tiny("llama"), "dna_2", data_dir=data_dir, n=5)


def test_builtin_set_usable_everywhere(tiny, no_hub, tmp_path):
    llama, bert = tiny("llama"), tiny("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for uid in blimp.builtin_paradigms():
            rows = blimp.load_paradigm(uid, data_dir=tmp_path)
            if rows[0]["one_prefix_method"]:
                df = blimp.minimal_pairs(llama, uid, data_dir=tmp_path)
                assert len(df) == len(rows)
            else:
                df = blimp.minimal_pairs(bert, uid, data_dir=tmp_path)
                assert len(df) + df.attrs["n_skipped"] == len(rows)
            if uid != "distractor_agreement_relative_clause" or len(df):
                assert df["group"].notna().all(), uid
            assert df.attrs["source"].startswith("builtin")
        ex = blimp.expand_templates(bert, "dna_2", data_dir=tmp_path, n_templates=3)
        assert ex.attrs["n_pairs"] > 5


# ---------------------------------------------------------------------------- accuracy
def _slow_scores(lm, df, neurons=None, factor=0.0):
    """One forward per teacher-forced query; interventions only at that query's read position."""
    out = []
    for prompt, good, bad in zip(df["prompt"], df["good"], df["bad"]):
        pair = []
        for target in (good, bad):
            spec = prepare(lm, prompt, target)
            total = 0.0
            for q in spec.queries:
                ids = torch.tensor([q.input_ids])
                if neurons:
                    with ku.enhance(lm, neurons, factor, positions=[q.position]):
                        logits = lm.model(input_ids=ids).logits[0, q.position]
                else:
                    logits = lm.model(input_ids=ids).logits[0, q.position]
                total += float(logits.float().log_softmax(-1)[q.target_id])
            pair.append(total)
        out.append(pair)
    return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def test_accuracy_matches_slow_reference_default_model(default_lm, data_dir):
    df = blimp.minimal_pairs(default_lm, "dna_1", data_dir=data_dir, n=8)  # row 1 is two tokens
    scored = blimp_tasks.pair_scores(default_lm, df, batch_size=3)
    slow = _slow_scores(default_lm, df)
    assert torch.allclose(torch.tensor(scored[["logp_good", "logp_bad"]].to_numpy()), slow, atol=2e-4)
    assert blimp_tasks.blimp_accuracy(default_lm, df) == pytest.approx(float((slow[:, 0] > slow[:, 1]).double().mean()))
    # and the library's own per-target function agrees on a multi-token target
    assert scored.logp_good[1] == pytest.approx(float(target_log_probs(default_lm, df.prompt[1],
                                                                       df.good[1]).sum()), abs=2e-4)


@torch.no_grad()
@pytest.mark.parametrize("family,uid", [("llama", "dna_irr_1"), ("gpt2", "isva_1"), ("bert", "dna_2")])
def test_accuracy_with_intervention_matches_slow_reference(tiny, data_dir, family, uid):
    lm = tiny(family)
    df = blimp.minimal_pairs(lm, uid, data_dir=data_dir, n=12)
    if not lm.arch.is_masked_lm:  # teacher-forced multi-token targets ("haven't") are covered
        assert (df.n_good_tokens > 1).any() or (df.n_bad_tokens > 1).any()
    neurons = [(0, 3), (2, 5), (2, 17)]
    for factor in (0.0, 2.0):
        scored = blimp_tasks.pair_scores(lm, df, batch_size=5, neurons=neurons, factor=factor)
        slow = _slow_scores(lm, df, neurons, factor)
        assert torch.allclose(torch.tensor(scored[["logp_good", "logp_bad"]].to_numpy()), slow, atol=5e-4)
    plain = blimp_tasks.pair_scores(lm, df)
    assert not torch.allclose(torch.tensor(plain["logp_good"].to_numpy()),
                              torch.tensor(scored["logp_good"].to_numpy()))  # the hook did act
    assert torch.allclose(torch.tensor(plain[["logp_good", "logp_bad"]].to_numpy()), _slow_scores(lm, df),
                          atol=5e-4)
    assert hook_count(lm.model) == 0


def test_accuracy_bad_input_leaves_no_hooks(tiny, data_dir):
    lm = tiny("llama")
    df = blimp.minimal_pairs(lm, "dna_1", data_dir=data_dir, n=3)
    with pytest.raises(ValueError):
        blimp_tasks.blimp_accuracy(lm, df, neurons=[(0, 3), (99, 0)])
    with pytest.raises(ValueError, match="columns"):
        blimp_tasks.blimp_accuracy(lm, df.drop(columns="bad"))
    with pytest.raises(ValueError, match="empty"):
        blimp_tasks.blimp_accuracy(lm, df.iloc[:0])
    assert hook_count(lm.model) == 0


def test_trace_items_rank_by_the_good_forms_probability(default_lm, data_dir):
    lm = default_lm
    items = blimp_tasks.trace_items(lm, "dna_adj_1", "determiner", 3, data_dir, pool=20)
    assert list(items.columns) == ["prompt", "subject", "target", "p_target", "group"]
    assert len(items) == 3 and items["p_target"].is_monotonic_decreasing
    for row in items.itertuples():
        assert row.prompt.count(row.subject) == 1  # one unambiguous span to corrupt
        assert row.p_target == pytest.approx(ku.target_probability(lm, row.prompt, row.target), rel=1e-3)
    # the best of the pool: no other usable pair of the first 20 has a likelier good form
    pairs = blimp_tasks.pair_scores(lm, blimp.minimal_pairs(lm, "dna_adj_1", data_dir=data_dir, n=20))
    def once(prompt, word):
        found = [m.start() for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", prompt)]
        return len(found) == 1 and prompt.find(word) == found[0]
    usable = pairs[[bool(d) and once(p, d) for p, d in zip(pairs["prompt"], pairs["determiner"])]]
    assert items["p_target"].iloc[0] == pytest.approx(float(np.exp(usable["logp_good"].max())), rel=1e-3)
    sva = blimp_tasks.trace_items(lm, "regular_plural_subject_verb_agreement_1", "subject", 2, data_dir, pool=10)
    assert all(s in p for s, p in zip(sva["subject"], sva["prompt"]))
    with pytest.raises(ValueError, match="corrupt"):
        blimp_tasks.trace_items(lm, "dna_adj_1", "verb", 2, data_dir)
    with pytest.raises(ValueError, match="positive"):
        blimp_tasks.trace_items(lm, "dna_adj_1", "determiner", 0, data_dir)
