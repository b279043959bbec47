"""Dai et al.: suppressing / enhancing the knowledge neurons of ParaRel facts.

Item: one fact, ``<relation>/<fact index in the relation's file>`` (e.g. ``P36/0002``): its knowledge
neurons (shared with Table 9 in one process), then P(correct) with them suppressed and enhanced."""
from __future__ import annotations

import pandas as pd

from .. import paper, verdicts
from ..stats import summarize
from .common import bar_figure, ci, fact_items, fact_searches, sure, verdict_line

NAME = "dai"
TITLE = "Dai et al.: suppressing / enhancing knowledge neurons of ParaRel facts"
VERSION = 2     # 2: the search's neurons, tau and R2_1 recorded (failed searches are counted)
RESULT_SIZES = ("ig_steps",)
MINIMUM = {"facts_per_relation": 3}


def n_minimum(ctx, lacking=()):
    """facts_per_relation facts on every relation but ``lacking`` (those :func:`fact_items` found
    no usable fact in)."""
    from ..data.pararel import relations

    return MINIMUM["facts_per_relation"] * (len(relations(ctx.data_dir)) - len(lacking))


def plan(ctx):
    items, source, lacking = fact_items(ctx)
    return {"items": items, "source": source, "n_minimum": n_minimum(ctx, lacking)}


def compute(ctx, item):
    from ..editing.kn import measure_intervention

    bag, prompts, rel, i = item["bag"], item["prompts"], item["relation"], item["fact"]
    res = ctx.knowledge_neurons(("pararel", rel, i), prompts, bag.object)
    row = {"relation": rel, "fact": i, "subject": bag.subject, "object": bag.object,
           "n_prompts": len(prompts), "n_kn": len(res.neurons), "neurons": str(res.neurons),
           "tau": res.tau, "r2": res.r2}
    for mode in ("suppress", "enhance"):
        if res.neurons:
            df = measure_intervention(ctx.lm, prompts, [bag.object], res.neurons, mode=mode)
            pre, post = df["pre"].mean(), df["post"].mean()
            row[f"{mode}_change"] = 100 * (post - pre) / pre if pre > 0 else float("nan")
        else:
            row[f"{mode}_change"] = float("nan")
    return row


def summarise(records, plan, sec, out):
    searched = fact_searches(records, sec)
    if searched is None:
        return
    facts, found, failed, searches = searched
    s_sup, s_enh = (summarize(found[c].astype(float)) for c in ("suppress_change", "enhance_change"))
    s_kn = searches["n_kn"]
    table = pd.DataFrame([
        {"measure": "suppress: change of P(correct) (%)", "ours": s_sup["mean"], "ci_lo": s_sup["lo"],
         "ci_hi": s_sup["hi"], "n": s_sup["n"], "paper_dai": paper.DAI_SUPPRESS},
        {"measure": "enhance: change of P(correct) (%)", "ours": s_enh["mean"], "ci_lo": s_enh["lo"],
         "ci_hi": s_enh["hi"], "n": s_enh["n"], "paper_dai": paper.DAI_ENHANCE},
        {"measure": "knowledge neurons per fact", "ours": s_kn["mean"], "ci_lo": s_kn["lo"],
         "ci_hi": s_kn["hi"], "n": s_kn["n"], "paper_dai": paper.DAI_KN_PER_FACT},
    ])
    table["n_failed_searches"] = searches["n_failed"]
    sec.tables["summary"], sec.tables["facts"] = table, facts
    if len(failed):
        sec.tables["failed"] = failed.drop(columns=[c for c in ("worker", "seconds") if c in failed])
    n_facts = plan["sizes"]["facts_per_relation"]
    sec.sizes = {"facts": len(facts), "relations": int(facts.relation.nunique()),
                 "facts_per_relation": n_facts, "ig_steps": plan["sizes"]["ig_steps"],
                 "report_minimum": paper.size_note("table9", n_facts)}
    v_sup = verdicts.exceeds({"mean": 0.0, "lo": 0.0, "hi": 0.0, "n": s_sup["n"]}, s_sup, ("0", "suppress"))
    v_enh = verdicts.exceeds(s_enh, {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n": s_enh["n"]}, ("enhance", "0"))
    both = v_sup.verdict == v_enh.verdict == "exceeds"
    fails = ", ".join(f"{k}: {v}" for k, v in searches["failures"].items()) or "none"
    sec.text = "\n".join([
        f"Searches: {searches['n_found']} of {searches['n']} facts found knowledge neurons; "
        f"{searches['n_failed']} failed ({fails}) and are counted here, not averaged: every mean below is "
        f"over the found searches only (t over facts).",
        f"- suppressing a fact's knowledge neurons changes P(correct) by {ci(s_sup)} % (Dai: {paper.DAI_SUPPRESS} %, "
        f"{paper.DAI_SOURCE}); " + verdict_line(v_sup, "lowers P(correct):"),
        f"- enhancing changes it by {ci(s_enh)} % (Dai: +{paper.DAI_ENHANCE} %); " + verdict_line(v_enh, "raises P(correct):"),
        f"- {s_kn['mean']:.2f} [{s_kn['lo']:.2f}, {s_kn['hi']:.2f}] neurons per found fact (Dai: {paper.DAI_KN_PER_FACT}).",
        f"- Dai's direction (suppress lowers and enhance raises, both intervals clear of 0): "
        f"{'shown' if both else 'not shown'} ({sure(s_sup['n'], s_sup['lo'], s_sup['hi'])})."])
    plot = table.iloc[:2].assign(label=["suppress", "enhance"])
    sec.figures.append(bar_figure(out, "dai", plot, "label", "change of P(correct) (%), ours vs Dai",
                                  paper_col="paper_dai", percent=False))


def headline(sec):
    dai = sec.tables.get("summary")
    if dai is None:
        return []
    return [(f"Dai et al.: {r.measure}", r.ours, r.ci_lo, r.ci_hi, r.n, r.paper_dai, "BERT-base, PARAREL")
            for _, r in dai.iterrows()]
