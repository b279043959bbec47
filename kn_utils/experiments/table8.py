"""Table 8: |KN|, tau and R2_1 of determiner-noun agreement bags.

Item: one KN bag, ``<paradigm>/<group>`` (the Fig 6b unit's ids; its neurons are reused in one
process)."""
from __future__ import annotations

from .. import paper, verdicts
from ..stats import summarize
from .common import NAN_SUMMARY, blimp_bag_items, ci, item_frame, sure, verdict_line
from .fig6b import DNA_CAUSAL

NAME = "table8"
TITLE = "Table 8: |KN|, tau, R2_1 of determiner-noun agreement"
VERSION = 1
RESULT_SIZES = ("fig6b_pairs", "bag_prompts", "ig_steps")
MINIMUM = {"bag_prompts": 20}
DNA_MASKED = tuple(uid for (m, uid) in paper.PAPER_TABLE8 if m == "BERT")


def _paper_model(masked):
    return "BERT" if masked else "GPT-2"


def plan(ctx):
    uids = DNA_MASKED if ctx.lm.arch.is_masked_lm else DNA_CAUSAL
    items, skipped, source = blimp_bag_items(ctx, uids)
    return {"items": items, "source": source, "n_minimum": len(items),
            "info": {"skipped": skipped, "paper_model": _paper_model(ctx.lm.arch.is_masked_lm)}}


def compute(ctx, item):
    uid, group, bag = item["paradigm"], item["group"], item["bag"]
    paper_model = _paper_model(ctx.lm.arch.is_masked_lm)
    res = ctx.knowledge_neurons(("blimp", uid, group), bag.prompt, list(bag.good))
    ref = paper.PAPER_TABLE8.get((paper_model, uid), (float("nan"),) * 3)
    return {"paradigm": uid, "group": group, "n_prompts": len(bag), "kn_at_0.7": res.n_initial,
            "tau": res.tau, "r2": res.r2, "neurons": str(res.neurons),
            f"paper_{paper_model}_kn": ref[0], f"paper_{paper_model}_tau": ref[1],
            f"paper_{paper_model}_r2": ref[2]}


def summarise(records, plan, sec, out):
    from ..evidence import search_summary

    paper_model = plan.get("info", {}).get("paper_model", "GPT-2")
    table = item_frame(records)
    sec.tables["summary"] = table
    n_prompts = plan["sizes"]["bag_prompts"]
    sec.sizes = {"prompts_per_bag": n_prompts, "bags": len(table),
                 "skipped": [tuple(s) for s in plan.get("info", {}).get("skipped", [])],
                 "report_minimum": paper.size_note("table8", n_prompts)}
    if not len(table):
        sec.text = "No bag done yet."
        return
    searches = search_summary(table)
    r2 = searches.get("r2", NAN_SUMMARY)
    kn = searches.get("kn_at_0.7", NAN_SUMMARY)
    ref_r2 = [v[2] for (m, _), v in paper.PAPER_TABLE8.items() if m == paper_model]
    v = verdicts.in_range(r2, min(ref_r2), max(ref_r2))
    fails = ", ".join(f"{k}: {n}" for k, n in searches["failures"].items()) or "none"
    sec.text = "\n".join([
        f"Searches: {searches['n_found']} of {searches['n']} bags found knowledge neurons; {searches['n_failed']} "
        f"failed ({fails}): counted, not averaged.",
        f"- mean R2_1 over found bags {ci(r2)} (t over bags) against the paper's {paper_model} values "
        f"{min(ref_r2):.2f}-{max(ref_r2):.2f} ({paper.TABLE8_SOURCE}); "
        + verdict_line(v, "within the paper's range (\"as low\" for GPT-2):"),
        f"- mean |KN| at tau = 0.7 over found bags {ci(kn)} ({sure(r2['n'], r2['lo'], r2['hi'])})."])


def headline(sec):
    t = sec.tables.get("summary")
    if t is None or not len(t) or "r2" not in t:
        return []
    from ..evidence import split_searches

    d = summarize(split_searches(t)[0]["r2"].dropna())     # found searches only
    return [("Table 8: mean R2_1 over bags (found searches)", d["mean"], d["lo"], d["hi"], d["n"], float("nan"), "see the section")]
