"""The experiment units render their evidence from records alone (no model): paired before -> after
tables with verdicts computed by kn_utils.verdicts, global edits never "holds", failed KN searches
counted and left out of means, syntax vs facts under --render-only, AIE peaks t over items."""
import json

import numpy as np
import pandas as pd
import pytest

from kn_utils import verdicts
from kn_utils.experiments import UNITS, Section
from kn_utils.experiments.report import render_folder
from kn_utils.headline import readme_block
from kn_utils.stats import aie_peak, paired_difference
from kn_utils.store import Store

RNG = np.random.default_rng(0)


def _records(results):
    return [{"result": r, "worker": {"host": "h", "rank": 0, "pid": 1}, "seconds": 0.1} for r in results]


def _summarise(unit, results, tmp_path, sizes=None, info=None, arch=None):
    sec = Section(unit, UNITS[unit].TITLE)
    plan = {"sizes": sizes or {}, "info": info or {}, "arch": arch or {}}
    UNITS[unit].summarise(_records(results), plan, sec, tmp_path)
    return sec


# ---------------------------------------------------------------------------------------------
# Table 1
# ---------------------------------------------------------------------------------------------
def _table1_results(editor, rel, n, locality, sym_pre, sym_post, rel_post=1.0):
    crit = "synonym" if rel == "P101" else "symmetry"
    return [{"editor": editor, "relation": rel, "item": i, "reliability_acc_pre": 0.0, "reliability_acc": rel_post,
             "reliability_prob": 1.0, "generality_acc_pre": 0.0, "generality_acc": 0.5,
             f"{crit}_acc_pre": sym_pre[i], f"{crit}_acc": sym_post[i], f"{crit}_prob": 0.0,
             "locality_acc": locality, "locality_acc_pre": 1.0} for i in range(n)]


def test_table1_paired_table_and_verdicts(tmp_path):
    n = 40
    sym = RNG.uniform(0.1, 0.3, n)
    syn_pre, syn_post = np.zeros(n), np.r_[np.ones(30), np.zeros(10)]
    results = (_table1_results("rome", "P36", n, 0.95, sym, sym)              # symmetry unchanged
               + _table1_results("rome", "P101", n, 0.95, syn_pre, syn_post)   # synonymy moves
               + _table1_results("rome-cov", "P36", n, 0.10, sym, sym + 0.5))  # a global edit
    sec = _summarise("table1", results, tmp_path, sizes={"rome_n": n, "kn_n": 2, "rome_configs": 2},
                     info={"rome": {"rome": {"layer": 1, "mom2_adjustment": False, "mom2_n_samples": 0},
                                    "rome-cov": {"layer": 4, "mom2_adjustment": True, "mom2_n_samples": 300}}})
    p = sec.tables["paired"].set_index(["editor", "relation", "criterion"])
    sym_row = p.loc[("rome", "P36", "symmetry")]
    assert sym_row.before == pytest.approx(100 * sym.mean()) and sym_row["diff"] == 0
    assert sym_row.verdict == "no change shown"
    syn = p.loc[("rome", "P101", "synonym")]
    want = paired_difference(syn_pre, syn_post)
    assert syn.verdict == "changes" and syn.diff_lo == pytest.approx(100 * want.lo)
    assert syn.bad_to_good == 30 and syn.paper_after == pytest.approx(52.35)
    # the global edit: no criterion assessed, no "holds" anywhere for it
    cov = sec.tables["paired"][sec.tables["paired"].editor == "rome-cov"]
    assert set(cov[cov.criterion != "locality"].verdict) == {"not assessed: global edit"}
    assert cov[cov.criterion == "locality"].verdict.item() == "global"
    assert "holds" not in sec.text
    cov_lines = [ln for ln in sec.text.splitlines() if ln.startswith("- rome-cov")]
    assert cov_lines and all("verdict: not assessed: global edit" in ln or "verdict: global" in ln for ln in cov_lines)
    # reliability exceeds synonymy where the intervals separate (P101), by rule, with its reason
    assert "rome P101: the paper's finding (reliability after the edit exceeds synonym) — verdict: exceeds — " in sec.text
    assert "covariance on (statistics from 300 texts)" in sec.text
    head = UNITS["table1"].headline(sec)
    names = [h[0] for h in head]
    assert "Table 1 ROME P36 symmetry: after − before (points)" in names
    assert "Table 1 ROME-cov P36 symmetry: before (token acc. %)" in names


# ---------------------------------------------------------------------------------------------
# CounterFact
# ---------------------------------------------------------------------------------------------
def _cf(editor, n, neigh_pre, neigh_post, eff_post):
    return [{"editor": editor, "record": i, "efficacy_pre": 0.0, "efficacy": eff_post[i],
             "paraphrase_pre": 0.0, "paraphrase": eff_post[i], "neighborhood_pre": neigh_pre[i],
             "neighborhood": neigh_post[i]} for i in range(n)]


def test_counterfact_global_rome_is_not_ranked(tmp_path):
    n = 30
    ones, zeros = np.ones(n), np.zeros(n)
    pre = np.r_[np.ones(21), np.zeros(9)]            # 70 % before
    results = _cf("rome", n, pre, zeros, ones) + _cf("kn", n, pre, pre, np.r_[np.ones(8), np.zeros(22)])
    sec = _summarise("counterfact", results, tmp_path, sizes={"rome_configs": 1}, info={"records_per_editor": n})
    p = sec.tables["paired"].set_index(["editor", "metric"])
    assert p.loc[("rome", "neighborhood"), "verdict"] == "global"
    assert p.loc[("rome", "neighborhood"), "good_to_bad"] == 21
    assert p.loc[("rome", "efficacy"), "verdict"] == "not assessed: global edit"
    assert p.loc[("kn", "efficacy"), "verdict"] == "changes"
    assert "verdict: not ranked: ROME's edit is global" in sec.text and "holds" not in sec.text
    assert "7,500" not in sec.text
    # the score's interval: a fixed-seed bootstrap over records, reproducible
    s = sec.tables["summary"].set_index(["editor", "metric"])
    assert s.loc[("kn", "score"), "ci_lo"] <= s.loc[("kn", "score"), "ours"] <= s.loc[("kn", "score"), "ci_hi"]
    again = _summarise("counterfact", results, tmp_path, sizes={"rome_configs": 1}, info={"records_per_editor": n})
    assert again.tables["summary"].equals(sec.tables["summary"])


# ---------------------------------------------------------------------------------------------
# failed searches: Dai, Table 9, Table 8
# ---------------------------------------------------------------------------------------------
def _facts():
    return [{"relation": "P19", "fact": 0, "n_prompts": 5, "n_kn": 2, "neurons": "[(2, 1), (2, 5)]", "tau": 0.6,
             "r2": 0.6, "kn_at_0.7": 3, "suppress_change": -20.0, "enhance_change": 30.0},
            {"relation": "P19", "fact": 1, "n_prompts": 5, "n_kn": 3, "neurons": "[(1, 1), (2, 2), (0, 3)]",
             "tau": 0.65, "r2": 0.4, "kn_at_0.7": 2, "suppress_change": -10.0, "enhance_change": 10.0},
            {"relation": "P36", "fact": 0, "n_prompts": 5, "n_kn": 0, "neurons": "[]", "tau": 0.2, "r2": 0.99,
             "kn_at_0.7": 0, "suppress_change": float("nan"), "enhance_change": float("nan")},
            {"relation": "P47", "fact": 0, "n_prompts": 5, "n_kn": 6, "neurons": str([(0, i) for i in range(6)]),
             "tau": 1.0, "r2": 0.95, "kn_at_0.7": 9, "suppress_change": -90.0, "enhance_change": 90.0}]


def test_failed_searches_are_counted_not_averaged(tmp_path):
    dai = _summarise("dai", _facts(), tmp_path, sizes={"facts_per_relation": 1, "ig_steps": 3})
    t = dai.tables["summary"].set_index("measure")
    assert t.loc["knowledge neurons per fact", "ours"] == pytest.approx(2.5)      # not (2+3+0+6)/4
    assert t.loc["suppress: change of P(correct) (%)", "ours"] == pytest.approx(-15.0)
    assert (t.n_failed_searches == 2).all() and "2 failed (" in dai.text
    assert set(dai.tables["failed"].relation) == {"P36", "P47"}
    t9 = _summarise("table9", _facts(), tmp_path, sizes={"facts_per_relation": 1, "ig_steps": 3})
    s = t9.tables["summary"].set_index("relation")
    assert s.loc["P19", "r2"] == pytest.approx(0.5) and s.loc["P19", "failed_searches"] == 0
    assert s.loc["P36", "facts"] == 0 and s.loc["P36", "failed_searches"] == 1 and np.isnan(s.loc["P36", "r2"])
    assert "mean R2_1 over found searches 0.5 " in t9.text and "verdict: " in t9.text


def test_table8_as_low_comes_from_the_range_rule(tmp_path):
    bags = [{"paradigm": "determiner_noun_agreement_1", "group": g, "n_prompts": 20, "kn_at_0.7": 1,
             "tau": 0.5, "r2": r2, "neurons": "[(1, 2)]"} for g, r2 in
            (("singular", 0.17), ("plural", 0.19), ("a", 0.18), ("b", 0.2), ("c", 0.99))]
    bags[-1]["neurons"] = "[]"      # a failed search: its R2_1 of 0.99 must not count
    sec = _summarise("table8", bags, tmp_path, sizes={"bag_prompts": 20}, info={"paper_model": "GPT-2"})
    want = verdicts.in_range({"mean": 0.185, "lo": 0.164, "hi": 0.206, "n": 4}, 0.15, 0.24)
    assert want.verdict == "within" and "verdict: within — " in sec.text and "1 failed" in sec.text


# ---------------------------------------------------------------------------------------------
# syntax vs facts, rendered from stored Table 8 / Table 9 records without a model
# ---------------------------------------------------------------------------------------------
def _store_unit(store, unit, results, arch):
    key = f"k-{unit}"
    ids = [f"{unit}/{i}" for i in range(len(results))]
    store.write_plan(unit, {"unit": unit, "version": UNITS[unit].VERSION, "key": key, "model": "m",
                            "model_name": "synthetic", "scale": "report", "sizes": {"bag_prompts": 20,
                            "facts_per_relation": 3, "ig_steps": 20}, "arch": arch, "items": ids,
                            "n_minimum": 0, "info": {"paper_model": "GPT-2"}, "created": "2026-01-01T00:00:00Z"})
    for i, r in zip(ids, results):
        store.append({"key": key, "model": "m", "unit": unit, "version": UNITS[unit].VERSION, "item": i,
                      "result": r, "seconds": 1.0, "worker": {"host": "h", "rank": 0, "pid": 1},
                      "commit": "c", "device": "cpu", "created": "2026-01-01T00:00:00Z"})


def test_syntax_vs_facts_renders_under_render_only(tmp_path):
    arch = {"n_layers": 12, "n_neurons": 64, "masked": False}
    bags = [{"paradigm": "determiner_noun_agreement_1", "group": str(i), "n_prompts": 20, "kn_at_0.7": 1 + i % 2,
             "tau": 0.5 + 0.01 * i, "r2": 0.1 + 0.01 * i, "neurons": str([(11, i), (10, i + 1)])} for i in range(8)]
    facts = [{"relation": f"P{i}", "fact": 0, "n_prompts": 5, "n_kn": 2, "neurons": str([(1, i), (2, i)]),
              "tau": 0.6 + 0.01 * i, "r2": 0.6 + 0.01 * i, "kn_at_0.7": 2,
              "suppress_change": -1.0, "enhance_change": 1.0} for i in range(8)]
    facts.append({**facts[0], "relation": "P99", "n_kn": 0, "neurons": "[]"})     # failed: counted
    store = Store(tmp_path)
    _store_unit(store, "table8", bags, arch)
    _store_unit(store, "table9", facts, arch)
    store.close()
    path, sections, meta = render_folder(tmp_path)       # no model anywhere
    sec = {s.key: s for s in sections}["syntax"]
    assert sec.error is None, sec.error
    t = sec.tables["summary"].set_index("measure")
    assert t.loc["R²₁", "verdict"] == "differ"
    assert t.loc["share of KNs in the top third of layers", "syntax"] == pytest.approx(1.0)   # layers 10-11 of 12
    assert sec.sizes["facts_failed"] == 1 and sec.sizes["n_layers"] == 12
    text = path.read_text()
    assert "the paper's §3 claim: verdict: contradicted — " in text
    assert (tmp_path / "syntax_summary.csv").exists()
    head = pd.read_csv(tmp_path / "headline.csv")
    assert head.result.str.startswith("Syntax − facts: R²₁").any()


# ---------------------------------------------------------------------------------------------
# tracing peaks: t over items, coinciding classes dropped and counted
# ---------------------------------------------------------------------------------------------
def _trace_record(set_name, n_tokens, subject_range, scores, low=0.1, high=0.5):
    kinds = {k: {"scores": scores.tolist(), "low": low, "high": high, "correct": True} for k in ("hidden", "mlp", "attn")}
    return {"set": set_name, "kinds": kinds, "n_tokens": n_tokens, "subject_range": list(subject_range),
            "read_position": n_tokens - 1}


def test_tracing_peaks_t_over_items_and_coinciding_classes_dropped(tmp_path):
    L, recs, lst = 4, [], []
    for i in range(6):
        s = RNG.uniform(0.1, 0.2, (5, L))
        s[2, 2] = 0.3 + 0.02 * i          # the last subject token (index 2) peaks at layer 2
        recs.append(_trace_record("facts", 5, (1, 3), s))
        lst.append(s[2] - 0.1)
    for i in range(3):                   # agreement prompts ending at the corrupted word: classes coincide
        recs.append(_trace_record("dna", 4, (2, 4), RNG.uniform(0.1, 0.2, (4, L))))
    sec = _summarise("tracing", recs, tmp_path, info={"n_layers": L, "only_correct": {"facts": True}})
    row = sec.tables["summary"].set_index("items").loc["facts"]
    want = aie_peak(np.stack(lst), np.full(6, 0.4))
    assert row.layer_mlp_lst == want["layer"] == 2
    assert row.peak_mlp_lst_lo == pytest.approx(100 * want["lo"]) and row.rel_mlp_lst == pytest.approx(want["relative"])
    dna = sec.tables["summary"].set_index("items").loc["dna"]
    assert dna.n_lst == 0 and dna.dropped_coinciding_lst == 3
    assert "3 items dropped from the last-subject-token class" in sec.text
    assert "Student t over the items' own effects" in sec.text
    heads = [h[0] for h in UNITS["tracing"].headline(sec)]
    assert not any(h.startswith("AIE dna: MLP peak at last subject token (") for h in heads)
    # their shared token is a class of its own, with its own peak
    assert dna.n_both == 3 and any(h.startswith("AIE dna: MLP peak at last subject token = last token (") for h in heads)
    assert "where the corrupted word is the last token (3 items)" in sec.text
    assert set(sec.tables["peaks"].query("items == 'dna'")["token class"]) == {"last subject token = last token"}


# ---------------------------------------------------------------------------------------------
# the README folds before / after / difference into one cell
# ---------------------------------------------------------------------------------------------
def test_readme_folds_paired_rows(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"scale": "report", "all_units": True, "commits": ["abc"],
                                                    "compute_seconds": 3600}))
    pd.DataFrame([
        ("Table 1 ROME P36 symmetry (token acc. %)", 16.9, 10.0, 24.0, 22, 25.17, "GPT-2 XL"),
        ("Table 1 ROME P36 symmetry: before (token acc. %)", 16.9, 10.0, 24.0, 22, float("nan"), ""),
        ("Table 1 ROME P36 symmetry: after − before (points)", 0.0, -1.2, 1.2, 22, float("nan"), ""),
        ("Dai et al.: knowledge neurons per fact", 2.5, 1.0, 4.0, 9, 4.13, "BERT-base"),
    ], columns=["result", "ours", "ci_lo", "ci_hi", "n", "paper", "paper_setting"]).to_csv(folder / "headline.csv", index=False)
    block = readme_block(tmp_path)
    assert "| Table 1 ROME P36 symmetry: before → after (token acc. %) | 16.90 → 16.90 (Δ +0.00 [-1.20, 1.20]) n=22 | 25.17 (GPT-2 XL) |" in block
    assert "symmetry: before (" not in block and "Dai et al.: knowledge neurons per fact | 2.50 [1.00, 4.00] n=9" in block
