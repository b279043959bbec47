"""Table 1: ROME and KN edits on ParaRel, before -> after (reliability, generality, locality,
symmetry, synonymy).

Item: one edit, ``<editor>/<relation>/<fact index in the relation's file>`` (e.g. ``rome/P36/000012``),
computed by :func:`kn_utils.evaluation.evaluate_edits` on that one item.  ``rome`` items run ROME in
the paper's configuration (covariance off), ``rome-cov`` items (size ``rome_configs`` = 2) in ROME's
own (covariance on).  The new target of an item comes from a neighbouring fact of the first ``n``
(wrapping), so ``rome_n`` / ``kn_n`` are part of the record key.

Every criterion is a paired before -> after difference over the edits (:func:`kn_utils.stats.
paired_difference`); its verdict is :func:`kn_utils.verdicts.criterion` (an edit whose locality is
below :data:`kn_utils.verdicts.GLOBAL_BELOW` is global and gets no "holds")."""
from __future__ import annotations

import sys

import pandas as pd

from .. import paper, verdicts
from ..stats import summarize
from .common import (after_interval, bar_figure, batch_size, item_frame, merge_sources, ok, paired_row, pct,
                     strip_private, verdict_line)

NAME = "table1"
TITLE = "Table 1: ROME and KN edits on ParaRel (reliability, symmetry, synonymy)"
# 2: rome-cov items (ROME's own configuration) and locality_acc_pre recorded
VERSION = 2
RESULT_SIZES = ("rome_n", "kn_n", "rome_steps", "ig_steps")
MINIMUM = {"rome_n": 100, "kn_n": 20}
RELATIONS = ("P36", "P1376", "P101")
BATCH_GPU = 6      # ROME items batched on an accelerator (see BATCH)
EDITORS = ("rome", "kn")
# item prefix -> (editor, ROME configuration); the report's "editor" column is the prefix
CONFIGS = {"rome": ("rome", "paper"), "rome-cov": ("rome", "rome"), "kn": ("kn", None)}
CRITERIA = ("reliability", "generality", "locality", "symmetry", "synonym")


def _n(ctx, editor):
    return ctx.sizes["rome_n" if editor == "rome" else "kn_n"]


def labels(ctx):
    return ["rome", "kn"] + (["rome-cov"] if ctx.sizes.get("rome_configs", 1) >= 2 else [])


def _hparams(ctx, label):
    editor, config = CONFIGS[label]
    return ctx.rome_hparams(config) if editor == "rome" else ctx.kn_hparams()


def settings(ctx):
    return {"rome_hparams": repr(ctx.rome_hparams()), "kn_hparams": ctx.kn_hparams(),
            **({"rome_cov_hparams": repr(ctx.rome_hparams("rome"))} if "rome-cov" in labels(ctx) else {})}


def _group(ctx, label, rel, n):
    """The items of one configuration and relation, with whether each is edited (not skipped).

    Facts 0 .. n-1, each evaluated among the first n facts (its new target and locality neighbours
    come from them).  Where fewer than n of them can be edited (P101: a field without an occupation
    has no synonymy criterion), the facts after them up to fact N-1 are added, each evaluated among
    the first N (``n_eval``), N the smallest giving n edited items: the section reaches n edits per
    relation without changing the first n items' results."""
    from ..data.pararel import load_bags
    from ..evaluation import skip_reason

    bags = load_bags(rel, data_dir=ctx.data_dir, n=None if n is None else max(n, 2))
    count = min(len(bags), n) if n is not None else len(bags)
    group = [{"id": f"{label}/{rel}/{i:06d}", "label": label, "relation": rel, "index": i} for i in range(count)]
    edited = [skip_reason(ctx.lm, rel, bags, i) is None for i in range(count)]
    if n is not None and sum(edited) < n:
        every = load_bags(rel, data_dir=ctx.data_dir, n=None)
        end, n_edited = count, sum(edited)
        while n_edited < n and end < len(every):
            edited.append(skip_reason(ctx.lm, rel, every, end) is None)
            n_edited += edited[-1]
            end += 1
        group += [{"id": f"{label}/{rel}/{i:06d}", "label": label, "relation": rel, "index": i, "n_eval": end}
                  for i in range(count, end)]
    return group, edited, bags


def plan(ctx):
    from ..data import source_of

    items, sources, n_min, extended = [], [], 0, {}
    for label in labels(ctx):
        editor = CONFIGS[label][0]
        n, minimum = _n(ctx, editor), MINIMUM[f"{editor}_n"]
        for rel in RELATIONS:
            group, edited, bags = _group(ctx, label, rel, n)
            if label == labels(ctx)[0]:
                sources.append(source_of(bags))
            items += group
            if n is not None and len(group) > n:
                extended[f"{label}/{rel}"] = {"facts": len(group), "skipped_in_first": n - sum(edited[:n])}
            # the report minimum: the items up to the minimum-th edited one (all, if never reached)
            reached = [k for k, e in enumerate(edited) if e][minimum - 1:minimum]
            n_min += reached[0] + 1 if reached else len(group)
    # Round robin over configurations and relations, one batch of facts of each at a time: a run stopped
    # by its time budget has measured every relation and editor, not the first relation only, and a
    # round's facts of one relation stay together for compute_batch (one v* batch on an accelerator).
    order, block = {lab: k for k, lab in enumerate(labels(ctx))}, batch_size(sys.modules[__name__], ctx)
    items.sort(key=lambda it: (it["index"] // block, order[it["label"]], RELATIONS.index(it["relation"]),
                               it["index"]))
    rome = {lab: {"layer": _hparams(ctx, lab).layer, "mom2_adjustment": _hparams(ctx, lab).mom2_adjustment,
                  "mom2_n_samples": _hparams(ctx, lab).mom2_n_samples} for lab in labels(ctx) if lab != "kn"}
    return {"items": items, "source": merge_sources(sources, "relations"), "n_minimum": n_min,
            "info": {"rome": rome, "extended": extended}}


def _n_eval(ctx, item):
    """The number of first facts item is evaluated among (see :func:`_group`)."""
    return item.get("n_eval") or _n(ctx, CONFIGS[item["label"]][0])


def compute(ctx, item):
    from ..evaluation import evaluate_edits

    label, rel = item["label"], item["relation"]
    editor = CONFIGS[label][0]
    df = evaluate_edits(ctx.lm, editor=editor, relation=rel, n=_n_eval(ctx, item), data_dir=ctx.data_dir,
                        hparams=_hparams(ctx, label), progress=False, items=[item["index"]])
    return _result(item, df)


def BATCH(ctx):  # noqa: N802 (the unit attribute the runner reads: an int or a function of ctx)
    """ROME items computed at a time by :func:`compute_batch`: 6 on an accelerator, where a forward
    of several requests' rows costs about one's; 1 on a CPU, where one thread does the same FLOPs
    either way and a batch measured slower (x0.87-0.92, benchmarks/RESULTS.md)."""
    return 1 if str(getattr(ctx.lm, "device", "cpu")).startswith("cpu") else BATCH_GPU


def compute_batch(ctx, items):
    """:func:`compute` of each item: the ROME items of one configuration and relation with one
    update computation (``evaluate_edits(..., batch_rome=True)``: every update on the unedited
    weights, then apply, measure, restore each, as the one-item path does), any other item alone."""
    from ..evaluation import evaluate_edits

    out, groups = {}, {}
    for item in items:
        if CONFIGS[item["label"]][0] == "rome":
            groups.setdefault((item["label"], item["relation"], _n_eval(ctx, item)), []).append(item)
        else:
            out[item["id"]] = compute(ctx, item)
    for (label, rel, n_eval), group in groups.items():
        df = evaluate_edits(ctx.lm, editor="rome", relation=rel, n=n_eval, data_dir=ctx.data_dir,
                            hparams=_hparams(ctx, label), progress=False, items=[it["index"] for it in group],
                            batch_rome=True)
        for item in group:
            out[item["id"]] = _result(item, df)
    return [out[item["id"]] for item in items]


def _result(item, df):
    """The item's record from evaluate_edits' rows (its row, or why it was skipped)."""
    label, rel = item["label"], item["relation"]
    rows = df[df["item"] == item["index"]] if len(df) else df
    if rows.empty:
        why = dict(df.attrs.get("skipped", [])).get(item["index"], "skipped")
        return {"_skipped": why, "editor": label, "relation": rel, "item": item["index"]}
    row = rows.iloc[0].to_dict()
    # locality_acc is the share of the neighbours' argmax tokens the edit left unchanged: the
    # unedited model agrees with itself, so its value before the edit is 1 by definition
    row.update(editor=label, config=CONFIGS[label][1] or "", locality_acc_pre=1.0)
    return row


def _paired_rows(df, label, rel):
    """One paired before -> after row per criterion recorded for these items (fractions -> %)."""
    loc_after = df["locality_acc"].astype(float).mean() if "locality_acc" in df else float("nan")
    glob = verdicts.global_edit(loc_after)
    ref = paper.PAPER_TABLE1[rel][1]["gpt2-xl"] if label == "rome" else None
    crit = paper.PAPER_TABLE1[rel][0]
    rows = []
    for c in CRITERIA:
        pre, post = f"{c}_acc_pre", f"{c}_acc"
        if c == "locality" and pre not in df and post in df:
            df = df.assign(locality_acc_pre=1.0)     # records of version 1: 1 by definition
        if post not in df or pre not in df or df[post].isna().all():
            continue
        row = {"editor": label, "relation": rel, "criterion": c,
               **paired_row(df[pre], df[post])}
        v = glob if c == "locality" else verdicts.criterion(row["_paired"], loc_after)
        row["paper_after"] = (ref[0] if c == "reliability" else ref[1] if c == crit else float("nan")) if ref \
            else float("nan")
        row.update(verdict=v.verdict, reason=v.reason, _verdict=v)
        rows.append(row)
    return rows, glob


def summarise(records, plan, sec, out):
    good = ok(records)
    rows, per_item, paired, globs = [], [], [], {}
    present = [lab for lab in CONFIGS if any(r["result"]["editor"] == lab for r in good)]
    for label in present:
        for rel in RELATIONS:
            df = item_frame([r for r in good if r["result"]["editor"] == label and r["result"]["relation"] == rel])
            if df.empty:
                continue
            per_item.append(df)
            crit = paper.PAPER_TABLE1[rel][0]
            for metric, col in (("reliability", "reliability_acc"), (crit, f"{crit}_acc"),
                                ("generality", "generality_acc"), ("locality", "locality_acc"),
                                ("reliability (prob)", "reliability_prob"), (f"{crit} (prob)", f"{crit}_prob")):
                if col not in df:
                    continue
                rec = {"editor": label, "relation": rel, "metric": metric,
                       **pct(summarize(df[col].astype(float), bounds=(0, 1)))}
                # only the paper-config ROME rows go beside ROME's published (covariance-off) numbers
                ref = paper.PAPER_TABLE1[rel][1]["gpt2-xl"] if label == "rome" else None
                rec["paper_gpt2xl"] = (ref[0] if metric == "reliability" else ref[1] if metric == crit
                                       else float("nan")) if ref else float("nan")
                rows.append(rec)
            prs, globs[(label, rel)] = _paired_rows(df, label, rel)
            paired += prs
    table = pd.DataFrame(rows)
    sec.tables["summary"] = table
    sec.tables["paired"] = strip_private(paired)
    sec.tables["items"] = pd.concat(per_item, ignore_index=True) if per_item else pd.DataFrame()
    sizes = plan["sizes"]
    sec.sizes = {"rome_n_per_relation": sizes["rome_n"], "kn_n_per_relation": sizes["kn_n"],
                 "rome_configs": sizes.get("rome_configs", 1),
                 "items_evaluated": {f"{d['editor'].iloc[0]}/{d['relation'].iloc[0]}": len(d) for d in per_item}}
    sec.text = _text(paired, globs, plan, per_item)
    fig_rows = table[table.metric.isin(["reliability", "symmetry", "synonym"])] if len(table) else table
    if not fig_rows.empty:
        sec.figures.append(bar_figure(out, "table1", fig_rows.assign(
            label=fig_rows.editor + " " + fig_rows.relation + " " + fig_rows.metric), "label",
            "Table 1: token accuracy of the new answer after the edit (%)"))


def _text(paired, globs, plan, per_item):
    lines = [
        "Each criterion is measured on the same edits before and after the edit (table **paired**: "
        "before, after, after - before with its 95 % interval: McNemar mid-p with Newcombe's interval "
        "where every value is 0/1, else paired t over edits). The paper prints after-only values "
        "(`paper_after`, ROME on GPT-2 XL, covariance off): our **after** column is the number comparable "
        "to it; the paired difference is what the edit did, which the paper does not print (a criterion "
        "the unedited model already scores, e.g. token credit on multi-token subjects, is no effect of "
        "the edit). Verdict rules (kn_utils.verdicts): an edit whose mean locality after the edit is below "
        f"{verdicts.GLOBAL_BELOW:g} is *global* and none of its criteria is assessed; otherwise a criterion "
        f"*changes* when the paired interval excludes 0, shows *no change* when it includes 0 and lies "
        f"within +-{100 * verdicts.NO_CHANGE_WITHIN:g} points, else is undecided at its n."]
    rome = plan.get("info", {}).get("rome", {})
    for lab, hp in rome.items():
        lines.append(f"- `{lab}` items: ROME at layer {hp['layer']}, covariance "
                     + (f"on (statistics from {hp['mom2_n_samples']:,} texts)" if hp["mom2_adjustment"]
                        else "off") + ("" if lab == "rome" else " — ROME's own configuration, beside the "
                                       "paper's so a reader sees what the configuration does") + ".")
    sizes = plan.get("sizes", {})
    for key, e in plan.get("info", {}).get("extended", {}).items():
        n = sizes.get("kn_n" if key.startswith("kn/") else "rome_n")
        lines.append(f"- `{key}`: {e['skipped_in_first']} of the first {n} facts cannot be edited for this "
                     f"criterion (skipped, counted in the items table's `_skipped`), so facts {n}..{e['facts'] - 1} "
                     f"were added (each evaluated among the first {e['facts']}) to reach {n} edits.")
    for p in paired:
        size = paper.size_note("table1_rome" if p["editor"] != "kn" else "table1_kn", p["n"])
        lines.append(f"- {p['editor']} {p['relation']} {p['criterion']}: {p['before']:.1f} → {p['after']:.1f} % "
                     f"(after - before {p['diff']:+.1f} [{p['diff_lo']:+.1f}, {p['diff_hi']:+.1f}] points, "
                     f"{size}); " + verdict_line(p["_verdict"]))
    for (lab, rel), g in globs.items():
        rel_row = next((p for p in paired if p["editor"] == lab and p["relation"] == rel
                        and p["criterion"] == "reliability"), None)
        crit = paper.PAPER_TABLE1[rel][0]
        crit_row = next((p for p in paired if p["editor"] == lab and p["relation"] == rel
                         and p["criterion"] == crit), None)
        if rel_row is None or crit_row is None:
            continue
        if g.verdict == "global":
            v = verdicts.Verdict("not assessed: global edit", g.reason)
        else:
            v = verdicts.exceeds(after_interval(rel_row), after_interval(crit_row), ("reliability", crit))
        lines.append(f"- {lab} {rel}: the paper's finding (reliability after the edit exceeds {crit}) — "
                     + verdict_line(v))
    return "\n".join(lines)


def headline(sec):
    t1, pr, rows = sec.tables.get("summary"), sec.tables.get("paired"), []
    if t1 is None or t1.empty:
        return rows
    for label, name in (("rome", "ROME"), ("rome-cov", "ROME-cov")):
        for rel in RELATIONS:
            crit = paper.PAPER_TABLE1[rel][0]
            for metric in ("reliability", crit):
                r = t1[(t1.editor == label) & (t1.relation == rel) & (t1.metric == metric)]
                if not len(r):
                    continue
                r = r.iloc[0]
                base = f"Table 1 {name} {rel} {metric}"
                rows.append((f"{base} (token acc. %)", r.ours, r.ci_lo, r.ci_hi, r.n, r.paper_gpt2xl,
                             "GPT-2 XL" if label == "rome" else ""))
                if metric != crit or pr is None or not len(pr):
                    continue
                p = pr[(pr.editor == label) & (pr.relation == rel) & (pr.criterion == metric)]
                if len(p):
                    p = p.iloc[0]
                    rows.append((f"{base}: before (token acc. %)", p.before, p.before_lo, p.before_hi, p.n,
                                 float("nan"), ""))
                    rows.append((f"{base}: after − before (points)", p["diff"], p.diff_lo, p.diff_hi, p.n,
                                 float("nan"), ""))
    return rows
