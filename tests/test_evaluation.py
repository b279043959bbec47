import math

import pandas as pd
import pytest
import torch

import kn_utils as ku
from kn_utils import targets as tg
from kn_utils.data import pararel
from kn_utils.editing.rome import ROMEHyperParams
from kn_utils.evaluation import EditRequest, evaluate_edits, score, summarize_edits, synonyms

COMMON = ["relation", "editor", "item", "subject", "prompt", "target_true", "target_new", "known",
          "reliability_prob", "reliability_acc", "generality_prob", "generality_acc",
          "locality_prob", "locality_acc"]


@pytest.fixture
def builtin(monkeypatch):
    """Use the built-in mini ParaRel set, whatever data directory exists."""
    monkeypatch.setattr(pararel, "data_root", lambda data_dir=None: None)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KN_UTILS_CACHE", str(tmp_path))


class LogitBoost:
    """A fake editor: +50 on the logit of the new target's first token, everywhere."""

    def __init__(self, lm, request: EditRequest):
        self.token = tg.prepare(lm, request.prompt, request.target_new).target_ids[0]
        self.handle = lm.arch.unembed.register_forward_hook(self.hook)
        self.requests = [request]

    def hook(self, module, args, output):
        out = output.clone()
        out[..., self.token] += 50.0
        return out

    def restore(self):
        self.handle.remove()


def test_score_matches_slow_loop(tiny):
    lm = tiny("llama")
    pairs = [("The capital of France is", "Paris"), ("Rome is the capital of", "Italy and more"),
             ("The dog", "runs")]
    fast = score(lm, pairs, batch_size=2)
    for (prompt, target), (lp, acc, am) in zip(pairs, fast):
        slow = ku.target_log_probs(lm, prompt, target)
        assert math.isclose(lp, float(slow.sum()), rel_tol=1e-4, abs_tol=1e-4)
        spec = tg.prepare(lm, prompt, target)
        hits = 0
        for q in spec.queries:
            logits = lm.model(torch.tensor([q.input_ids])).logits[0, q.position]
            hits += int(logits.argmax()) == q.target_id
        assert acc == hits / len(spec.queries)


def test_metrics_with_a_known_editor(tiny, builtin):
    lm = tiny("llama")
    seen = []

    def editor(lm_, request):
        seen.append(request)
        return LogitBoost(lm_, request)
    df = evaluate_edits(lm, editor=editor, relation="P36", n=4, progress=False)
    assert len(df) == 4 and set(COMMON) <= set(df.columns)
    assert {"symmetry_prob", "symmetry_acc", "symmetry_prob_pre"} <= set(df.columns)
    # new target of item i = object of item i-1 (item 0 wraps to the last evaluated item)
    bags = pararel.load_bags("P36")
    assert list(df["target_new"]) == [bags[3].object] + [b.object for b in bags[:3]]
    assert seen[1].prompt == "The capital of Germany is" and seen[1].target_new == "Paris"
    assert seen[1].prompts[0] == seen[1].prompt and len(seen[1].prompts) > 1
    # boosting t*'s first token makes t* win everywhere and neighbours lose to it
    assert (df["reliability_prob"] == 1).all() and (df["generality_prob"] == 1).all()
    assert (df["locality_prob"] == 0).all()
    assert (df["reliability_acc"] > 0).all()
    assert lm.arch.unembed._forward_hooks == {} and ku.hook_count(lm.model) == 0


def test_rome_on_all_relations(tiny, builtin, tmp_cache):
    lm = tiny("llama")
    snap = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    hp = ROMEHyperParams(layer=1, v_num_grad_steps=3, context_template_length_params=[[3, 1]],
                         mom2_adjustment=False)
    frames = {}
    for rel, crit in (("P36", "symmetry"), ("P1376", "symmetry"), ("P101", "synonym")):
        df = evaluate_edits(lm, "rome", rel, n=6 if rel == "P101" else 3, hparams=hp, progress=False)
        assert set(COMMON) <= set(df.columns), rel
        assert {f"{crit}_prob", f"{crit}_acc", f"{crit}_prob_pre", f"{crit}_acc_pre"} <= set(df.columns)
        for col in COMMON[8:]:
            assert df[col].between(0, 1).all(), (rel, col)
        assert (df["layer"] == 1).all() and (df["delta_norm"] > 0).all()
        frames[rel] = df
    # P101: Freud (psychoanalysis) has no occupation in synonyms.json and is skipped and counted
    p101 = frames["P101"]
    assert "psychoanalysis" not in synonyms()
    assert p101.attrs["n_skipped"] >= 1 and "Sigmund Freud" not in set(p101["subject"])
    assert len(p101) + p101.attrs["n_skipped"] == 6
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, snap[name]), name
    table = summarize_edits(frames, print_table=False)
    assert set(table["relation"]) == {"P36", "P1376", "P101"}
    row = table[table["relation"] == "P36"].iloc[0]
    assert row["paper_gpt2-xl_reliability"] == 99.79 and row["paper_gpt2-xl_criterion"] == 25.17
    assert row["paper_llama-2-7b_criterion"] == 33.64
    assert table[table["relation"] == "P101"].iloc[0]["criterion"] == "synonym"


def test_known_column_and_real_data(default_lm, data_dir):
    # the unedited default model knows some capitals: `known` must be a real per-item flag
    lm = default_lm

    def no_edit(lm_, request):
        return type("Nothing", (), {"restore": lambda self: None})()
    df = evaluate_edits(lm, editor=no_edit, relation="P36", n=3, data_dir=data_dir, progress=False,
                        n_locality=2)
    assert df["known"].dtype == bool
    for _, row in df.iterrows():
        greedy = ku.predict(lm, row["prompt"], 1)[0][0]
        first = tg.prepare(lm, row["prompt"], row["target_true"]).target_ids[0]
        if row["known"]:
            assert greedy == lm.tokenizer.decode([first])
    # without an edit, nothing changes
    for col in ("reliability_prob", "generality_prob", "symmetry_prob"):
        assert (df[col] == df[col + "_pre"]).all()
    assert (df["locality_acc"] == 1).all()


def test_synonyms_file():
    syn = synonyms()
    assert 45 <= len(syn) <= 60
    assert syn["linguistics"] == "linguist" and syn["aviation"] == "pilot" and syn["physics"] == "physicist"
    occupations = {"physician", "musician", "cartoonist", "mathematician", "physicist"}
    assert not occupations & set(syn), "fields that are already occupations are excluded"
    assert not {"Balkans", "Afghanistan"} & set(syn)


def test_bad_inputs(tiny, builtin):
    lm = tiny("llama")
    with pytest.raises(ValueError, match="relation"):
        evaluate_edits(lm, "rome", "P19", n=2)
    with pytest.raises(ValueError, match="editor"):
        evaluate_edits(lm, "memit", "P36", n=2)
    with pytest.raises(ValueError, match="n must"):
        evaluate_edits(lm, "rome", "P36", n=0)
    with pytest.raises(ValueError, match="summarize"):
        summarize_edits([1, 2])
    assert ku.hook_count(lm.model) == 0


def test_cli(tmp_path, builtin, tmp_cache, monkeypatch):
    from tiny_models import save_tiny
    from kn_utils.cli import main
    folder = save_tiny("llama", tmp_path / "model")
    out = tmp_path / "results"
    rc = main(["evaluate-edits", "--model", folder, "--device", "cpu", "--editor", "rome",
               "--relation", "P36", "--n", "2", "--steps", "2", "--layer", "1", "--no-mom2",
               "--out", str(out)])
    assert rc == 0
    items = pd.read_csv(out / "edits_rome_P36.csv")
    assert len(items) == 2 and "symmetry_prob" in items
    summary = pd.read_csv(out / "edits_rome_summary.csv")
    assert summary.loc[0, "relation"] == "P36"
