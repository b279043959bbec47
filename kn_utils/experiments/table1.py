"""Table 1: ROME and KN edits on ParaRel (reliability, symmetry, synonymy).

Item: one edit, ``<editor>/<relation>/<fact index in the relation's file>`` (e.g. ``rome/P36/000012``),
computed by :func:`kn_utils.evaluation.evaluate_edits` on that one item.  The new target of an item
comes from a neighbouring fact of the first ``n`` (wrapping), so ``rome_n`` / ``kn_n`` are part of
the record key."""
from __future__ import annotations

import pandas as pd

from .. import paper
from ..stats import summarize
from .common import bar_figure, item_frame, ok, pct, sure

NAME = "table1"
TITLE = "Table 1: ROME and KN edits on ParaRel (reliability, symmetry, synonymy)"
VERSION = 1
RESULT_SIZES = ("rome_n", "kn_n", "rome_steps", "ig_steps")
MINIMUM = {"rome_n": 100, "kn_n": 20}
RELATIONS = ("P36", "P1376", "P101")
EDITORS = ("rome", "kn")


def _n(ctx, editor):
    return ctx.sizes["rome_n" if editor == "rome" else "kn_n"]


def settings(ctx):
    return {"rome_hparams": repr(ctx.rome_hparams()), "kn_hparams": ctx.kn_hparams()}


def plan(ctx):
    from ..data import source_of
    from ..data.pararel import load_bags

    items, sources = [], set()
    for editor in EDITORS:
        n = _n(ctx, editor)
        for rel in RELATIONS:
            bags = load_bags(rel, data_dir=ctx.data_dir, n=None if n is None else max(n, 2))
            sources.add(source_of(bags) or "")
            count = min(len(bags), n) if n is not None else len(bags)
            items += [{"id": f"{editor}/{rel}/{i:06d}", "editor": editor, "relation": rel, "index": i}
                      for i in range(count)]
    n_min = sum(MINIMUM[f"{e}_n"] for e in EDITORS) * len(RELATIONS)
    return {"items": items, "source": "; ".join(sorted(s for s in sources if s)), "n_minimum": n_min}


def compute(ctx, item):
    from ..evaluation import evaluate_edits

    editor, rel = item["editor"], item["relation"]
    hp = ctx.rome_hparams() if editor == "rome" else ctx.kn_hparams()
    df = evaluate_edits(ctx.lm, editor=editor, relation=rel, n=_n(ctx, editor), data_dir=ctx.data_dir,
                        hparams=hp, progress=False, items=[item["index"]])
    return _result(item, df)


def BATCH(ctx):  # noqa: N802 (the unit attribute the runner reads: an int or a function of ctx)
    """ROME items computed at a time by :func:`compute_batch`: 6 on an accelerator, where a forward
    of several requests' rows costs about one's; 1 on a CPU, where one thread does the same FLOPs
    either way and a batch measured slower (x0.87-0.92, benchmarks/RESULTS.md)."""
    return 1 if str(getattr(ctx.lm, "device", "cpu")).startswith("cpu") else 6


def compute_batch(ctx, items):
    """:func:`compute` of each item: the ROME items of one relation with one update computation
    (``evaluate_edits(..., batch_rome=True)``: every update on the unedited weights, then apply,
    measure, restore each, as the one-item path does), any other item alone."""
    from ..evaluation import evaluate_edits

    out = {}
    groups = {}
    for item in items:
        if item["editor"] == "rome":
            groups.setdefault(item["relation"], []).append(item)
        else:
            out[item["id"]] = compute(ctx, item)
    for rel, group in groups.items():
        df = evaluate_edits(ctx.lm, editor="rome", relation=rel, n=_n(ctx, "rome"), data_dir=ctx.data_dir,
                            hparams=ctx.rome_hparams(), progress=False, items=[it["index"] for it in group],
                            batch_rome=True)
        for item in group:
            out[item["id"]] = _result(item, df)
    return [out[item["id"]] for item in items]


def _result(item, df):
    """The item's record from evaluate_edits' rows (its row, or why it was skipped)."""
    editor, rel = item["editor"], item["relation"]
    rows = df[df["item"] == item["index"]] if len(df) else df
    if rows.empty:
        why = dict(df.attrs.get("skipped", [])).get(item["index"], "skipped")
        return {"_skipped": why, "editor": editor, "relation": rel, "item": item["index"]}
    return rows.iloc[0].to_dict()


def summarise(records, plan, sec, out):
    rows, per_item = [], []
    good = ok(records)
    for editor in EDITORS:
        for rel in RELATIONS:
            df = item_frame([r for r in good if r["result"]["editor"] == editor and r["result"]["relation"] == rel])
            if df.empty:
                continue
            per_item.append(df)
            crit = paper.PAPER_TABLE1[rel][0]
            for metric, col in (("reliability", "reliability_acc"), (crit, f"{crit}_acc"),
                                ("generality", "generality_acc"), ("locality", "locality_acc"),
                                ("reliability (prob)", "reliability_prob"), (f"{crit} (prob)", f"{crit}_prob")):
                if col not in df:
                    continue
                rec = {"editor": editor, "relation": rel, "metric": metric,
                       **pct(summarize(df[col].astype(float), bounds=(0, 1)))}
                # KN rows are never put beside ROME's published numbers
                ref = paper.PAPER_TABLE1[rel][1]["gpt2-xl"] if editor == "rome" else None
                rec["paper_gpt2xl"] = (ref[0] if metric == "reliability" else ref[1] if metric == crit
                                       else float("nan")) if ref else float("nan")
                rows.append(rec)
    table = pd.DataFrame(rows)
    sec.tables["summary"] = table
    sec.tables["items"] = pd.concat(per_item, ignore_index=True) if per_item else pd.DataFrame()
    sec.sizes = {"rome_n_per_relation": plan["sizes"]["rome_n"], "kn_n_per_relation": plan["sizes"]["kn_n"],
                 "items_evaluated": {f"{d['editor'].iloc[0]}/{d['relation'].iloc[0]}": len(d) for d in per_item}}
    texts = []
    for rel in RELATIONS:
        crit = paper.PAPER_TABLE1[rel][0]
        if table.empty:
            break
        part = table[(table.editor == "rome") & (table.relation == rel)].set_index("metric")
        if "reliability" not in part.index or crit not in part.index:
            continue
        r, c = part.loc["reliability"], part.loc[crit]
        holds = r["ci_lo"] > c["ci_hi"]
        texts.append(f"{rel}: ROME reliability {r['ours']:.1f} % [{r['ci_lo']:.1f}, {r['ci_hi']:.1f}] vs "
                     f"{crit} {c['ours']:.1f} % [{c['ci_lo']:.1f}, {c['ci_hi']:.1f}] (paper GPT-2 XL "
                     f"{r['paper_gpt2xl']:.1f} / {c['paper_gpt2xl']:.1f}): the paper's finding (edits "
                     f"succeed on the edited prompt, not on its {crit} counterpart) "
                     f"{'holds' if holds else 'is not shown'} here ({sure(int(r['n']), c['ci_lo'], c['ci_hi'])}).")
    sec.text = " ".join(texts)
    fig_rows = table[table.metric.isin(["reliability", "symmetry", "synonym"])] if len(table) else table
    if not fig_rows.empty:
        sec.figures.append(bar_figure(out, "table1", fig_rows.assign(
            label=fig_rows.editor + " " + fig_rows.relation + " " + fig_rows.metric), "label",
            "Table 1: token accuracy of the new answer (%)"))


def headline(sec):
    t1, rows = sec.tables.get("summary"), []
    if t1 is None or t1.empty:
        return rows
    for rel in RELATIONS:
        crit = paper.PAPER_TABLE1[rel][0]
        for metric in ("reliability", crit):
            r = t1[(t1.editor == "rome") & (t1.relation == rel) & (t1.metric == metric)]
            if len(r):
                r = r.iloc[0]
                rows.append((f"Table 1 ROME {rel} {metric} (token acc. %)", r.ours, r.ci_lo, r.ci_hi, r.n,
                             r.paper_gpt2xl, "GPT-2 XL"))
    return rows
