"""CounterFact: efficacy, paraphrase, neighbourhood and ROME's score for the ROME and KN edits,
each before -> after on the same records.

Item: one edit of one CounterFact record, ``<editor>/<case_id>`` (``rome``: the paper's configuration,
covariance off; ``rome-cov``: ROME's own, covariance on, with size ``rome_configs`` = 2; ``kn``),
computed by :func:`kn_utils.counterfact_eval.evaluate_counterfact` on that record alone (records are
independent, so ``counterfact_n`` is not part of the record key)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import paper, verdicts
from ..stats import summarize
from .common import SectionSkipped, bar_figure, item_frame, paired_row, pct, strip_private, verdict_line
from .table1 import CONFIGS, labels

NAME = "counterfact"
TITLE = "CounterFact: efficacy, paraphrase, neighbourhood, score"
VERSION = 2     # 2: rome-cov items (ROME's own configuration)
RESULT_SIZES = ("rome_steps", "ig_steps")
MINIMUM = {"counterfact_n": 50}
EDITORS = ("rome", "kn")
SCORE_BOOT, SCORE_SEED = 2000, 0    # bootstrap of the score over records, fixed seed


def settings(ctx):
    return {"rome_hparams": repr(ctx.rome_hparams()), "kn_hparams": ctx.kn_hparams(),
            **({"rome_cov_hparams": repr(ctx.rome_hparams("rome"))} if "rome-cov" in labels(ctx) else {})}


def plan(ctx):
    from ..data import data_root
    from ..data.counterfact import load_counterfact

    if data_root(ctx.data_dir) is None:   # CounterFact has no built-in mini set
        raise SectionSkipped("no data folder (CounterFact has no built-in set): set KN_DATA_DIR")
    records = load_counterfact(ctx.data_dir, n=ctx.sizes["counterfact_n"])
    ids = records["case_id"] if "case_id" in records else records.index
    # record by record, each editor in turn: a run stopped by its budget has measured every editor
    items = [{"id": f"{label}/{cid}", "label": label, "records": records.iloc[[i]]}
             for i, cid in enumerate(ids) for label in labels(ctx)]
    return {"items": items, "source": records.attrs.get("data_source", ""),
            "n_minimum": MINIMUM["counterfact_n"] * len(labels(ctx)), "info": {"records_per_editor": len(records)}}


def compute(ctx, item):
    from ..counterfact_eval import evaluate_counterfact

    label = item.get("label", item.get("editor"))
    editor, config = CONFIGS[label]
    hp = ctx.rome_hparams(config) if editor == "rome" else ctx.kn_hparams()
    df = evaluate_counterfact(ctx.lm, editor, n=None, records=item["records"], hparams=hp,
                              data_dir=ctx.data_dir, progress=False)
    return {**df.iloc[0].to_dict(), "editor": label, "config": config or ""}


def score_interval(df, n_boot: int = SCORE_BOOT, seed: int = SCORE_SEED) -> tuple[float, float, float]:
    """ROME's score (harmonic mean of the three success rates, %) and its percentile bootstrap
    interval over records (records resampled with a fixed seed; the score is recomputed each time)."""
    from ..counterfact_eval import METRICS, harmonic_mean

    x = df[list(METRICS)].astype(float).to_numpy()
    score = harmonic_mean(list(100 * x.mean(0)))
    if len(x) < 2:
        return score, float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    boots = [harmonic_mean(list(100 * x[i].mean(0))) for i in idx]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return score, float(lo), float(hi)


def summarise(records, plan, sec, out):
    from ..counterfact_eval import METRICS

    rows, items, paired, scores, globs = [], [], [], {}, {}
    present = [lab for lab in CONFIGS if any(r["result"]["editor"] == lab for r in records)]
    for label in present:
        df = item_frame([r for r in records if r["result"]["editor"] == label])
        items.append(df)
        g = None
        for m in METRICS:
            pr = {"editor": label, "metric": m, **paired_row(df[f"{m}_pre"], df[m])}
            if m == "neighborhood":
                g = verdicts.global_edit(pr["after"] / 100, pr["before"] / 100)
            paired.append(pr)
            ref = paper.ROME_COUNTERFACT.get(label, {}).get(m, float("nan"))
            rows.append({"editor": label, "metric": m, **pct(summarize(df[m].astype(float), bounds=(0, 1))),
                         "before_edit": pr["before"], "paper_gpt2xl": ref})
        globs[label] = g
        for pr in paired:
            if pr["editor"] == label:
                if pr["metric"] == "neighborhood":
                    v = g
                elif g.verdict == "global":     # a global edit's efficacy says nothing of the fact
                    v = verdicts.Verdict("not assessed: global edit", g.reason)
                else:
                    v = verdicts.changes(pr["_paired"])
                pr.update(verdict=v.verdict, reason=v.reason, _verdict=v)
        s, lo, hi = score_interval(df)
        scores[label] = {"mean": s, "lo": lo, "hi": hi, "n": len(df)}
        rows.append({"editor": label, "metric": "score", "ours": s, "ci_lo": lo, "ci_hi": hi, "n": len(df),
                     "ci": f"percentile bootstrap over records ({SCORE_BOOT}, seed {SCORE_SEED})",
                     "paper_gpt2xl": paper.ROME_COUNTERFACT.get(label, {}).get("score", float("nan"))})
    table = pd.DataFrame(rows)
    sec.tables["summary"] = table
    sec.tables["paired"] = strip_private(paired)
    sec.tables["items"] = pd.concat(items, ignore_index=True) if items else pd.DataFrame()
    n_rec = plan.get("info", {}).get("records_per_editor")
    sec.sizes = {"records_per_editor": n_rec, "report_minimum": paper.size_note("counterfact", n_rec),
                 "rome_configs": plan["sizes"].get("rome_configs", 1)}
    lines = [
        "Setting: `rome` items run the paper's configuration (covariance off, as Table 1), `rome-cov` items "
        "ROME's own (covariance on); ROME's published CounterFact numbers (" + paper.COUNTERFACT_SOURCE +
        ") are for its own configuration, so only `rome-cov` is like for like with them; the paper quotes "
        "no number of records for them. Each metric is paired before -> after on the same records "
        "(McNemar mid-p, Newcombe interval); the published numbers are after-only, so our **after** is "
        f"the comparable value. Rule: neighbourhood success after the edit below {verdicts.GLOBAL_BELOW:g}, "
        f"or fallen by more than {verdicts.GLOBAL_DROP:g}, makes the edit *global* (kn_utils.verdicts."
        "global_edit), and then no other metric of that editor is assessed. The score is ROME's harmonic "
        f"mean of the three rates with a percentile bootstrap interval over records ({SCORE_BOOT} resamples, "
        f"seed {SCORE_SEED}); the ranking compares those intervals (kn_utils.verdicts.ranking)."]
    for pr in paired:
        lines.append(f"- {pr['editor']} {pr['metric']}: {pr['before']:.1f} → {pr['after']:.1f} % (after - before "
                     f"{pr['diff']:+.1f} [{pr['diff_lo']:+.1f}, {pr['diff_hi']:+.1f}] points, {pr['good_to_bad']} "
                     f"lost / {pr['bad_to_good']} gained of n = {pr['n']}); " + verdict_line(pr["_verdict"]))
    for label in present:
        if label == "kn" or "kn" not in scores:
            continue
        loc = {lab: next(p["after"] / 100 for p in paired if p["editor"] == lab and p["metric"] == "neighborhood")
               for lab in (label, "kn")}
        v = verdicts.ranking(scores[label], scores["kn"], loc[label], loc["kn"])
        lines.append(f"- score {label} {scores[label]['mean']:.1f} [{scores[label]['lo']:.1f}, "
                     f"{scores[label]['hi']:.1f}] vs kn {scores['kn']['mean']:.1f} [{scores['kn']['lo']:.1f}, "
                     f"{scores['kn']['hi']:.1f}] (ROME paper {paper.ROME_COUNTERFACT['rome']['score']} vs "
                     f"{paper.ROME_COUNTERFACT['kn']['score']}); the paper's ranking (ROME above KN) — "
                     + verdict_line(v))
    sec.text = "\n".join(lines)
    if len(table):
        plot = table[table.metric != "score"].assign(label=lambda d: d.editor + " " + d.metric)
        sec.figures.append(bar_figure(out, "counterfact", plot, "label", "CounterFact success after the edit (%)"))


def headline(sec):
    cf, pr, rows = sec.tables.get("summary"), sec.tables.get("paired"), []
    if cf is None or cf.empty:
        return rows
    for label in CONFIGS:
        name = label.upper().replace("-COV", "-cov")
        for metric in ("efficacy", "paraphrase", "neighborhood", "score"):
            r = cf[(cf.editor == label) & (cf.metric == metric)]
            if not len(r):
                continue
            r = r.iloc[0]
            setting = ("ROME paper, GPT-2 XL, covariance on" + ("" if label == "rome-cov" else " (ours: off)")
                       + ("" if label != "kn" else ", KN baseline"))
            ref = paper.ROME_COUNTERFACT["rome" if label == "rome-cov" else label][metric]
            rows.append((f"CounterFact {name} {metric} (%)", r.ours, r.get("ci_lo", float("nan")),
                         r.get("ci_hi", float("nan")), r.n, ref, setting))
            p = pr[(pr.editor == label) & (pr.metric == metric)] if pr is not None and len(pr) else []
            if len(p):
                p = p.iloc[0]
                rows.append((f"CounterFact {name} {metric}: before (%)", p.before, p.before_lo, p.before_hi,
                             p.n, float("nan"), ""))
                rows.append((f"CounterFact {name} {metric}: after − before (points)", p["diff"], p.diff_lo,
                             p.diff_hi, p.n, float("nan"), ""))
    return rows
