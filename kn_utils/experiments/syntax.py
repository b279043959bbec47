"""Syntax vs facts: Table 8's BLiMP searches against Table 9's ParaRel searches on the same model
(|KN| at tau = 0.7, final tau, R2_1, share of knowledge neurons in the top third of the layers) —
the paper's §3 claim that syntactic and factual neurons localise alike, tested.

No items of its own: the section is rendered from the records of the Table 8 and Table 9 units in
the same report folder (:func:`kn_utils.evidence.syntax_vs_facts`), so it needs no model and renders
under ``--render-only`` whenever both have records (the layer count comes from their plans)."""
from __future__ import annotations

from .. import paper
from .common import ok, verdict_line

NAME = "syntax"
TITLE = "Syntax vs facts: Table 8 against Table 9 (the paper's §3 claim)"
VERSION = 1
RESULT_SIZES = ()
MINIMUM = {}
DERIVED = ("table8", "table9")    # rendered from these units' records


def plan(ctx):
    return {"items": [], "source": "the Table 8 and Table 9 records of this report folder", "n_minimum": 0,
            "info": {"n_layers": ctx.lm.arch.n_layers}}


def compute(ctx, item):     # pragma: no cover - the unit plans no items
    raise RuntimeError("the syntax unit has no items: it is rendered from Table 8 and Table 9")


def derived_plan(plans: dict) -> dict:
    """A plan for a folder whose run did not include this unit: from Table 8's / Table 9's plans."""
    base = plans.get("table8") or plans.get("table9") or {}
    return {"items": [], "n_minimum": 0, "sizes": base.get("sizes", {}), "arch": base.get("arch", {}),
            "source": "the Table 8 and Table 9 records of this report folder",
            "info": {"n_layers": base.get("arch", {}).get("n_layers")}}


def _records(out, unit):
    from ..store import Store

    store = Store(out)
    p = store.plan(unit)
    if p is None or p.get("skipped") or p.get("error"):
        return None, p
    recs = store.records(unit, p.get("key"))
    return ok([recs[i] for i in p.get("items", []) if i in recs]), p


def summarise(records, plan, sec, out):
    from ..evidence import syntax_vs_facts
    from .common import item_frame

    t8, p8 = _records(out, "table8")
    t9, p9 = _records(out, "table9")
    if not t8 or not t9:
        missing = [name for name, r in (("Table 8", t8), ("Table 9", t9)) if not r]
        sec.text = f"Needs records of both Table 8 and Table 9 in this folder; none of {', '.join(missing)} yet."
        return
    arch = (p8 or p9 or {}).get("arch", {})
    n_layers = plan.get("info", {}).get("n_layers") or arch.get("n_layers")
    cmp = syntax_vs_facts(item_frame(t8), item_frame(t9), n_layers=int(n_layers) if n_layers else None)
    sec.tables["summary"] = cmp.table
    sizes8, sizes9 = (p8 or {}).get("sizes", {}), (p9 or {}).get("sizes", {})
    sec.sizes = {"bags": len(t8), "facts": len(t9), **cmp.counts, "n_layers": n_layers,
                 "table8_minimum": paper.size_note("table8", sizes8.get("bag_prompts")),
                 "table9_minimum": paper.size_note("table9", sizes9.get("facts_per_relation"))}
    lines = [cmp.sentence,
             "Rule (kn_utils.verdicts.alike): a measure is *alike* when the Welch interval of syntax - facts "
             "lies within its margin (|KN| 1 neuron, tau 0.05, R2_1 and the top-third share 0.1), *differ* when "
             "it excludes 0, else undecided; the claim is supported only when every measure is alike."]
    lines += [f"- {r.measure}: " + verdict_line(v) for r, v in zip(cmp.table.itertuples(), cmp.verdicts.values())]
    lines.append("- the paper's §3 claim: " + verdict_line(cmp.overall))
    sec.text = "\n".join(lines)


def headline(sec):
    t = sec.tables.get("summary")
    if t is None or not len(t):
        return []
    # "|KN|" would split a markdown table's cell
    return [(f"Syntax − facts: {r.measure.replace('|KN|', 'number of KNs')} (difference)", r.diff, r.diff_lo, r.diff_hi,
             int(r.syntax_n) + int(r.facts_n), float("nan"), "") for r in t.itertuples()]
