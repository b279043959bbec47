"""kn_utils.reproduce (the report), kn_utils.stats (its intervals), kn_utils.paper, CounterFact metrics."""
import re
import json
import math

import numpy as np
import pandas as pd
import pytest

import kn_utils as ku
from kn_utils import counterfact_eval, paper, reproduce, stats
from kn_utils.cli import main

from tiny_models import save_tiny

# the smoke runs read the built-in mini sets on purpose
pytestmark = pytest.mark.filterwarnings("ignore::kn_utils.data.BuiltinDataWarning")


@pytest.fixture
def builtin_only(monkeypatch, tmp_path_factory, tiny):
    """No data folder at all: the loaders fall back to the built-in mini sets."""
    tiny("llama")   # built first: its tokenizer comes from the model cache, not the empty one below
    monkeypatch.delenv("KN_DATA_DIR", raising=False)
    monkeypatch.setenv("KN_SHARED_DATA", "0")
    monkeypatch.setenv("KN_UTILS_CACHE", str(tmp_path_factory.mktemp("cache")))  # ROME templates of tiny models


# ---------------------------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------------------------
def test_wilson_known_values():
    z2 = 1.959963984540054 ** 2
    # closed forms at the edges: 0/n -> [0, z²/(n+z²)], n/n -> [n/(n+z²), 1]
    assert stats.wilson(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert stats.wilson(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    # 5/10: 0.2366-0.7634 (e.g. Newcombe 1998, Table I style; symmetric about 0.5)
    lo, hi = stats.wilson(5, 10)
    assert lo == pytest.approx(0.23659, abs=1e-4) and hi == pytest.approx(0.76341, abs=1e-4)
    # 81/263 (Wikipedia "Binomial proportion confidence interval" example): 0.2553-0.3662
    lo, hi = stats.wilson(81, 263)
    assert lo == pytest.approx(0.2553, abs=5e-4) and hi == pytest.approx(0.3662, abs=5e-4)
    assert all(math.isnan(v) for v in stats.wilson(0, 0))


@pytest.mark.parametrize("bad", [(11, 10), (-1, 10), (1, 2.5)])
def test_wilson_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="successes|n must"):
        stats.wilson(*bad)


def test_t_interval_known_value_and_nan():
    # [1..5]: mean 3, s = 1.5811, t(0.975, 4) = 2.776445 -> 3 ± 1.96324
    lo, hi = stats.t_interval([1, 2, 3, 4, 5, float("nan")])
    assert (lo, hi) == pytest.approx((3 - 1.963243, 3 + 1.963243), abs=1e-5)
    assert all(math.isnan(v) for v in stats.t_interval([1.0]))


def test_bootstrap_close_to_t_for_a_large_sample_and_reproducible():
    x = np.random.default_rng(1).normal(2.0, 1.0, 400)
    b = stats.bootstrap_interval(x)
    t = stats.t_interval(x)
    assert b == stats.bootstrap_interval(x)            # fixed seed
    assert b[0] < x.mean() < b[1]
    assert b == pytest.approx(t, abs=0.03)               # both ~ mean ± 0.098


def test_summarize_picks_wilson_for_proportions_and_t_for_means():
    s = stats.summarize([1, 0, 1, 1, float("nan")])
    assert s["method"] == "wilson" and s["n"] == 4 and s["mean"] == 0.75
    assert (s["lo"], s["hi"]) == pytest.approx(stats.wilson(3, 4))
    s = stats.summarize([0.5, 1.0, 0.25])
    assert s["method"] == "t" and (s["lo"], s["hi"]) == pytest.approx(stats.t_interval([0.5, 1.0, 0.25]))
    # a mean of fractions cannot leave [0, 1]: a t interval that would is cut there and says so
    x = [1.0, 1.0, 1.0, 0.5]
    lo, hi = stats.t_interval(x)
    assert hi > 1.0
    s = stats.summarize(x, bounds=(0, 1))
    assert s["method"] == "t, clipped" and s["hi"] == 1.0 and s["lo"] == pytest.approx(lo)
    assert stats.summarize([0.5, 0.6, 0.55], bounds=(0, 1))["method"] == "t"


# ---------------------------------------------------------------------------------------------
# paper numbers
# ---------------------------------------------------------------------------------------------
def test_paper_numbers_one_place():
    from kn_utils import evaluation

    assert evaluation.PAPER_TABLE1 is paper.PAPER_TABLE1   # the old name keeps working
    assert paper.PAPER_TABLE1["P36"][1]["gpt2-xl"] == (99.79, 25.17, 703)
    assert paper.DAI_SUPPRESS == -29.03 and paper.DAI_ENHANCE == 31.17 and paper.DAI_KN_PER_FACT == 4.13
    assert paper.ROME_COUNTERFACT["rome"]["score"] == 89.2 and paper.ROME_COUNTERFACT["kn"]["score"] == 35.6
    assert paper.ROME_TRACING["peak_hidden"] == 8.7 and paper.ROME_TRACING["mlp_at_peak"] == 6.6
    assert len(paper.PAPER_TABLE8) == 12 and paper.PAPER_FIG6B["determiner_noun_agreement_2"] == (100.0, 94.8)
    # every section with paper numbers names its source
    assert {"table1", "table8", "table9", "fig6b", "dai", "counterfact", "tracing"} <= set(paper.SOURCES)


# ---------------------------------------------------------------------------------------------
# CounterFact metrics
# ---------------------------------------------------------------------------------------------
def test_harmonic_mean():
    assert counterfact_eval.harmonic_mean([100.0, 96.4, 75.4]) == pytest.approx(89.2, abs=0.1)  # ROME's S
    assert counterfact_eval.harmonic_mean([50, 0, 80]) == 0.0


def test_counterfact_metrics_match_a_slow_reference(tiny):
    lm = tiny("llama")
    records = pd.DataFrame([
        {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
         "target_new": "English", "ground_truth": "French",
         "rephrase_prompt": "Where Danielle Darrieux is from, people speak",
         "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"},
        {"prompt": "Paris is the capital of", "subject": "Paris", "target_new": "Italy",
         "ground_truth": "France", "rephrase_prompt": "The city of Paris is in",
         "locality_prompt": "Lyon is in", "locality_ground_truth": "France"}])
    records.attrs["data_source"] = "test records"

    def no_edit(lm, request):  # a callable editor that changes nothing: post must equal pre
        class Nothing:
            def restore(self):
                pass
        return Nothing()

    df = counterfact_eval.evaluate_counterfact(lm, no_edit, n=None, records=records, progress=False)
    assert df.attrs["data_source"] == "test records" and len(df) == 2

    def mean_lp(p, t):  # the slow reference: one teacher-forced pass per (prompt, target)
        return float(ku.target_log_probs(lm, p, t).mean())

    for (_, rec), (_, row) in zip(records.iterrows(), df.iterrows()):
        want = {"efficacy": mean_lp(rec.prompt, rec.target_new) > mean_lp(rec.prompt, rec.ground_truth),
                "paraphrase": mean_lp(rec.rephrase_prompt, rec.target_new)
                > mean_lp(rec.rephrase_prompt, rec.ground_truth),
                "neighborhood": mean_lp(rec.locality_prompt, rec.locality_ground_truth)
                > mean_lp(rec.locality_prompt, rec.target_new)}
        for m, v in want.items():
            assert row[m] == float(v) and row[f"{m}_pre"] == float(v)
    with pytest.raises(ValueError, match="lack columns"):
        counterfact_eval.evaluate_counterfact(lm, no_edit, records=records.drop(columns=["rephrase_prompt"]))


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def test_smoke_report_every_section(tiny, tmp_path, builtin_only):
    lm = tiny("llama")
    rep = reproduce.reproduce(lm, "smoke", tmp_path, model_name="tiny-llama")
    text = rep.path.read_text()
    assert rep.path == tmp_path / "REPORT.md"
    assert rep.failed == [] and not rep.incomplete and not rep.stopped
    for key in reproduce.SECTIONS:
        assert reproduce.TITLES[key] in text, key
    # CounterFact has no built-in set: skipped with its reason, not dropped
    assert "CounterFact has no built-in set" in text
    for key in set(reproduce.SECTIONS) - {"counterfact"}:
        assert (tmp_path / f"{key}_summary.csv").exists(), key
        assert f"({key}_summary.csv)" in text
    for png in ("table1", "dai", "fig6b", "blimp", "tracing_facts", "tracing_dna", "tracing_sva"):
        assert (tmp_path / f"{png}.png").stat().st_size > 1000, png
        assert f"({png}.png)" in text
    assert not list(tmp_path.glob("*.pdf")) and not list(tmp_path.glob(".*tmp*"))
    assert reproduce.git_commit()[:7] in text and "total compute time" in text
    # the commit whose kn_utils/ rendered it is named (issue 21: a reader compares it with main's)
    assert f"by commit `{reproduce.git_commit()}`" in text and rep.meta["rendered_by"] == reproduce.git_commit()
    # smoke sizes are below the report minimum, and the report says so per section
    assert "below the report minimum" in text
    # item rows say which worker computed them and how long it took
    for name in ("table1_items", "dai_facts", "blimp_summary", "fig6b_summary"):
        df = pd.read_csv(tmp_path / f"{name}.csv")
        assert {"worker", "seconds"} <= set(df.columns) and (df.seconds >= 0).all(), name
    # KN rows are never put beside ROME's published numbers
    t1 = pd.read_csv(tmp_path / "table1_summary.csv")
    assert t1[t1.editor == "kn"]["paper_gpt2xl"].isna().all()
    assert t1[(t1.editor == "rome") & (t1.metric == "reliability")]["paper_gpt2xl"].notna().all()
    items = pd.read_csv(tmp_path / "table1_items.csv")
    assert {"reliability_acc", "reliability_acc_pre", "symmetry_acc", "synonym_acc"} <= set(items.columns)
    # Table 1 before -> after per criterion, with a verdict from kn_utils.verdicts
    paired = pd.read_csv(tmp_path / "table1_paired.csv")
    assert {"before", "after", "diff", "diff_lo", "diff_hi", "n", "method", "verdict", "reason"} <= set(paired.columns)
    assert {"reliability", "symmetry", "synonym"} <= set(paired.criterion)
    assert ("locality" in set(paired.criterion)) == items.locality_acc.notna().any()
    assert "verdict: " in text and "below the report minimum)" in text
    # Fig 6b: the paper code's suppression and the KN weight edit on the same pairs, flips counted
    f6 = pd.read_csv(tmp_path / "fig6b_paired.csv")
    assert set(f6.intervention) <= {"suppress", "kn_edit"} and "suppress" in set(f6.intervention)
    assert ((f6.after - f6.before - f6["diff"]).abs() < 1e-6).all()
    assert (f6.flip_rate == 100 * (f6.good_to_bad + f6.bad_to_good) / f6.n_pairs).all()
    # syntax vs facts is rendered from Table 8 and Table 9
    assert "the paper's §3 claim: verdict: " in text
    # BLiMP: every paradigm of the paper is either measured or listed as skipped with a reason
    measured = set(pd.read_csv(tmp_path / "blimp_summary.csv").paradigm)
    skipped = set(pd.read_csv(tmp_path / "blimp_skipped.csv").paradigm)
    assert measured | skipped == set(ku.data.blimp.PAPER_PARADIGMS) and not measured & skipped
    assert "two-prefix" in text
    # the headline gathers the sections' key results, the same numbers as their tables
    head = pd.read_csv(tmp_path / "headline.csv")
    assert "## Headline" in text and "headline.csv" in text
    rel = head[head.result == "Table 1 ROME P36 reliability (token acc. %)"].iloc[0]
    want = t1[(t1.editor == "rome") & (t1.relation == "P36") & (t1.metric == "reliability")].iloc[0]
    assert rel.ours == pytest.approx(want.ours) and rel.paper == pytest.approx(want.paper_gpt2xl)
    assert head.result.str.startswith("Dai et al.").sum() == 3
    assert head.result.str.startswith("AIE facts").sum() == 2
    # each interval holds its estimate
    for name in ("dai_summary", "table1_summary", "headline"):
        df = pd.read_csv(tmp_path / f"{name}.csv").dropna(subset=["ci_lo", "ci_hi"])
        assert ((df.ci_lo <= df.ours + 1e-9) & (df.ours <= df.ci_hi + 1e-9)).all(), name
    meta = json.loads((tmp_path / "report.json").read_text())
    assert meta["scale"] == "smoke" and meta["all_units"] and not meta["incomplete"]
    assert meta["compute_seconds"] > 0 and meta["sections"]["blimp"]["n_done"] == meta["sections"]["blimp"]["n_planned"]


def test_table1_items_equal_evaluate_edits(tiny, tmp_path, builtin_only):
    """A Table 1 item computed alone is the row of evaluate_edits' run over the first n items."""
    lm = tiny("llama")
    reproduce.reproduce(lm, "smoke", tmp_path, sections=["table1"])
    items = pd.read_csv(tmp_path / "table1_items.csv")
    ctx = reproduce.Context(lm, "smoke", reproduce.SCALES["smoke"])
    want = ku.evaluate_edits(lm, editor="kn", relation="P101", n=2, hparams=ctx.kn_hparams(), progress=False)
    got = items[(items.editor == "kn") & (items.relation == "P101")].reset_index(drop=True)
    for col in ("item", "reliability_acc", "reliability_acc_pre", "synonym_acc", "p_new_post", "locality_acc"):
        np.testing.assert_allclose(got[col].astype(float), want[col].astype(float), rtol=1e-8, err_msg=col)


def test_failing_section_is_recorded_not_dropped(tiny, tmp_path, builtin_only, monkeypatch):
    def boom(ctx, item):
        raise RuntimeError("boom in the Dai section")

    monkeypatch.setattr(reproduce.UNITS["dai"], "compute", boom)
    rep = reproduce.reproduce(tiny("llama"), "smoke", tmp_path, sections=["dai", "blimp"],
                              sizes={"blimp_n": 5})
    assert "'blimp_n': 5" in rep.path.read_text() and "some overridden" in rep.path.read_text()
    text = rep.path.read_text()
    assert rep.failed == ["dai"]
    assert "**FAILED**" in text and "RuntimeError: boom in the Dai section" in text
    assert (tmp_path / "blimp_summary.csv").exists() and reproduce.TITLES["table1"] not in text


def test_bad_arguments(tiny, tmp_path):
    lm = tiny("llama")
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        reproduce.reproduce(lm, "huge", tmp_path)
    with pytest.raises(ValueError, match="unknown sections"):
        reproduce.reproduce(lm, "smoke", tmp_path, sections=["table99"])
    with pytest.raises(ValueError, match="unknown sizes \\['rome_m'\\]"):
        reproduce.reproduce(lm, "smoke", tmp_path, sizes={"rome_m": 3})
    for bad in ({"blimp_n": 0}, {"aie_n": -3}, {"max_relations": 0}, {"trace_samples": True}, {"rome_n": 1.5}):
        with pytest.raises(ValueError, match="positive integer"):
            reproduce.reproduce(lm, "smoke", tmp_path, sizes=bad)
    with pytest.raises(ValueError, match="'none'.*not meaningful"):
        reproduce.reproduce(lm, "smoke", tmp_path, sizes={"blimp_n": None})
    with pytest.raises(ValueError, match="--shard"):
        reproduce.reproduce(lm, "smoke", tmp_path, shard="2/2")
    a_file = tmp_path / "file.md"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        reproduce.reproduce(lm, "smoke", a_file)
    with pytest.raises(NotADirectoryError, match="is a file"):
        reproduce.reproduce(lm, "smoke", a_file / "sub")
    assert not (tmp_path / "REPORT.md").exists() and not (tmp_path / "records").exists()


def test_read_only_out_is_refused_before_compute(tiny, tmp_path, monkeypatch):
    import os

    calls = []
    monkeypatch.setattr(reproduce.UNITS["blimp"], "plan", lambda ctx: calls.append(1) or {"items": []})
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:   # root writes anywhere: let the check see the folder as a user would
        real = os.access
        monkeypatch.setattr(reproduce.os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    try:
        with pytest.raises(PermissionError, match="not writable"):
            reproduce.reproduce(tiny("llama"), "smoke", ro / "report", sections=["blimp"])
    finally:
        ro.chmod(0o755)
    assert calls == []


def test_command_line(tmp_path, builtin_only, monkeypatch, capsys):
    folder = tmp_path / "model"
    save_tiny("llama", folder)
    out = tmp_path / "report"
    assert main(["reproduce", "--model", str(folder), "--scale", "smoke", "--sections", "blimp",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert "BLiMP accuracy" in (out / "REPORT.md").read_text()
    # re-rendered from the records, no model
    (out / "REPORT.md").unlink()
    assert main(["reproduce", "--model", "no-such-model", "--render-only", "--out", str(out)]) == 0
    assert "BLiMP accuracy" in (out / "REPORT.md").read_text()
    monkeypatch.setattr(reproduce.UNITS["blimp"], "VERSION", 99)   # records no longer match: recompute
    monkeypatch.setattr(reproduce.UNITS["blimp"], "compute", lambda ctx, item: 1 / 0)
    assert main(["reproduce", "--model", str(folder), "--scale", "smoke", "--sections", "blimp",
                 "--out", str(out), "--device", "cpu"]) == 1
    assert "FAILED sections" in capsys.readouterr().out


def test_command_line_refuses_bad_input_before_loading(tmp_path, capsys):
    """Bad sizes, shards and --out fail before the model loads (the model name here does not exist):
    one line on stderr naming the problem, exit status 2 (kn_utils.cli's convention)."""
    base = ["reproduce", "--model", str(tmp_path / "no-such-model"), "--scale", "smoke", "--out", str(tmp_path / "r")]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = ((base + ["--size", "rome_n=1.5"], "not an integer"),
             (base + ["--size", "bogus=3"], "unknown sizes"),
             (base + ["--size", "rome_n"], "NAME=VALUE"),
             (base + ["--size", "=3"], "NAME=VALUE"),
             (base + ["--size", "blimp_n=0"], "positive integer"),
             (base + ["--size", "aie_n=-3"], "positive integer"),
             (base + ["--shard", "1"], "K/N"),
             (base + ["--time-budget", "0"], "time-budget"),
             (["reproduce", "--model", "x", "--out", str(a_file)], "not a folder|not a directory|is a file"),
             (["reproduce", "--model", "x", "--render-only", "--out", str(tmp_path)], "no records"))
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("python -m kn_utils reproduce: error:"), (argv, err)
        assert re.search(msg, err[0]), (argv, err)
    assert not (tmp_path / "r").exists()


def test_counterfact_section_with_the_data(tiny, tmp_path, data_dir):
    rep = reproduce.reproduce(tiny("llama"), "smoke", tmp_path, sections=["counterfact"], data_dir=data_dir)
    assert rep.failed == []
    table = pd.read_csv(tmp_path / "counterfact_summary.csv")
    assert set(table.editor) == {"rome", "kn"}
    assert set(table.metric) == {"efficacy", "paraphrase", "neighborhood", "score"}
    items = pd.read_csv(tmp_path / "counterfact_items.csv")
    for editor, part in items.groupby("editor"):
        want = counterfact_eval.harmonic_mean([100 * part[m].mean() for m in counterfact_eval.METRICS])
        got = table[(table.editor == editor) & (table.metric == "score")]["ours"].item()
        assert got == pytest.approx(want)
    assert "counterfact-edit.json" in rep.path.read_text()
    # the data folder is shown relative to the report, not as this machine's absolute path
    text = rep.path.read_text()
    assert "- data folder: /" not in text and "Data: /" not in text and "- data folder: .." in text
    # the setting differs from ROME's published numbers, and the report says how
    assert "covariance off" in rep.path.read_text()
    head = pd.read_csv(tmp_path / "headline.csv")
    cf = head[head.result.str.startswith("CounterFact")]
    assert cf[cf.paper.notna()].paper_setting.str.contains("covariance on").all()
    # before -> after on the same records, with a verdict computed by a rule
    paired = pd.read_csv(tmp_path / "counterfact_paired.csv")
    assert {"before", "after", "diff", "diff_lo", "diff_hi", "good_to_bad", "bad_to_good", "verdict"} <= set(paired.columns)
    assert "verdict: " in rep.path.read_text() and "n = 7,500" not in rep.path.read_text()


@pytest.mark.slow
def test_blimp_section_on_the_default_model(default_lm, tmp_path, data_dir):
    """The real model on the real BLiMP: the decoder reads the one-prefix paradigms, skips the
    two-prefix ones, and judges most above chance (SmolLM2: 76-96 % on 50 pairs each)."""
    rep = reproduce.reproduce(default_lm, "report", tmp_path, sections=["blimp"], data_dir=data_dir,
                              sizes={"blimp_n": 30})
    assert rep.failed == []
    table = pd.read_csv(tmp_path / "blimp_summary.csv")
    assert len(table) == 10 and (table.n == 30).all()
    assert table.above_chance.mean() >= 0.5
    assert "blimp/" in rep.path.read_text()   # the data set, not the built-in mini set


def _meta(folder, **kw):
    meta = {"scale": "report", "all_units": True, "incomplete": False, "below_minimum": False,
            "compute_seconds": 7200.0, "commits": ["abcdef1234"], "sections": {"table1": {"n_done": 5, "n_planned": 5}}}
    meta.update(kw)
    (folder / "report.json").write_text(json.dumps(meta))


def test_update_readme_splices_each_models_headline(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{reproduce.README_START}\nold\n{reproduce.README_END}\nrest\n")
    for model, value, meta in (("default", 61.5, {"incomplete": True, "sections": {"t": {"n_done": 3, "n_planned": 5}}}),
                               ("gemma-3-270m", 12.25, {}), ("smoky", 77.75, {"scale": "smoke"}),
                               ("subset", 88.5, {"all_units": False})):
        folder = tmp_path / "reports" / model
        folder.mkdir(parents=True)
        pd.DataFrame([{"result": "Table 1 ROME P36 reliability (token acc. %)", "ours": value, "ci_lo": 1.0,
                       "ci_hi": 99.0, "n": 100, "paper": 100.0, "paper_setting": "GPT-2 XL"}]
                     ).to_csv(folder / "headline.csv", index=False)
        _meta(folder, **meta)
    reproduce.update_readme(readme, tmp_path / "reports")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    assert "61.50" in text and "12.25" in text and "reports/gemma-3-270m/REPORT.md" in text
    # an incomplete report keeps its mark; a smoke or subset report is never a model's headline
    default_line = next(ln for ln in text.splitlines() if ln.startswith("- **default**"))
    assert "**incomplete**" in default_line and "total compute time: 2.00 h" in default_line
    assert "`abcdef123`" in default_line and "scale `report`" in default_line
    assert "**incomplete**" not in next(ln for ln in text.splitlines() if ln.startswith("- **gemma-3-270m**"))
    assert "77.75" not in text and "88.50" not in text and "smoky" not in text
    assert "smoky" in capsys.readouterr().err
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        reproduce.update_readme(readme, tmp_path / "reports")


def test_size_overrides_on_the_command_line(tmp_path, builtin_only, capsys):
    from kn_utils.commands.reproduce import parse_sizes

    assert parse_sizes(["rome_n=30", "max_relations=none"]) == {"rome_n": 30, "max_relations": None}
    for bad, msg in (("rome_n", "NAME=VALUE"), ("rome_n=3.5", "not an integer"), ("=3", "NAME=VALUE")):
        with pytest.raises(ValueError, match=msg):
            parse_sizes([bad])
    folder = tmp_path / "model"
    save_tiny("llama", folder)
    out = tmp_path / "report"
    assert main(["reproduce", "--model", str(folder), "--scale", "smoke", "--sections", "blimp",
                 "--out", str(out), "--device", "cpu", "--size", "blimp_n=4"]) == 0
    assert "'blimp_n': 4" in (out / "REPORT.md").read_text()
    capsys.readouterr()
    # a user's mistake: one line and status 2 (kn_utils.cli), not a traceback
    assert main(["reproduce", "--model", str(folder), "--scale", "smoke", "--size", "blimp_m=4"]) == 2
    assert "python -m kn_utils reproduce: error: unknown sizes" in capsys.readouterr().err


def test_tracing_keeps_correct_facts_only_and_every_agreement_item(tiny, tmp_path, builtin_only,
                                                                    monkeypatch):
    """At the report scale facts are traced as ROME does (correct predictions only), agreement items
    on P(good form) whether or not it is the top-1: a small model's top-1 is rarely the pair's noun."""
    monkeypatch.setattr(ku, "filter_known", lambda lm, facts, n: facts.head(n))
    sizes = {k: v for k, v in reproduce.SCALES["smoke"].items()}
    rep = reproduce.reproduce(tiny("llama"), "report", tmp_path, sections=["tracing"], sizes=sizes)
    assert rep.failed == []
    assert "'dna': False" in rep.path.read_text()
    recs = reproduce.Store(tmp_path).records("tracing")
    correct = {s: sum(r["result"]["kinds"]["hidden"]["correct"] for r in recs.values() if r["result"]["set"] == s)
               for s in ("facts", "dna", "sva")}
    table = pd.read_csv(tmp_path / "tracing_summary.csv").set_index("items")
    for s in ("dna", "sva"):    # every agreement item, correct or not
        assert table.loc[s, "n_traced"] == sum(r["result"]["set"] == s for r in recs.values())
    if correct["facts"]:
        assert table.loc["facts", "n_traced"] == correct["facts"]
    else:
        assert "facts" not in table.index and "facts_skipped" in rep.path.read_text()


def test_commit_is_read_before_the_run_writes_a_file(tiny, tmp_path, builtin_only, monkeypatch):
    """The run's own figures and CSVs (tracked files in reports/) must not make its commit '-dirty'."""
    out = tmp_path / "report"
    seen = []
    monkeypatch.setattr(reproduce, "git_commit", lambda path=None: seen.append(out.exists()) or "abc1234")
    reproduce.reproduce(tiny("llama"), "smoke", out, sections=["blimp"])
    assert seen == [False] and "`abc1234`" in (out / "REPORT.md").read_text()


def test_report_files_are_replaced_not_rewritten_in_place(tiny, tmp_path, builtin_only):
    """Every report file is a new inode after a second render (written beside, then renamed)."""
    reproduce.reproduce(tiny("llama"), "smoke", tmp_path, sections=["blimp"])
    names = ("REPORT.md", "headline.csv", "report.json", "blimp_summary.csv", "blimp.png")
    before = {n: (tmp_path / n).stat().st_ino for n in names}
    reproduce.render_report(tmp_path)
    assert all((tmp_path / n).stat().st_ino != before[n] for n in names)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_git_commit_is_dirty_only_when_the_package_differs(tmp_path):
    """A run's own records and renders (tracked files under reports/) do not make the next run's
    records "-dirty"; a change to kn_utils/ does."""
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "kn_utils").mkdir()
    (tmp_path / "reports").mkdir()
    (tmp_path / "kn_utils" / "a.py").write_text("x = 1\n")
    (tmp_path / "reports" / "REPORT.md").write_text("old\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = reproduce.git_commit(tmp_path)
    assert len(head) == 40
    (tmp_path / "reports" / "REPORT.md").write_text("new\n")
    assert reproduce.git_commit(tmp_path) == head
    (tmp_path / "kn_utils" / "a.py").write_text("x = 2\n")
    assert reproduce.git_commit(tmp_path) == head + "-dirty"


def test_committed_reports_refuse_uncommitted_code(tmp_path, monkeypatch):
    """reports/<model> of the repository takes no record or render from a checkout whose kn_utils/
    differs from its commit (one clear error before anything is written); other folders do."""
    committed = reproduce.COMMITTED_REPORTS / "default"
    monkeypatch.setattr(reproduce, "git_commit", lambda path=None: "abc1234-dirty")
    before = (committed / "REPORT.md").stat().st_mtime_ns if (committed / "REPORT.md").exists() else None
    with pytest.raises(PermissionError, match="uncommitted changes.*--out"):
        reproduce.check_out(committed)
    with pytest.raises(PermissionError, match="uncommitted changes"):
        reproduce.check_out(reproduce.COMMITTED_REPORTS / "new-model" / "sub")
    if before is not None:
        with pytest.raises(PermissionError, match="uncommitted changes"):
            reproduce.render_report(committed)
        assert (committed / "REPORT.md").stat().st_mtime_ns == before
    assert reproduce.check_out(tmp_path / "reports" / "default") == tmp_path / "reports" / "default"
    monkeypatch.setattr(reproduce, "git_commit", lambda path=None: "abc1234")
    assert reproduce.check_out(committed) == committed
