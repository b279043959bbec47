"""kn_utils.evidence: failed searches counted, syntax vs facts on synthetic search tables."""
import math

import numpy as np
import pandas as pd
import pytest

from kn_utils.evidence import search_summary, split_searches, syntax_vs_facts, top_layer_share
from kn_utils.stats import welch_difference


def _facts():
    # 2 real searches, 1 with 0 neurons, 1 ending on tau = 1.00 (the P36 / P47 rows)
    return pd.DataFrame({
        "relation": ["P19", "P20", "P36", "P47"],
        "neurons": [[(20, 1), (21, 5)], "[(25, 3)]", [], [(2, 7), (3, 8), (4, 9), (5, 1), (6, 2), (7, 3)]],
        "kn_at_0.7": [3, 1, 0, 9], "tau": [0.7, 0.65, 0.2, 1.0], "r2": [0.6, 0.5, 0.9, 0.95]})


def test_split_searches_counts_failures():
    found, failed = split_searches(_facts())
    assert list(found.relation) == ["P19", "P20"]
    assert dict(zip(failed.relation, failed.failure)) == {"P36": "0 neurons", "P47": "tau at its bound 1.00"}


def test_search_summary_means_over_found_only():
    s = search_summary(_facts())
    assert (s["n"], s["n_found"], s["n_failed"]) == (4, 2, 2)
    assert s["failures"] == {"0 neurons": 1, "tau at its bound 1.00": 1}
    assert s["r2"]["mean"] == pytest.approx(0.55) and s["r2"]["n"] == 2      # not (0.6+0.5+0.9+0.95)/4
    assert s["n_kn"]["mean"] == pytest.approx(1.5)
    assert s["kn_at_0.7"]["mean"] == pytest.approx(2.0)


def test_n_kn_column_and_label_strings():
    t = pd.DataFrame({"n_kn": [0, 2], "tau": [0.5, 0.6], "r2": [0.1, 0.2]})
    assert search_summary(t)["n_failed"] == 1
    t = pd.DataFrame({"neurons": ["L10.N2096 L9.N1094", ""], "tau": [0.7, 0.7]})
    found, failed = split_searches(t)
    assert len(found) == 1 and failed.failure.tolist() == ["0 neurons"]
    with pytest.raises(ValueError, match="n_kn"):
        split_searches(pd.DataFrame({"tau": [0.7]}))
    with pytest.raises(ValueError, match="tau"):
        split_searches(pd.DataFrame({"n_kn": [1]}))


def test_top_layer_share():
    assert top_layer_share([(29, 1), (20, 2), (10, 3), (0, 4)], 30) == pytest.approx(0.5)   # layers >= 20
    assert top_layer_share([(12, 0), (11, 0)], 18) == pytest.approx(0.5)                    # >= 12
    assert math.isnan(top_layer_share([], 18))
    with pytest.raises(ValueError, match="n_layers"):
        top_layer_share([(1, 1)], 0)


def _bags(rng, n, r2_mean, layer_lo, layer_hi, tau=0.7):
    return pd.DataFrame({
        "neurons": [[(int(rng.integers(layer_lo, layer_hi)), int(i)) for i in range(3)] for _ in range(n)],
        "kn_at_0.7": rng.integers(2, 5, n), "tau": np.full(n, tau) + rng.normal(0, 0.01, n),
        "r2": np.clip(rng.normal(r2_mean, 0.05, n), 0, 1)})


def test_syntax_vs_facts_contradicted_when_r2_differs():
    rng = np.random.default_rng(0)
    syn, fac = _bags(rng, 30, 0.10, 0, 10), _bags(rng, 30, 0.61, 20, 30)
    fac = pd.concat([fac, pd.DataFrame({"neurons": [[]], "kn_at_0.7": [0], "tau": [0.3], "r2": [0.99]})],
                    ignore_index=True)
    res = syntax_vs_facts(syn, fac, n_layers=30)
    assert res.counts == {"syntax_found": 30, "syntax_failed": 0, "facts_found": 30, "facts_failed": 1}
    r2 = res.table.set_index("measure").loc["R²₁"]
    ref = welch_difference(syn.r2, fac.r2.iloc[:30])     # the failed search is left out
    assert (r2["diff"], r2["diff_lo"], r2["diff_hi"]) == pytest.approx((ref["diff"], ref["lo"], ref["hi"]))
    assert res.verdicts["r2"].verdict == "differ" and res.verdicts["top_third"].verdict == "differ"
    assert res.overall.verdict == "contradicted"
    assert "contradicted" in res.sentence and "1 failed" in res.sentence and f"{r2['diff']:+.2f}" in res.sentence


def test_syntax_vs_facts_supported_and_undecided():
    rng = np.random.default_rng(1)
    a = _bags(rng, 200, 0.5, 20, 30)
    b = a.copy()
    b["r2"] = a["r2"] + 0.001
    b["kn_at_0.7"] = a["kn_at_0.7"]
    res = syntax_vs_facts(a, b, n_layers=30)
    assert res.overall.verdict == "supported", res.table[["measure", "verdict", "reason"]]
    x = pd.DataFrame({"n_kn": [2, 3, 4], "kn_at_0.7": [2, 5, 3], "tau": [0.6, 0.7, 0.8], "r2": [0.1, 0.5, 0.3]})
    y = pd.DataFrame({"n_kn": [3, 2, 4], "kn_at_0.7": [4, 2, 3], "tau": [0.8, 0.6, 0.65], "r2": [0.4, 0.2, 0.35]})
    few = syntax_vs_facts(x, y)
    assert few.overall.verdict.startswith("undecided at n = 3 / 3")
    assert "top_third" not in few.verdicts          # no n_layers: no layer measure
    with pytest.raises(ValueError, match="tau"):
        syntax_vs_facts(pd.DataFrame({"n_kn": [1], "r2": [0.5]}), a)


# ------------------------------------------------------------------ paper.py: sources and minimums
def test_every_paper_constant_has_a_source_and_no_unsourced_n():
    from kn_utils import paper
    numbers = [n for n in paper.__all__ if n.isupper() and n not in ("SOURCES", "CONSTANT_SOURCES",
                                                                      "REPORT_MINIMUM")]
    assert set(numbers) == set(paper.CONSTANT_SOURCES)
    assert all("REFERENCE.md §" in paper.CONSTANT_SOURCES[n] for n in numbers)
    assert not any("7,500" in s for s in list(paper.SOURCES.values()) + list(paper.CONSTANT_SOURCES.values()))


def test_report_minimum_and_size_note():
    from kn_utils.paper import REPORT_MINIMUM, below_report_minimum, size_note
    assert REPORT_MINIMUM["table1_rome"].n == 100 and REPORT_MINIMUM["aie"].n == 50
    assert below_report_minimum("counterfact", 12) and not below_report_minimum("counterfact", 50)
    assert size_note("counterfact", 12) == "n = 12 of 50 records per editor (below the report minimum)"
    assert "below" not in size_note("blimp", 250)
    with pytest.raises(ValueError, match="unknown report section"):
        size_note("table2", 3)


def _trace(n_tokens, subject, read, effect_rows, low=0.1, high=0.5):
    import torch
    from kn_utils.tracing import TraceResult
    scores = torch.tensor(effect_rows, dtype=torch.float32) + low
    return TraceResult(scores=scores, low_score=low, high_score=high, tokens=["t"] * n_tokens,
                       subject_range=subject, answer="x", answer_id=0, kind="mlp", window=10,
                       read_position=read)


def test_class_effects_one_row_per_item_and_coinciding_classes_dropped():
    from kn_utils.evidence import COINCIDING, class_effects
    from kn_utils.stats import aie_peak
    # item A: 5 tokens, subject [1, 4) -> middle = [2], last subject = [3], read = 4
    a = _trace(5, (1, 4), 4, [[0, 0], [0.1, 0.0], [0.2, 0.0], [0.3, 0.1], [0.0, 0.4]])
    # item B: subject ends at the read position: "last subject token" == "last token"
    b = _trace(4, (1, 4), 3, [[0, 0], [0.1, 0.0], [0.2, 0.2], [0.5, 0.5]])
    eff, te, dropped = class_effects([a, b], "last subject token")
    assert dropped == 1 and eff.shape == (1, 2) and eff[0] == pytest.approx([0.3, 0.1])
    assert te == pytest.approx([0.4])
    eff, te, dropped = class_effects([a, b], "last subject token", drop_coinciding=False)
    assert dropped == 0 and eff.shape == (2, 2)
    # middle tokens of B are [2] only; of A [2]: one row each, averaged within an item
    c = _trace(6, (0, 5), 5, [[0, 0], [0.2, 0.0], [0.4, 0.0], [0.6, 0.0], [0, 0], [0, 0]])
    eff, _, _ = class_effects([c], "middle subject tokens")
    assert eff[0] == pytest.approx([0.4, 0.0])             # mean of tokens 1, 2, 3
    res = aie_peak(*class_effects([a, b, a], "middle subject tokens")[:2])
    assert res["n"] == 3 and res["layer"] == 0
    # B's shared token is the class COINCIDING (only the items dropped above)
    eff, te, dropped = class_effects([a, b], COINCIDING)
    assert dropped == 0 and eff.shape == (1, 2) and eff[0] == pytest.approx([0.5, 0.5]) and te == pytest.approx([0.4])
    # a one-token subject (first = last subject token) or one token after the subject (first
    # subsequent = last token) is ROME's grouping, not a coincidence: kept in every class
    d = _trace(3, (1, 2), 2, [[0, 0], [0.3, 0.1], [0.0, 0.2]])
    for cls in ("first subject token", "last subject token", "first subsequent token", "last token"):
        assert class_effects([d], cls)[0].shape == (1, 2) and class_effects([d], cls)[2] == 0
    assert class_effects([d], COINCIDING)[0].shape == (0, 2)
    with pytest.raises(ValueError, match="unknown token class"):
        class_effects([a], "subject")
