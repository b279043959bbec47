"""Fig 6b: BLiMP accuracy before / after the KN edit of a determiner-noun agreement bag.

Item: one KN bag, ``<paradigm>/<group>`` (singular or plural): its knowledge neurons (shared with
Table 8 in one process), accuracy before, after Dai's edit and with the neurons suppressed."""
from __future__ import annotations

from .. import paper
from ..stats import summarize
from .common import blimp_bag_items, ci, figure, item_frame, sure

NAME = "fig6b"
TITLE = "Fig 6b: BLiMP accuracy before / after the KN edit"
VERSION = 1
RESULT_SIZES = ("fig6b_pairs", "bag_prompts", "ig_steps")
MINIMUM = {"bag_prompts": 20, "fig6b_pairs": 200}
# Decoders read only the type-1 paradigms (the deciding word comes first); BERT used the type-2 ones.
DNA_CAUSAL = ("determiner_noun_agreement_1", "determiner_noun_agreement_irregular_1",
              "determiner_noun_agreement_with_adjective_1", "determiner_noun_agreement_with_adj_irregular_1")
FIG6B_MASKED = tuple(paper.PAPER_FIG6B)


def plan(ctx):
    uids = FIG6B_MASKED if ctx.lm.arch.is_masked_lm else DNA_CAUSAL
    items, skipped, source = blimp_bag_items(ctx, uids)
    return {"items": items, "source": source, "n_minimum": len(items), "info": {"skipped": skipped}}


def compute(ctx, item):
    from .. import blimp_accuracy, kn_edit
    from ..stats import wilson

    uid, group, pairs, bag = item["paradigm"], item["group"], item["pairs"], item["bag"]
    res = ctx.knowledge_neurons(("blimp", uid, group), bag.prompt, list(bag.good))
    before = blimp_accuracy(ctx.lm, pairs)
    row = {"paradigm": uid, "group": group, "n_pairs": len(pairs), "n_kn": len(res.neurons),
           "before": 100 * before}
    if res.neurons:
        # The paper's KN edit (Dai's update): the group's value slots move from its grammatical
        # word towards the ungrammatical one (first pair of the bag), restored after measuring.
        first = bag.iloc[0]
        with kn_edit(ctx.lm, res.neurons, first.good, first.bad, prompt=first.prompt):
            after = blimp_accuracy(ctx.lm, pairs)
        suppressed = blimp_accuracy(ctx.lm, pairs, neurons=res.neurons, factor=0.0)
    else:
        after = suppressed = before
    lo, hi = wilson(round(after * len(pairs)), len(pairs))
    ref = paper.PAPER_FIG6B.get(uid, (float("nan"), float("nan")))
    row.update(after_edit=100 * after, after_ci_lo=100 * lo, after_ci_hi=100 * hi,
               after_suppress=100 * suppressed, drop=100 * (before - after),
               paper_before=ref[0], paper_after=ref[1])
    return row


def summarise(records, plan, sec, out):
    from ..plotting import plot_blimp_accuracy

    table = item_frame(records)
    sec.tables["summary"] = table
    sec.sizes = {"pairs_per_paradigm": plan["sizes"]["fig6b_pairs"], "prompts_per_kn_bag": plan["sizes"]["bag_prompts"],
                 "skipped": [tuple(s) for s in plan.get("info", {}).get("skipped", [])]}
    if not len(table):
        sec.text = "No usable paradigm for this model type."
        return
    drops = summarize(table["drop"].astype(float))
    small = (table["drop"] <= paper.FIG6B_MAX_DROP).mean()
    sec.text = (f"The KN edit lowers accuracy by {ci(drops)} points on average (paper: at most "
                f"{paper.FIG6B_MAX_DROP}); {100 * small:.0f} % of the {len(table)} edits flip at most "
                f"{paper.FIG6B_MAX_DROP} % of pairs, so the paper's finding (KN edits rarely change the "
                f"grammaticality judgement) {'holds' if small == 1 else 'holds only in part'} "
                f"({sure(len(table), drops['lo'], drops['hi'])}: {len(table)} edits, at least {int(table['n_pairs'].min())} "
                f"pairs per paradigm).")
    plot = table.assign(paradigm=table.paradigm.str.replace("determiner_noun_agreement", "dna") + " " + table.group,
                        before=table.before, after=table.after_edit)
    sec.figures.append(figure(out, plot_blimp_accuracy, "fig6b", plot[["paradigm", "before", "after"]],
                              title="BLiMP accuracy before / after the KN edit"))


def headline(sec):
    f6 = sec.tables.get("summary")
    if f6 is None or not len(f6):
        return []
    d = summarize(f6["drop"].astype(float))
    return [("Fig 6b: accuracy drop after the KN edit (points)", d["mean"], d["lo"], d["hi"], d["n"],
             paper.FIG6B_MAX_DROP, "BERT, at most (Fig 6b)")]
