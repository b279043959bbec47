"""Fig 6b: BLiMP judgements before -> after an intervention on a determiner-noun agreement bag's
knowledge neurons, on the same pairs (accuracy, flips both ways, McNemar).

Item: one KN bag, ``<paradigm>/<group>`` (singular or plural): its knowledge neurons (shared with
Table 8 in one process), then two interventions scored on the paradigm's pairs by
:func:`kn_utils.fig6b.fig6b_edit_effect`: the paper's code protocol (the neurons' activations erased
at the read position of each pair, ``kn_code/plot.py::pre_post_edit_probs``) and Dai et al.'s weight
edit (:func:`kn_utils.kn_edit`, the group's grammatical word moved towards the ungrammatical one)."""
from __future__ import annotations

import pandas as pd

from .. import paper, verdicts
from ..stats import summarize
from .common import blimp_bag_items, figure, item_frame, sure, verdict_line

NAME = "fig6b"
TITLE = "Fig 6b: BLiMP accuracy before / after the KN edit"
VERSION = 2     # 2: the paper code's protocol (suppression at the read position) and the weight edit, paired
RESULT_SIZES = ("fig6b_pairs", "bag_prompts", "ig_steps")
MINIMUM = {"bag_prompts": 20, "fig6b_pairs": 200}
# Decoders read only the type-1 paradigms (the deciding word comes first); BERT used the type-2 ones.
DNA_CAUSAL = ("determiner_noun_agreement_1", "determiner_noun_agreement_irregular_1",
              "determiner_noun_agreement_with_adjective_1", "determiner_noun_agreement_with_adj_irregular_1")
FIG6B_MASKED = tuple(paper.PAPER_FIG6B)
METHODS = {"suppress": "suppression at the read position (the paper's code)", "kn_edit": "KN weight edit (Dai)"}


def plan(ctx):
    uids = FIG6B_MASKED if ctx.lm.arch.is_masked_lm else DNA_CAUSAL
    items, skipped, source = blimp_bag_items(ctx, uids)
    return {"items": items, "source": source, "n_minimum": len(items), "info": {"skipped": skipped}}


def compute(ctx, item):
    from .. import kn_edit
    from ..fig6b import fig6b_edit_effect

    uid, group, pairs, bag = item["paradigm"], item["group"], item["pairs"], item["bag"]
    res = ctx.knowledge_neurons(("blimp", uid, group), bag.prompt, list(bag.good))
    ref = paper.PAPER_FIG6B.get(uid, (float("nan"), float("nan")))
    row = {"paradigm": uid, "group": group, "n_pairs": len(pairs), "n_kn": len(res.neurons),
           "neurons": str(res.neurons), "paper_before": ref[0], "paper_after": ref[1]}
    sup = fig6b_edit_effect(ctx.lm, pairs, res.neurons).summary()
    row["suppress"] = sup
    if res.neurons:
        first = bag.iloc[0]

        def kn_weight_edit():
            return kn_edit(ctx.lm, res.neurons, first.good, first.bad, prompt=first.prompt)

        row["kn_edit"] = fig6b_edit_effect(ctx.lm, pairs, edit=kn_weight_edit).summary()
    else:
        row["kn_edit"] = None     # a failed search: nothing to edit, counted in the report
    # the columns of version 1's table, from the paired results
    edit = row["kn_edit"] or sup
    row.update(before=sup["before"], after_edit=edit["after"], after_ci_lo=edit["after_lo"],
               after_ci_hi=edit["after_hi"], after_suppress=sup["after"], drop=sup["before"] - edit["after"])
    return row


def _paired_rows(records):
    rows = []
    for r in records:
        res = r["result"]
        for method in METHODS:
            s = res.get(method)
            if s:
                rows.append({"paradigm": res["paradigm"], "group": res["group"], "intervention": method,
                             **{k: v for k, v in s.items() if k != "method"}, "how": s.get("method", ""),
                             "paper_before": res["paper_before"], "paper_after": res["paper_after"]})
    return pd.DataFrame(rows)


def summarise(records, plan, sec, out):
    from ..plotting import plot_blimp_accuracy

    table = item_frame(records)
    if len(table):
        table = table.drop(columns=[c for c in METHODS if c in table])
    sec.tables["summary"] = table
    paired = _paired_rows(records)
    sec.tables["paired"] = paired
    n_pairs = int(table["n_pairs"].min()) if len(table) else 0
    sec.sizes = {"pairs_per_paradigm": plan["sizes"]["fig6b_pairs"], "prompts_per_kn_bag": plan["sizes"]["bag_prompts"],
                 "skipped": [tuple(s) for s in plan.get("info", {}).get("skipped", [])],
                 "report_minimum": paper.size_note("fig6b", n_pairs)}
    if not len(table):
        sec.text = "No usable paradigm for this model type."
        return
    ref = pd.DataFrame(paper.PAPER_FIG6B.values(), columns=["before", "after"])
    p_before, p_after = ref.before.mean(), ref.after.mean()
    p_diff = p_after - p_before
    n_failed = int((table.n_kn == 0).sum())
    lines = [
        f"Each bag's neurons are scored on its paradigm's {n_pairs}+ pairs before and after, on the same pairs: "
        f"BLiMP's judgement P(good) > P(bad) at the read position; flips both ways; after - before with "
        f"Newcombe's interval and McNemar's mid-p per bag. Two interventions: {METHODS['suppress']} — what "
        f"the paper's released code does (kn_code/plot.py::pre_post_edit_probs, weights untouched) — and "
        f"{METHODS['kn_edit']}. {n_failed} of {len(table)} searches found no neuron (nothing to edit: "
        f"counted, no KN-edit row). The paper ({paper.FIG6B_SOURCE}; BERT, type-2 paradigms"
        + ("" if plan.get("arch", {}).get("masked") else "; ours: a decoder on the type-1 paradigms") +
        f") shows mean accuracy {p_before:.1f} → {p_after:.1f} % over its four paradigms ({p_diff:+.2f} points) "
        f"and says edits flip at most {paper.FIG6B_MAX_DROP} % of pairs; we compare mean with mean: before "
        f"with before, after with after, change with change (t over bags)."]
    for method, label in METHODS.items():
        part = paired[paired.intervention == method] if len(paired) else paired
        if not len(part):
            continue
        b, a, d = (summarize(part[c].astype(float)) for c in ("before", "after", "diff"))
        flips = int(part.good_to_bad.sum() + part.bad_to_good.sum())
        total = int(part.n_pairs.sum())
        v = verdicts.paper_finding({"mean": d["mean"], "lo": d["lo"], "hi": d["hi"], "n": d["n"]}, p_diff)
        lines.append(
            f"- {label}: mean before {b['mean']:.1f} [{b['lo']:.1f}, {b['hi']:.1f}] % (paper {p_before:.1f}), "
            f"after {a['mean']:.1f} [{a['lo']:.1f}, {a['hi']:.1f}] % (paper {p_after:.1f}), change "
            f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] points over {d['n']} bags; {flips} of {total} "
            f"pair judgements flipped ({100 * flips / total if total else float('nan'):.1f} %: "
            f"{int(part.good_to_bad.sum())} good → bad, {int(part.bad_to_good.sum())} bad → good); per bag "
            f"{int((part.verdict == 'changes').sum())} of {len(part)} change (McNemar/Newcombe); the paper's "
            f"change — " + verdict_line(v) + f" ({sure(d['n'], d['lo'], d['hi'])})")
    sec.text = "\n".join(lines)
    plot = table.assign(paradigm=table.paradigm.str.replace("determiner_noun_agreement", "dna") + " " + table.group,
                        before=table.before, after=table.after_edit)
    sec.figures.append(figure(out, plot_blimp_accuracy, "fig6b", plot[["paradigm", "before", "after"]],
                              title="BLiMP accuracy before / after the KN edit"))


def headline(sec):
    pr = sec.tables.get("paired")
    if pr is None or not len(pr):
        return []
    ref = pd.DataFrame(paper.PAPER_FIG6B.values(), columns=["before", "after"])
    p_diff = float(ref.after.mean() - ref.before.mean())
    rows = []
    for method, label in (("suppress", "suppression (paper's code)"), ("kn_edit", "KN weight edit")):
        part = pr[pr.intervention == method]
        if len(part):
            d = summarize(part["diff"].astype(float))
            rows.append((f"Fig 6b: accuracy after − before, {label} (points)", d["mean"], d["lo"], d["hi"],
                         d["n"], p_diff, "BERT, KN edit, mean of Fig 6b's four paradigms"))
    return rows
