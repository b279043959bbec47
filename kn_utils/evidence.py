"""Evidence over KN searches: failed searches counted (not averaged), syntax vs facts (§3 claim).

    from kn_utils.evidence import search_summary, syntax_vs_facts
    s = search_summary(table9_facts)                  # found / failed, means over found searches only
    cmp = syntax_vs_facts(table8, table9_facts, n_layers=lm.arch.n_layers)
    print(cmp.sentence)                               # generated from verdicts.alike, never by hand

A *search* is one :func:`~kn_utils.attribution.find_knowledge_neurons` run (one BLiMP bag, one
ParaRel fact).  Its table row needs ``tau`` and ``r2`` and either ``n_kn`` (neurons kept) or
``neurons`` (the kept neurons, a list of (layer, neuron) or its ``str``); ``kn_at_0.7`` (|KN| at
the starting tau, the paper's Table 8 column) is summarised when present.
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .stats import summarize, welch_difference
from .verdicts import Verdict, alike

# The measures compared, in report order: table column -> (short name for verdicts, label).
MEASURES = {"kn_at_0.7": ("kn", "|KN| at tau = 0.7"), "tau": ("tau", "final tau"), "r2": ("r2", "R²₁")}
# tau's range: a search that ends on a bound ran out of room before finding 2-5 neurons
TAU_BOUNDS = (0.0, 1.0)
# "top layers" (the paper: KNs are "mostly in the top layers", Dai §4, the paper's Fig 5b): the last
# third of the model's blocks
TOP_FRACTION = 1 / 3


def _neurons(value) -> list[tuple[int, int]]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return []
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):   # "L10.N2096 L9.N1094" labels (localisation tables)
            out = []
            for label in value.split():
                layer, unit = label.replace("L", "").replace("N", "").split(".")
                out.append((int(layer), int(unit)))
            return out
    return [(int(a), int(b)) for a, b in value]


def _kn_counts(table: pd.DataFrame) -> pd.Series:
    if "n_kn" in table:
        return table["n_kn"].astype(float)
    if "neurons" in table:
        return table["neurons"].map(lambda v: float(len(_neurons(v))))
    raise ValueError("a search table needs n_kn (neurons kept) or neurons; columns: "
                     f"{list(table.columns)}")


def split_searches(table: pd.DataFrame, tau_bounds: tuple[float, float] = TAU_BOUNDS):
    """(found, failed): rows whose search kept >= 1 neuron with tau strictly inside ``tau_bounds``,
    and the rest, with a ``failure`` column saying why ("0 neurons", "tau at its bound 1.00")."""
    if "tau" not in table:
        raise ValueError(f"a search table needs a tau column; columns: {list(table.columns)}")
    counts = _kn_counts(table)
    tau = table["tau"].astype(float)
    at_bound = (tau <= tau_bounds[0] + 1e-9) | (tau >= tau_bounds[1] - 1e-9)
    why = pd.Series("", index=table.index, dtype=object)
    why[at_bound] = tau[at_bound].map(lambda t: f"tau at its bound {t:.2f}")
    why[counts == 0] = "0 neurons"
    failed = why != ""
    return table[~failed].copy(), table[failed].assign(failure=why[failed])


def search_summary(table: pd.DataFrame, tau_bounds: tuple[float, float] = TAU_BOUNDS) -> dict:
    """Counts of found and failed searches, and each measure over the *found* ones only:
    dict n, n_found, n_failed, failures (failure reason -> count), n_kn / kn_at_0.7 / tau / r2
    (:func:`~kn_utils.stats.summarize` dicts; measures missing from the table are left out)."""
    found, failed = split_searches(table, tau_bounds)
    out = {"n": len(table), "n_found": len(found), "n_failed": len(failed),
           "failures": failed["failure"].value_counts().to_dict() if len(failed) else {},
           "n_kn": summarize(_kn_counts(found)) if len(found) else summarize([])}
    for col in MEASURES:
        if col in table:
            out[col] = summarize(found[col].astype(float))
    return out


def top_layer_share(neurons, n_layers: int, fraction: float = TOP_FRACTION) -> float:
    """Share of ``neurons`` [(layer, unit)] in the last ``fraction`` of the ``n_layers`` blocks (NaN
    for none)."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive integer, got {n_layers!r}")
    ns = _neurons(neurons)
    if not ns:
        return float("nan")
    first_top = n_layers - math.ceil(n_layers * fraction)
    return sum(layer >= first_top for layer, _ in ns) / len(ns)


@dataclass
class SyntaxVsFacts:
    """Table 8 (syntax) against Table 9 (facts) on one model: ``table`` (one row per measure: means,
    intervals, the Welch difference and its verdict), ``counts`` (found / failed per side),
    ``verdicts`` (measure -> Verdict), ``overall`` (Verdict on the paper's §3 claim) and ``sentence``."""

    table: pd.DataFrame
    counts: dict
    verdicts: dict = field(default_factory=dict)
    overall: Verdict | None = None
    sentence: str = ""


def syntax_vs_facts(syntax: pd.DataFrame, facts: pd.DataFrame, n_layers: int | None = None,
                    tau_bounds: tuple[float, float] = TAU_BOUNDS) -> SyntaxVsFacts:
    """Compare the KN searches of BLiMP bags (``syntax``, Table 8) and ParaRel facts (``facts``,
    Table 9) run on the same model: per measure (|KN| at tau = 0.7, final tau, R²₁ and, with
    ``neurons`` and ``n_layers``, the share of KNs in the top third of layers) the mean and t interval
    of each side over its *found* searches, the difference syntax - facts with its Welch interval,
    and :func:`kn_utils.verdicts.alike`'s verdict.  The paper's §3 claim ("syntactic and factual
    neurons localise alike") is "supported" when every measure is alike, "contradicted" when any
    differs, else undecided."""
    found_s, failed_s = split_searches(syntax, tau_bounds)
    found_f, failed_f = split_searches(facts, tau_bounds)
    columns = {col: MEASURES[col] for col in MEASURES if col in syntax and col in facts}
    values = {col: (found_s[col].astype(float), found_f[col].astype(float)) for col in columns}
    if n_layers is not None and "neurons" in syntax and "neurons" in facts:
        columns["top_third"] = ("top_third", "share of KNs in the top third of layers")
        values["top_third"] = (found_s["neurons"].map(lambda v: top_layer_share(v, n_layers)),
                               found_f["neurons"].map(lambda v: top_layer_share(v, n_layers)))
    rows, verdicts = [], {}
    for col, (short, label) in columns.items():
        a, b = values[col]
        sa, sb, d = summarize(a), summarize(b), welch_difference(a, b)
        v = alike(d, short)
        verdicts[short] = v
        rows.append({"measure": label, "syntax": sa["mean"], "syntax_lo": sa["lo"], "syntax_hi": sa["hi"],
                     "syntax_n": sa["n"], "facts": sb["mean"], "facts_lo": sb["lo"], "facts_hi": sb["hi"],
                     "facts_n": sb["n"], "diff": d["diff"], "diff_lo": d["lo"], "diff_hi": d["hi"],
                     "method": "t over searches; difference: Welch t", "verdict": v.verdict,
                     "reason": v.reason})
    counts = {"syntax_found": len(found_s), "syntax_failed": len(failed_s), "facts_found": len(found_f),
              "facts_failed": len(failed_f)}
    kinds = [v.verdict for v in verdicts.values()]
    if "differ" in kinds:
        differ = [k for k, v in verdicts.items() if v.verdict == "differ"]
        overall = Verdict("contradicted", f"syntax and facts differ on {', '.join(differ)}")
    elif all(k == "alike" for k in kinds):
        overall = Verdict("supported", "every measure's difference lies within its margin")
    else:
        open_ = [k for k, v in verdicts.items() if v.verdict != "alike"]
        overall = Verdict(f"undecided at n = {len(found_s)} / {len(found_f)}",
                          f"no difference shown, but the intervals of {', '.join(open_)} are too wide "
                          f"to call them alike")
    table = pd.DataFrame(rows)
    parts = [f"{r.measure} {r.syntax:.2f} vs {r.facts:.2f} (difference {r.diff:+.2f} "
             f"[{r.diff_lo:+.2f}, {r.diff_hi:+.2f}]: {r.verdict})" for r in table.itertuples()]
    sentence = (f"Syntax (Table 8, {len(found_s)} bags found, {len(failed_s)} failed) against facts "
                f"(Table 9, {len(found_f)} facts found, {len(failed_f)} failed): " + "; ".join(parts)
                + f". The paper's §3 claim that syntactic and factual neurons localise alike is "
                  f"{overall.verdict} here ({overall.reason}; Welch t intervals over found searches).")
    return SyntaxVsFacts(table, counts, verdicts, overall, sentence)


# the class of the items where the last subject token is the last token (see class_effects)
COINCIDING = "last subject token = last token"


def class_effects(traces, token_class: str, drop_coinciding: bool = True):
    """Per-item indirect effects of one token class, for :func:`kn_utils.stats.aie_peak`.

    ``traces``: :class:`~kn_utils.tracing.TraceResult` list (``average_indirect_effect(...,
    return_traces=True)``).  Each item counts once: a class with several tokens (middle subject
    tokens, further tokens) is averaged within the item.  Items where the class is empty are left
    out; with ``drop_coinciding`` so are items where the last subject token is the last token (an
    agreement prompt ending at its corrupted word) when ``token_class`` is one of those two, since
    the peaks compare them and there they cannot be told apart.  Other shared tokens are ROME's
    grouping and stay (a one-token subject is both its first and last subject token; a prompt with
    one token after the subject ends at the first subsequent token).  ``token_class=COINCIDING``
    takes exactly the items dropped from those two, at that shared token.  Returns (effects
    [n_items, n_layers], total_effects [n_items], n_dropped_coinciding)."""
    from .tracing import TOKEN_CLASSES, token_classes

    if token_class not in (*TOKEN_CLASSES, COINCIDING):
        raise ValueError(f"unknown token class {token_class!r}; classes: {(*TOKEN_CLASSES, COINCIDING)}")
    rows, totals, dropped = [], [], 0
    for tr in traces:
        classes = token_classes(len(tr.tokens), tr.subject_range, tr.read_position)
        same = classes["last subject token"] == classes["last token"]
        if token_class == COINCIDING:
            if not same:
                continue
            idx = classes["last token"]
        else:
            idx = classes[token_class]
            if not idx:
                continue
            if drop_coinciding and same and token_class in ("last subject token", "last token"):
                dropped += 1
                continue
        rows.append(tr.indirect_effects[idx].double().mean(0).numpy())
        totals.append(tr.high_score - tr.low_score)
    n_layers = traces[0].scores.shape[1] if len(traces) else 0
    effects = np.stack(rows) if rows else np.zeros((0, n_layers))
    return effects, np.asarray(totals, dtype=float), dropped


__all__ = ["class_effects", "COINCIDING", "split_searches", "search_summary", "top_layer_share", "syntax_vs_facts", "SyntaxVsFacts",
           "MEASURES", "TAU_BOUNDS", "TOP_FRACTION"]
