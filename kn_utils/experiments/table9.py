"""Table 9: |KN|, tau and R2_1 per ParaRel relation.

Item: one fact with at least two prompts, ``<relation>/<fact index>`` (the same ids as the Dai unit,
whose knowledge neurons it reuses within one process)."""
from __future__ import annotations

from .. import paper
from ..stats import summarize
from .common import fact_items, item_frame
from .dai import n_minimum

NAME = "table9"
TITLE = "Table 9: |KN|, tau, R2_1 per ParaRel relation"
VERSION = 1
RESULT_SIZES = ("ig_steps",)
MINIMUM = {"facts_per_relation": 3}


def plan(ctx):
    items, source = fact_items(ctx, min_prompts=2)
    return {"items": items, "source": source, "n_minimum": n_minimum(ctx)}


def compute(ctx, item):
    res = ctx.knowledge_neurons(("pararel", item["relation"], item["fact"]), item["prompts"], item["bag"].object)
    return {"relation": item["relation"], "fact": item["fact"], "n_prompts": len(item["prompts"]),
            "kn_at_0.7": res.n_initial, "tau": res.tau, "r2": res.r2}


def summarise(records, plan, sec, out):
    facts = item_frame(records)
    if facts.empty:
        sec.text = "No fact done yet."
        return
    table = facts.groupby("relation", sort=False).agg(
        facts=("fact", "count"), prompts=("n_prompts", "mean"), kn_at_07=("kn_at_0.7", "mean"),
        tau=("tau", "mean"), r2=("r2", "mean")).reset_index()
    sec.tables["summary"], sec.tables["facts"] = table, facts
    sec.sizes = {"relations": len(table), "facts_per_relation": plan["sizes"]["facts_per_relation"],
                 "ig_steps": plan["sizes"]["ig_steps"]}
    lo_t, hi_t = paper.PAPER_TABLE9_RANGES["tau"]
    lo_r, hi_r = paper.PAPER_TABLE9_RANGES["r2"]
    in_t = table.tau.between(lo_t, hi_t).mean()
    in_r = table.r2.between(lo_r, hi_r).mean()
    sec.text = (f"Over {len(table)} relations our tau spans {table.tau.min():.2f}-{table.tau.max():.2f} "
                f"(paper BERT {lo_t}-{hi_t}; {100 * in_t:.0f} % of relations inside) and R2_1 spans "
                f"{table.r2.min():.2f}-{table.r2.max():.2f} (paper {lo_r}-{hi_r}; {100 * in_r:.0f} % inside). "
                f"Each relation rests on {plan['sizes']['facts_per_relation'] or 'all'} facts: per-relation "
                f"values are noisy, the ranges are the comparison the paper makes.")


def headline(sec):
    t = sec.tables.get("summary")
    if t is None or not len(t) or "r2" not in t:
        return []
    d = summarize(t["r2"].dropna())
    return [("Table 9: mean R2_1 over relations", d["mean"], d["lo"], d["hi"], d["n"], float("nan"), "see the section")]
