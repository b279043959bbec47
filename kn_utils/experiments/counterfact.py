"""CounterFact: efficacy, paraphrase, neighbourhood and ROME's score for the ROME and KN edits.

Item: one edit of one CounterFact record, ``<editor>/<case_id>``, computed by
:func:`kn_utils.counterfact_eval.evaluate_counterfact` on that record alone (records are independent,
so ``counterfact_n`` is not part of the record key)."""
from __future__ import annotations

import pandas as pd

from .. import paper
from ..stats import summarize
from .common import SectionSkipped, bar_figure, item_frame, pct, sure

NAME = "counterfact"
TITLE = "CounterFact: efficacy, paraphrase, neighbourhood, score"
VERSION = 1
RESULT_SIZES = ("rome_steps", "ig_steps")
MINIMUM = {"counterfact_n": 50}
EDITORS = ("rome", "kn")


def settings(ctx):
    return {"rome_hparams": repr(ctx.rome_hparams()), "kn_hparams": ctx.kn_hparams()}


def plan(ctx):
    from ..data import data_root
    from ..data.counterfact import load_counterfact

    if data_root(ctx.data_dir) is None:   # CounterFact has no built-in mini set
        raise SectionSkipped("no data folder (CounterFact has no built-in set): set KN_DATA_DIR")
    records = load_counterfact(ctx.data_dir, n=ctx.sizes["counterfact_n"])
    ids = records["case_id"] if "case_id" in records else records.index
    items = [{"id": f"{editor}/{cid}", "editor": editor, "records": records.iloc[[i]]}
             for editor in EDITORS for i, cid in enumerate(ids)]
    return {"items": items, "source": records.attrs.get("data_source", ""),
            "n_minimum": MINIMUM["counterfact_n"] * len(EDITORS), "info": {"records_per_editor": len(records)}}


def compute(ctx, item):
    from ..counterfact_eval import evaluate_counterfact

    editor = item["editor"]
    hp = ctx.rome_hparams() if editor == "rome" else ctx.kn_hparams()
    df = evaluate_counterfact(ctx.lm, editor, n=None, records=item["records"], hparams=hp,
                              data_dir=ctx.data_dir, progress=False)
    return df.iloc[0].to_dict()


def summarise(records, plan, sec, out):
    from ..counterfact_eval import METRICS, summarize_counterfact

    rows, items, scores = [], [], {}
    for editor in EDITORS:
        df = item_frame([r for r in records if r["result"]["editor"] == editor])
        if df.empty:
            continue
        items.append(df)
        scores[editor] = summarize_counterfact(df)
        for m in METRICS:
            rows.append({"editor": editor, "metric": m, **pct(summarize(df[m].astype(float), bounds=(0, 1))),
                         "before_edit": 100 * df[f"{m}_pre"].mean(), "paper_gpt2xl": paper.ROME_COUNTERFACT[editor][m]})
        rows.append({"editor": editor, "metric": "score", "ours": scores[editor]["score"],
                     "n": len(df), "ci": "", "paper_gpt2xl": paper.ROME_COUNTERFACT[editor]["score"]})
    table = pd.DataFrame(rows)
    sec.tables["summary"] = table
    sec.tables["items"] = pd.concat(items, ignore_index=True) if items else pd.DataFrame()
    sec.sizes = {"records_per_editor": plan.get("info", {}).get("records_per_editor")}
    text = ("Setting: our ROME runs the paper's configuration (covariance off, as Table 1); ROME's "
            "published CounterFact numbers are for its own (covariance on, its means of leaving other "
            "keys alone), so neighbourhood and score are not like for like. ")
    if len(scores) == len(EDITORS):
        eff = table[table.metric == "efficacy"].set_index("editor")
        holds = eff.loc["rome", "ci_lo"] > eff.loc["kn", "ci_hi"]
        text += (f"ROME score {scores['rome']['score']:.1f} (paper 89.2), KN edit score "
                 f"{scores['kn']['score']:.1f} (paper 35.6). The paper's ranking (ROME's efficacy above the "
                 f"KN edit's) {'holds' if holds else 'is not shown'}: efficacy {eff.loc['rome', 'ours']:.1f} % "
                 f"[{eff.loc['rome', 'ci_lo']:.1f}, {eff.loc['rome', 'ci_hi']:.1f}] vs "
                 f"{eff.loc['kn', 'ours']:.1f} % [{eff.loc['kn', 'ci_lo']:.1f}, {eff.loc['kn', 'ci_hi']:.1f}] "
                 f"({sure(int(eff.loc['kn', 'n']), eff.loc['kn', 'ci_lo'], eff.loc['kn', 'ci_hi'])}).")
    sec.text = text
    if len(table):
        plot = table[table.metric != "score"].assign(label=lambda d: d.editor + " " + d.metric)
        sec.figures.append(bar_figure(out, "counterfact", plot, "label", "CounterFact success after the edit (%)"))


def headline(sec):
    cf, rows = sec.tables.get("summary"), []
    if cf is None or cf.empty:
        return rows
    for editor in EDITORS:
        for metric in ("efficacy", "paraphrase", "neighborhood", "score"):
            r = cf[(cf.editor == editor) & (cf.metric == metric)]
            if len(r):
                r = r.iloc[0]
                rows.append((f"CounterFact {editor.upper()} {metric} (%)", r.ours, r.get("ci_lo", float("nan")),
                             r.get("ci_hi", float("nan")), r.n, r.paper_gpt2xl,
                             "ROME paper, GPT-2 XL, covariance on (ours: off)"))
    return rows
