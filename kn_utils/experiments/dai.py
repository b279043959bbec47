"""Dai et al.: suppressing / enhancing the knowledge neurons of ParaRel facts.

Item: one fact, ``<relation>/<fact index in the relation's file>`` (e.g. ``P36/0002``): its knowledge
neurons (shared with Table 9 in one process), then P(correct) with them suppressed and enhanced."""
from __future__ import annotations

import pandas as pd

from .. import paper
from ..stats import summarize
from .common import bar_figure, ci, fact_items, item_frame, sure

NAME = "dai"
TITLE = "Dai et al.: suppressing / enhancing knowledge neurons of ParaRel facts"
VERSION = 1
RESULT_SIZES = ("ig_steps",)
MINIMUM = {"facts_per_relation": 3}


def n_minimum(ctx):
    from ..data.pararel import relations

    return MINIMUM["facts_per_relation"] * len(relations(ctx.data_dir))


def plan(ctx):
    items, source = fact_items(ctx)
    return {"items": items, "source": source, "n_minimum": n_minimum(ctx)}


def compute(ctx, item):
    from ..editing.kn import measure_intervention

    bag, prompts, rel, i = item["bag"], item["prompts"], item["relation"], item["fact"]
    res = ctx.knowledge_neurons(("pararel", rel, i), prompts, bag.object)
    row = {"relation": rel, "fact": i, "subject": bag.subject, "object": bag.object,
           "n_prompts": len(prompts), "n_kn": len(res.neurons)}
    for mode in ("suppress", "enhance"):
        if res.neurons:
            df = measure_intervention(ctx.lm, prompts, [bag.object], res.neurons, mode=mode)
            pre, post = df["pre"].mean(), df["post"].mean()
            row[f"{mode}_change"] = 100 * (post - pre) / pre if pre > 0 else float("nan")
        else:
            row[f"{mode}_change"] = float("nan")
    return row


def summarise(records, plan, sec, out):
    facts = item_frame(records)
    if facts.empty:
        sec.text = "No fact done yet."
        return
    s_sup, s_enh, s_kn = (summarize(facts[c].astype(float)) for c in ("suppress_change", "enhance_change", "n_kn"))
    table = pd.DataFrame([
        {"measure": "suppress: change of P(correct) (%)", "ours": s_sup["mean"], "ci_lo": s_sup["lo"],
         "ci_hi": s_sup["hi"], "n": s_sup["n"], "paper_dai": paper.DAI_SUPPRESS},
        {"measure": "enhance: change of P(correct) (%)", "ours": s_enh["mean"], "ci_lo": s_enh["lo"],
         "ci_hi": s_enh["hi"], "n": s_enh["n"], "paper_dai": paper.DAI_ENHANCE},
        {"measure": "knowledge neurons per fact", "ours": s_kn["mean"], "ci_lo": s_kn["lo"],
         "ci_hi": s_kn["hi"], "n": s_kn["n"], "paper_dai": paper.DAI_KN_PER_FACT},
    ])
    sec.tables["summary"], sec.tables["facts"] = table, facts
    sec.sizes = {"facts": len(facts), "relations": int(facts.relation.nunique()),
                 "facts_per_relation": plan["sizes"]["facts_per_relation"], "ig_steps": plan["sizes"]["ig_steps"]}
    direction = (s_sup["hi"] < 0) and (s_enh["lo"] > 0)
    sec.text = (f"Suppressing a fact's knowledge neurons changes P(correct) by {ci(s_sup)} % (Dai: "
                f"{paper.DAI_SUPPRESS} %), enhancing by {ci(s_enh)} % (Dai: +{paper.DAI_ENHANCE} %), with "
                f"{s_kn['mean']:.2f} neurons per fact (Dai: {paper.DAI_KN_PER_FACT}). Dai's direction "
                f"(suppress lowers, enhance raises) {'holds' if direction else 'is not shown'} "
                f"({sure(s_sup['n'], s_sup['lo'], s_sup['hi'])}; facts without neurons count as n/a).")
    plot = table.iloc[:2].assign(label=["suppress", "enhance"])
    sec.figures.append(bar_figure(out, "dai", plot, "label", "change of P(correct) (%), ours vs Dai",
                                  paper_col="paper_dai", percent=False))


def headline(sec):
    dai = sec.tables.get("summary")
    if dai is None:
        return []
    return [(f"Dai et al.: {r.measure}", r.ours, r.ci_lo, r.ci_hi, r.n, r.paper_dai, "BERT-base, PARAREL")
            for _, r in dai.iterrows()]
