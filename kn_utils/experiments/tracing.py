"""Causal tracing: average indirect effects of facts, determiner-noun and subject-verb agreement.

Item: one traced prompt, ``facts/<known_id>`` or ``dna/<rank>`` / ``sva/<rank>`` (rank among the
pool's likeliest good forms), traced for the three kinds (hidden, MLP, attention) with the set's
data-set-wide noise level (ROME's "s3" over the set's subjects, fixed when the set is planned).
A record keeps each kind's per-(token, layer) scores, rounded, so the averages, the peaks (t over
items, :func:`kn_utils.stats.aie_peak`) and figures are rebuilt from records alone."""
from __future__ import annotations

import pandas as pd

from .. import paper
from .common import figure

NAME = "tracing"
TITLE = "Causal tracing: average indirect effects of facts, DNA and SVA"
VERSION = 1
RESULT_SIZES = ("aie_n", "trace_samples", "agreement_pool")
MINIMUM = {"aie_n": 50}
KINDS = ("hidden", "mlp", "attn")
AGREEMENT_TRACES = (("dna", "determiner_noun_agreement_with_adjective_1", "determiner"),
                    ("sva", "regular_plural_subject_verb_agreement_1", "subject"))
SETS = ("facts", "dna", "sva")


def plan(ctx):
    from .. import filter_known, load_known_facts
    from ..blimp_tasks import trace_items
    from ..tracing import noise_level

    n = ctx.sizes["aie_n"]
    facts = load_known_facts(ctx.data_dir)
    # ROME traces facts the model knows; a smoke run's random model knows none, so it traces its own
    # predictions instead (stated in the sizes)
    only_correct = ctx.scale != "smoke"
    known = filter_known(ctx.lm, facts, n) if only_correct else facts.head(n)
    info = {"only_correct": {"facts": only_correct, "dna": False, "sva": False}, "facts_known": len(known),
            "n_per_set": n, "noise_samples": ctx.sizes["trace_samples"], "skipped": {}, "noise": {},
            "n_layers": ctx.lm.arch.n_layers}
    sets = {"facts": (known, [f"facts/{k}" for k in known["known_id"]])}
    sources = [facts.attrs.get("data_source", "")]
    for name, uid, corrupt in AGREEMENT_TRACES:
        try:
            df = trace_items(ctx.lm, uid, corrupt, n, data_dir=ctx.data_dir, pool=max(ctx.sizes["agreement_pool"], n))
            sets[name] = (df, [f"{name}/{i:04d}" for i in range(len(df))])
            sources.append(df.attrs.get("data_source", ""))
        except ValueError as exc:   # e.g. a masked LM cannot be traced on the decoder prompts
            info["skipped"][name] = str(exc)[:160]
    items = []
    for name, (df, ids) in sets.items():
        if df.empty:
            info["skipped"][name] = "no item the model predicts"
            continue
        level = noise_level(ctx.lm, list(df["subject"]), factor=3.0)   # ROME's data-set-wide "s3"
        info["noise"][name] = level
        for item_id, (_, row) in zip(ids, df.iterrows()):
            items.append({"id": item_id, "set": name, "prompt": row["prompt"], "subject": row["subject"],
                          "target": row.get("target", row.get("attribute")), "noise": level})
    # the minimum is on the facts (issue 21: >= 50 known facts); every agreement item planned counts too
    n_min = MINIMUM["aie_n"] + sum(it["set"] != "facts" for it in items)
    return {"items": items, "source": "; ".join(s for s in sources if s), "n_minimum": n_min, "info": info}


def compute(ctx, item):
    from ..store import clean
    from ..tracing import causal_traces

    out = {"set": item["set"], "kinds": {}}
    # the three kinds share the clean run and the corrupted prefixes (the same numbers as one
    # causal_trace per kind, tests/test_tracing_shared.py)
    traces = causal_traces(ctx.lm, item["prompt"], item["subject"], kinds=KINDS,
                           samples=ctx.sizes["trace_samples"], noise=item["noise"], window=10,
                           target=item["target"])
    for kind in KINDS:
        tr = traces[kind]
        out.update(n_tokens=len(tr.tokens), subject_range=list(tr.subject_range), read_position=tr.read_position)
        out["kinds"][kind] = {"scores": clean(tr.scores.tolist(), 9),   # 9 digits: float32 exactly
                              "low": tr.low_score, "high": tr.high_score,
                              "correct": bool(tr.correct)}
    return out


def _traces(records, kind, keep_correct):
    import torch

    from ..tracing import TraceResult

    out = []
    for r in records:
        res, k = r["result"], r["result"]["kinds"][kind]
        if keep_correct and not k["correct"]:
            continue
        out.append(TraceResult(scores=torch.tensor(k["scores"], dtype=torch.float32), low_score=k["low"],
                               high_score=k["high"], tokens=[""] * res["n_tokens"],
                               subject_range=tuple(res["subject_range"]), answer="", answer_id=-1, kind=kind,
                               window=1 if kind == "hidden" else 10, read_position=res["read_position"],
                               correct=k["correct"]))
    return out


# "both": the items where the last subject token is the last token, dropped from the other two
CLASSES = {"lst": "last subject token", "last": "last token", "both": "last subject token = last token"}


def _peaks(traces_by_kind):
    """Per kind and token class: :func:`kn_utils.stats.aie_peak` over the items' own effects (t over
    items; relative to each item's total effect), items whose last subject token is the last token
    (an agreement prompt ending at its corrupted word) dropped from those two classes, counted, and
    traced as their own class ("both")."""
    from ..evidence import COINCIDING, class_effects
    from ..stats import aie_peak

    out, counts = {}, {}
    for kind, traces in traces_by_kind.items():
        for short, cls in CLASSES.items():
            e, te, dropped = class_effects(traces, COINCIDING if short == "both" else cls)
            counts[short] = (len(e), dropped)
            nan = float("nan")
            out[(kind, short)] = aie_peak(e, te) if len(e) else {
                "layer": -1, "aie": nan, "lo": nan, "hi": nan, "n": 0, "relative": nan, "rel_lo": nan, "rel_hi": nan}
    return out, counts


def summarise(records, plan, sec, out):
    from ..plotting import plot_aie
    from ..tracing import aggregate_traces

    info = plan.get("info", {})
    L = info.get("n_layers")
    sec.sizes["only_correct"] = info.get("only_correct", {})
    for name, why in info.get("skipped", {}).items():
        sec.sizes[f"{name}_skipped"] = why
    rows, tables, peaks = [], {}, {}
    for name in SETS:
        recs = [r for r in records if r["result"]["set"] == name]
        if not recs:
            continue
        keep_correct = info.get("only_correct", {}).get(name, False)
        aie, traces_by_kind = {}, {}
        for kind in KINDS:
            traces = _traces(recs, kind, keep_correct)
            if not traces:
                break
            traces_by_kind[kind] = traces
            aie[kind] = aggregate_traces(traces, kind)
            aie[kind].attrs["n_skipped"] = len(recs) - len(traces)
        if len(aie) < len(KINDS):
            sec.sizes[f"{name}_skipped"] = (f"the model predicts none of the {len(recs)} targets: nothing to "
                                            f"average (pass only_correct=False to trace its own predictions)")[:160]
            continue
        tables[name] = pd.concat([df.assign(kind=k) for k, df in aie.items()], ignore_index=True)
        h = aie["hidden"].attrs
        clean, corrupted = h["high_score"], h["low_score"]
        pk, counts = _peaks(traces_by_kind)
        peaks[name] = pk
        row = {"items": name, "n_traced": h["n_items"], "clean": 100 * clean, "corrupted": 100 * corrupted,
               "total_effect": 100 * (clean - corrupted)}
        for (kind, short), p in pk.items():
            row.update({f"peak_{kind}_{short}": 100 * p["aie"], f"layer_{kind}_{short}": p["layer"],
                        f"peak_{kind}_{short}_lo": 100 * p["lo"], f"peak_{kind}_{short}_hi": 100 * p["hi"],
                        f"peak_{kind}_{short}_ci95": 100 * (p["hi"] - p["lo"]) / 2,
                        f"rel_{kind}_{short}": p["relative"], f"rel_{kind}_{short}_lo": p["rel_lo"],
                        f"rel_{kind}_{short}_hi": p["rel_hi"]})
        for short, (n, dropped) in counts.items():
            row.update({f"n_{short}": n, f"dropped_coinciding_{short}": dropped})
        row.update(n_layers=L, method="t over items at the peak layer; relative: delta-method t")
        rows.append(row)
        sec.figures.append(figure(out, plot_aie, f"tracing_{name}", aie, title=f"AIE: {name}"))
    table = pd.DataFrame(rows)
    rt = paper.ROME_TRACING
    sec.tables["summary"] = table
    sec.csv_only = ("summary",)     # one wide row per set: the long "peaks" table is the one shown
    sec.tables["peaks"] = pd.DataFrame(
        [{"items": name, "kind": kind, "token class": CLASSES[short], "layer": p["layer"], "aie %": 100 * p["aie"],
          "lo": 100 * p["lo"], "hi": 100 * p["hi"], "n": p["n"], "relative": p["relative"], "rel_lo": p["rel_lo"],
          "rel_hi": p["rel_hi"], "interval": "t over items"}
         for name, pk in peaks.items() for (kind, short), p in pk.items() if p["n"]])   # n = 0: no peak
    sec.tables["paper"] = pd.DataFrame([{**rt, "source": paper.TRACING_SOURCE}])
    for name, df in tables.items():
        sec.tables[f"aie_{name}"] = df
    sec.sizes.update({"facts_known": info.get("facts_known"), "n_per_set": info.get("n_per_set"),
                      "noise_samples": info.get("noise_samples"),
                      "report_minimum": paper.size_note("aie", info.get("facts_known"))})
    sec.text = _text(table, peaks, L, rt)


def _fmt_peak(p, L):
    if not p["n"]:
        return "no estimate (n = 0)"
    rel = (f", {100 * p['relative']:.0f} % [{100 * p['rel_lo']:.0f}, {100 * p['rel_hi']:.0f}] of the total effect"
           if p["relative"] == p["relative"] else "")
    return (f"{100 * p['aie']:.2f} [{100 * p['lo']:.2f}, {100 * p['hi']:.2f}] % at layer {p['layer']} of {L}"
            f" (n = {p['n']}{rel})")


def _text(table, peaks, L, rt):
    from .. import verdicts
    from .common import verdict_line

    texts = ["Peaks: the layer where the mean indirect effect over items is largest; its 95 % interval is "
             "Student t over the items' own effects at that layer (each item counts once; a class with "
             "several tokens is averaged within the item), and `rel_*` is the peak relative to the total "
             "effect (clean - corrupted) with a delta-method t interval. Items whose last subject token is "
             "the last token (an agreement prompt ending at its corrupted word) are dropped from those two "
             "classes and counted (`dropped_coinciding_*`); their shared token is a class of its own, "
             "\"last subject token = last token\"."]
    by = table.set_index("items") if len(table) else table
    if "facts" in peaks:
        f, pk = by.loc["facts"], peaks["facts"]
        mlp, attn = pk[("mlp", "lst")], pk[("attn", "lst")]
        v = verdicts.exceeds(mlp, attn, ("MLP peak", "attention peak"))
        if v.verdict == "exceeds" and not mlp["layer"] < L / 2:
            v = verdicts.Verdict("not at an early site", f"{v.reason}, but the MLP peaks at layer {mlp['layer']} "
                                                         f">= {L / 2:g} (half the model)")
        texts.append(f"- Facts ({int(f.n_traced)} traced; {paper.TRACING_SOURCE}): clean {f.clean:.1f} %, corrupted "
                     f"{f.corrupted:.1f} %, total effect {f.total_effect:.1f} % (ROME GPT-2 XL {rt['clean']} / "
                     f"{rt['corrupted']} / {rt['total_effect']}); at the last subject token the MLP peaks at "
                     f"{_fmt_peak(mlp, L)}, attention at {_fmt_peak(attn, L)} (ROME: {rt['mlp_at_peak']} vs "
                     f"{rt['attn_at_peak']}); ROME's early-MLP site (MLP interval above attention's, in the first "
                     f"half of the layers) — " + verdict_line(v))
    for name in ("dna", "sva"):
        if name in peaks:
            a, pk = by.loc[name], peaks[name]
            lo_l, hi_l, of = paper.PAPER_AGREEMENT_MLP_PEAK
            texts.append(f"- {name.upper()} ({int(a.n_traced)} traced; effects on P(good form), top-1 or not; "
                         f"{int(a.dropped_coinciding_lst)} items dropped from the last-subject-token class as it "
                         f"coincides with the last token): MLP at the corrupted word's last token {_fmt_peak(pk[('mlp', 'lst')], L)}, "
                         f"attention {_fmt_peak(pk[('attn', 'lst')], L)}; at the last token MLP "
                         f"{_fmt_peak(pk[('mlp', 'last')], L)}"
                         + (f"; where the corrupted word is the last token ({int(a.n_both)} items) MLP "
                            f"{_fmt_peak(pk[('mlp', 'both')], L)}, attention {_fmt_peak(pk[('attn', 'both')], L)}"
                            if a.get("n_both", 0) > 0 else "")
                         + f". The paper ({paper.AGREEMENT_SOURCE}) finds the "
                         f"MLP/attention split vanishes for agreement (GPT-2 XL MLP peaks at layers {lo_l}-{hi_l} of {of}).")
    return "\n".join(texts)


def headline(sec):
    tr, rows = sec.tables.get("summary"), []
    if tr is None or not len(tr):
        return rows
    rt = paper.ROME_TRACING
    for _, r in tr.iterrows():
        facts = r["items"] == "facts"
        ref_m, ref_a = (rt["mlp_at_peak"], rt["attn_at_peak"]) if facts else (float("nan"), float("nan"))
        setting = "ROME, GPT-2 XL" if facts else ""
        # a class every item of the set drops (it coincides with another) has no peak: no row
        classes = [("lst", "last subject token")] + ([] if facts else [("last", "last token"), ("both", CLASSES["both"])])
        for short, cls in classes:
            if not r.get(f"n_{short}", 0) > 0:
                continue
            for kind, label, ref in (("mlp", "MLP", ref_m), ("attn", "attention", ref_a)):
                rows.append((f"AIE {r['items']}: {label} peak at {cls} (%, layer {int(r[f'layer_{kind}_{short}'])})",
                             r[f"peak_{kind}_{short}"], r[f"peak_{kind}_{short}_lo"], r[f"peak_{kind}_{short}_hi"],
                             r[f"n_{short}"], ref if short == "lst" else float("nan"), setting))
    return rows
