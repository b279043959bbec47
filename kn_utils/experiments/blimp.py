"""BLiMP accuracy on the paper's paradigms.

Item: one paradigm (its uid), its first ``blimp_n`` pairs; a paradigm the model type cannot read is
listed as skipped with the reason."""
from __future__ import annotations

import pandas as pd

from .. import paper
from .common import bar_figure, item_frame, ok, paradigm_pairs

NAME = "blimp"
TITLE = "BLiMP accuracy on the paper's paradigms"
VERSION = 1
RESULT_SIZES = ("blimp_n",)
MINIMUM = {"blimp_n": 200}


def plan(ctx):
    from ..data.blimp import PAPER_PARADIGMS

    items, sources = [], set()
    for uid in PAPER_PARADIGMS:
        pairs, why = paradigm_pairs(ctx, uid, ctx.sizes["blimp_n"])
        if pairs is not None and not pairs.empty:
            sources.add(pairs.attrs.get("data_source") or "")
        items.append({"id": uid, "paradigm": uid, "pairs": pairs, "why": why})
    return {"items": items, "source": "; ".join(sorted(s for s in sources if s)), "n_minimum": len(items)}


def compute(ctx, item):
    from .. import blimp_accuracy
    from ..stats import wilson

    uid, pairs = item["paradigm"], item["pairs"]
    if pairs is None:
        return {"_skipped": item["why"][:160], "paradigm": uid}
    if pairs.empty:
        return {"_skipped": "no usable pair", "paradigm": uid}
    acc = blimp_accuracy(ctx.lm, pairs)
    lo, hi = wilson(round(acc * len(pairs)), len(pairs))
    return {"paradigm": uid, "n": len(pairs), "accuracy": 100 * acc, "ci_lo": 100 * lo,
            "ci_hi": 100 * hi, "above_chance": bool(lo > 0.5),
            "paper_bert_before": paper.PAPER_FIG6B.get(uid, (float("nan"),))[0]}


def summarise(records, plan, sec, out):
    table = item_frame(ok(records))
    skipped = [{"paradigm": r["result"]["paradigm"], "why": r["result"]["_skipped"]}
               for r in records if r["result"].get("_skipped")]
    sec.tables["summary"] = table
    if skipped:
        sec.tables["skipped"] = pd.DataFrame(skipped)
    sec.sizes = {"pairs_per_paradigm": plan["sizes"]["blimp_n"],
                 "report_minimum": paper.size_note("blimp", plan["sizes"]["blimp_n"]), "paradigms": len(table),
                 "skipped": [s["paradigm"] for s in skipped]}
    n_above = int(table.above_chance.sum()) if len(table) else 0
    sec.text = (f"{n_above} of {len(table)} readable paradigms are above chance (Wilson lower bound > 50 %). "
                f"Skipped {len(skipped)}: " + ("; ".join(f"{s['paradigm']} ({s['why']})" for s in skipped)
                                               or "none") + ".")
    if len(table):
        plot = table.assign(label=table.paradigm.str.replace("determiner_noun_agreement", "dna"))
        sec.figures.append(bar_figure(out, "blimp", plot.rename(columns={"accuracy": "ours"}), "label",
                                      "BLiMP accuracy (%)", paper_col=None))


def headline(sec):
    bl = sec.tables.get("summary")
    if bl is None or not len(bl):
        return []
    return [("BLiMP paradigms above chance (count)", float(bl.above_chance.sum()), float("nan"), float("nan"),
             len(bl), float("nan"), "")]
