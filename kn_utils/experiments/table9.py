"""Table 9: |KN|, tau and R2_1 per ParaRel relation.

Item: one fact with at least two prompts, ``<relation>/<fact index>`` (the same ids as the Dai unit,
whose knowledge neurons it reuses within one process)."""
from __future__ import annotations

import pandas as pd

from .. import paper, verdicts
from ..stats import summarize
from .common import ci, fact_items, fact_searches, verdict_line
from .dai import n_minimum

NAME = "table9"
TITLE = "Table 9: |KN|, tau, R2_1 per ParaRel relation"
VERSION = 2     # 2: the search's neurons and n_kn recorded (failed searches are counted)
RESULT_SIZES = ("ig_steps",)
MINIMUM = {"facts_per_relation": 3}


def plan(ctx):
    # tau and R2_1 compare prompts: a relation whose facts have one decoder prompt each (its other
    # ParaRel patterns do not end where the object starts) has nothing to measure
    items, source, lacking = fact_items(ctx, min_prompts=2)
    return {"items": items, "source": source, "n_minimum": n_minimum(ctx, lacking),
            "info": {"relations_without_two_prompts": lacking}}


def compute(ctx, item):
    res = ctx.knowledge_neurons(("pararel", item["relation"], item["fact"]), item["prompts"], item["bag"].object)
    return {"relation": item["relation"], "fact": item["fact"], "n_prompts": len(item["prompts"]),
            "kn_at_0.7": res.n_initial, "tau": res.tau, "r2": res.r2, "n_kn": len(res.neurons),
            "neurons": str(res.neurons)}


def summarise(records, plan, sec, out):
    searched = fact_searches(records, sec)
    if searched is None:
        return
    facts, found, failed, searches = searched
    table = found.groupby("relation", sort=False).agg(
        facts=("fact", "count"), prompts=("n_prompts", "mean"), kn_at_07=("kn_at_0.7", "mean"),
        tau=("tau", "mean"), r2=("r2", "mean")).reset_index()
    n_failed = failed.groupby("relation").size()
    table["failed_searches"] = table.relation.map(n_failed).fillna(0).astype(int)
    # relations whose every search failed: listed with their count, no mean
    lost = [r for r in n_failed.index if r not in set(table.relation)]
    table = pd.concat([table, pd.DataFrame({"relation": lost, "facts": 0,
                                            "failed_searches": [int(n_failed[r]) for r in lost]})],
                      ignore_index=True)
    sec.tables["summary"], sec.tables["facts"] = table, facts
    n_facts = plan["sizes"]["facts_per_relation"]
    sec.sizes = {"relations": int(facts.relation.nunique()), "facts_per_relation": n_facts,
                 "ig_steps": plan["sizes"]["ig_steps"], "report_minimum": paper.size_note("table9", n_facts)}
    lo_t, hi_t = paper.PAPER_TABLE9_RANGES["tau"]
    lo_r, hi_r = paper.PAPER_TABLE9_RANGES["r2"]
    fails = ", ".join(f"{k}: {v}" for k, v in searches["failures"].items()) or "none"
    lines = [f"Searches: {searches['n_found']} of {searches['n']} facts found knowledge neurons; "
             f"{searches['n_failed']} failed ({fails}): counted per relation (`failed_searches`) and left "
             f"out of every mean (a search that ends with 0 neurons or tau on its bound measured nothing)."]
    for col, lo, hi, name in (("tau", lo_t, hi_t, "tau"), ("r2", lo_r, hi_r, "R2_1")):
        s = searches.get(col)
        if s is None:
            continue
        v = verdicts.in_range(s, lo, hi)
        lines.append(f"- mean {name} over found searches {ci(s)} (n = {s['n']}; paper BERT range over relations "
                     f"{lo}-{hi}, {paper.TABLE9_SOURCE}); " + verdict_line(v, "within the paper's range:"))
    lines.append(f"Each relation rests on {n_facts or 'all'} facts: per-relation values are noisy; the "
                 f"verdicts use the mean over all found searches with its t interval.")
    lacking = plan.get("info", {}).get("relations_without_two_prompts") or []
    if lacking:
        lines.append(f"Not measured: {len(lacking)} relations whose facts have fewer than two decoder prompts "
                     f"(tau and R2_1 compare prompts): {', '.join(lacking)}; the report minimum counts the "
                     f"other relations.")
    sec.text = "\n".join(lines)


def headline(sec):
    t = sec.tables.get("summary")
    if t is None or not len(t) or "r2" not in t:
        return []
    d = summarize(t["r2"].dropna())     # relations with a found search
    return [("Table 9: mean R2_1 over relations", d["mean"], d["lo"], d["hi"], d["n"], float("nan"), "see the section")]
