"""What the experiment units share: the sizes per scale, the run context (model, sizes, the KN
searches already run), the report section, table formatting and figures written atomically."""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

# Sizes per scale.  None = everything the data set holds.
SCALES = {
    "smoke": dict(rome_n=2, kn_n=2, counterfact_n=2, facts_per_relation=1, max_relations=2,
                  blimp_n=10, bag_prompts=4, fig6b_pairs=10, aie_n=2, trace_samples=2, ig_steps=3,
                  rome_steps=2, agreement_pool=20, rome_configs=1),
    "report": dict(rome_n=100, kn_n=20, counterfact_n=50, facts_per_relation=3, max_relations=None,
                   blimp_n=200, bag_prompts=20, fig6b_pairs=200, aie_n=50, trace_samples=10, ig_steps=20,
                   rome_steps=None, agreement_pool=100, rome_configs=2),
    "paper": dict(rome_n=None, kn_n=None, counterfact_n=2000, facts_per_relation=None,
                  max_relations=None, blimp_n=1000, bag_prompts=1000, fig6b_pairs=1000, aie_n=1000,
                  trace_samples=10, ig_steps=20, rome_steps=None, agreement_pool=1000, rome_configs=2),
}
# rome_configs: 1 runs ROME in the paper's configuration only (covariance off, the paper-config
# preset's layer); 2 also in ROME's own (covariance on, "rome-cov" items), so a report shows what
# the configuration does (issue 17 §6).
# Sizes that take "none" (= all the data holds); every other size is a positive integer.
NONE_OK = ("rome_n", "kn_n", "counterfact_n", "facts_per_relation", "max_relations", "rome_steps")


class SectionSkipped(Exception):
    """A unit that cannot run here for a stated reason (e.g. no CounterFact file without a data
    folder): reported as skipped with the reason, not as a failure."""


@dataclass
class Section:
    """One unit's part of the report, built from its records by the unit's ``summarise``."""
    key: str
    title: str
    text: str = ""
    tables: dict = field(default_factory=dict)      # name -> DataFrame (written as <key>_<name>.csv)
    figures: list = field(default_factory=list)     # PNG file names beside REPORT.md
    sizes: dict = field(default_factory=dict)
    source: str = ""
    seconds: float = float("nan")                   # sum of the records' compute seconds
    error: str | None = None
    skipped: str | None = None
    status: dict = field(default_factory=dict)      # n_done, n_planned, n_minimum, below_minimum
    csv_only: tuple = ()                            # tables written as CSV but not shown in REPORT.md


class Context:
    """What the units share in one process: the model, sizes, data folder and KN searches run."""

    def __init__(self, lm, scale, sizes, data_dir=None, progress=False, searches=None):
        self.lm, self.scale, self.data_dir, self.progress = lm, scale, data_dir, progress
        self.sizes = dict(sizes)
        self.searches = searches        # a kn_utils.store.SearchStore, or None (this process only)
        self._kn = {}
        self.reused = 0

    def rome_hparams(self, config: str = "paper"):
        """ROME's preset for the model in ``config`` ("paper": covariance off; "rome": ROME's own,
        covariance on); at smoke sizes a few Adam steps and no statistics pass either way."""
        import warnings

        from ..editing.rome import ROMEHyperParams

        with warnings.catch_warnings():   # the CPU statistics-size warning: said in the report
            warnings.simplefilter("ignore")
            hp = ROMEHyperParams.for_model(self.lm, config)
        if self.sizes["rome_steps"] is not None:   # smoke: a few Adam steps, no statistics pass
            hp = dataclasses.replace(hp, v_num_grad_steps=self.sizes["rome_steps"], mom2_adjustment=False,
                                     context_template_length_params=[[2, 1]])
        return hp

    def kn_hparams(self):
        return {"find": {"steps": self.sizes["ig_steps"], "progress": False}}

    def knowledge_neurons(self, key, prompts, targets):
        """find_knowledge_neurons once per bag, shared by the units that read the same bag: in this
        process, and through ``self.searches`` (a :class:`kn_utils.store.SearchStore`, when the
        runner gives one) with every other process and run writing into the same report folder."""
        import time

        from ..attribution import find_knowledge_neurons

        if key in self._kn:
            self.reused += 1
            return self._kn[key]
        find = self.kn_hparams()["find"]
        digest = None
        if self.searches is not None:
            digest = self.searches.key(list(prompts), targets, {k: v for k, v in find.items() if k != "progress"})
            found = self.searches.get(digest)
            if found is not None:
                self.reused += 1
                self._kn[key] = found
                return found
        start = time.perf_counter()
        res = find_knowledge_neurons(self.lm, list(prompts), targets, **find)
        if digest is not None:
            self.searches.put(digest, res, time.perf_counter() - start, what=" ".join(map(str, key)))
        self._kn[key] = res
        return res


def batch_size(unit, ctx) -> int:
    """How many items the runner hands ``unit`` at a time: its ``BATCH`` (an int or a function of
    ``ctx``) when it has ``compute_batch``, else 1."""
    if not hasattr(unit, "compute_batch"):
        return 1
    size = getattr(unit, "BATCH", 1)
    return max(1, int(size(ctx) if callable(size) else size))


# ----------------------------------------------------------------------------------------------
# records -> item tables
# ----------------------------------------------------------------------------------------------
def item_frame(records, columns=None) -> pd.DataFrame:
    """One row per record: its result fields, then ``worker`` and ``seconds``."""
    rows = []
    for r in records:
        w = r.get("worker", {})
        rows.append({**r["result"], "worker": f"{w.get('host', '?')}/r{w.get('rank', 0)}/p{w.get('pid', 0)}",
                     "seconds": r.get("seconds", float("nan"))})
    df = pd.DataFrame(rows, columns=columns)
    return df


def fact_searches(records, sec):
    """The KN searches of a unit's fact records: (all, found, failed, evidence.search_summary), failed
    searches (no neuron, or tau at its bound) kept apart; None, with a note in ``sec.text``, when no
    fact is done yet."""
    from ..evidence import search_summary, split_searches

    facts = item_frame(records)
    if facts.empty:
        sec.text = "No fact done yet."
        return None
    found, failed = split_searches(facts)
    return facts, found, failed, search_summary(facts)


def ok(records):
    """Records of items that produced a result (not the ones an item skipped with a reason)."""
    return [r for r in records if not r["result"].get("_skipped")]


# ----------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------
def pct(summary: dict) -> dict:
    """A stats.summarize result of fractions as % columns (mean, lo, hi)."""
    return {"ours": 100 * summary["mean"], "ci_lo": 100 * summary["lo"], "ci_hi": 100 * summary["hi"],
            "n": summary["n"], "ci": summary["method"]}


def fmt(x, digits=2) -> str:
    if x is None:
        return ""
    if isinstance(x, (float, np.floating)):
        return "" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def markdown_table(df: pd.DataFrame, digits: int = 2) -> str:
    if df is None or df.empty:
        return "(empty)"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v, digits).replace("|", "/") for v in row) + " |")
    return "\n".join(lines)


def ci(s) -> str:
    return f"{s['mean']:.3g} [{s['lo']:.3g}, {s['hi']:.3g}]"


def sure(n: int, lo: float, hi: float) -> str:
    width = hi - lo
    if n < 10 or not math.isfinite(width):
        return f"n = {n} is too small to say"
    return f"n = {n}, 95 % interval width {width:.2g}"


NAN_SUMMARY = {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0, "method": ""}


# ----------------------------------------------------------------------------------------------
# files: everything beside REPORT.md is written to a temporary file and renamed over the old one
# ----------------------------------------------------------------------------------------------
def atomic_write_text(path, text: str):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_csv(df: pd.DataFrame, path):
    atomic_write_text(path, df.to_csv(index=False))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_png(out, name, draw) -> str:
    """``draw(folder)`` saves ``<folder>/<name>.png`` (a kn_utils.plotting ``save=``); the PNG is
    then moved beside REPORT.md in one rename and the PDF dropped (reports stay small)."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".fig-"))
    try:
        draw(tmp)
        os.chmod(tmp / f"{name}.png", 0o666 & ~_umask())
        os.replace(tmp / f"{name}.png", out / f"{name}.png")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"{name}.png"


def figure(out, fig_fn, name, *args, **kwargs) -> str:
    """Draw with a kn_utils.plotting function into ``out``; keep the PNG only."""
    return save_png(out, name, lambda folder: fig_fn(*args, save=name, folder=folder, **kwargs))


def bar_figure(out, name, table, label_col, title, paper_col="paper_gpt2xl", percent=True) -> str:
    """Ours (with the interval) beside the paper's value, one pair of bars per row."""
    from matplotlib.figure import Figure

    from ..plotting import save_figure

    fig = Figure(figsize=(max(4.0, 0.7 * len(table) + 2), 3.4))
    ax = fig.add_subplot()
    x = np.arange(len(table))
    ours = table["ours"].astype(float).to_numpy()
    err = None
    if {"ci_lo", "ci_hi"} <= set(table.columns):
        lo, hi = table["ci_lo"].astype(float).to_numpy(), table["ci_hi"].astype(float).to_numpy()
        err = np.nan_to_num(np.vstack([ours - lo, hi - ours]).clip(min=0))
    ax.bar(x - 0.2, ours, 0.4, yerr=err, label="ours (95 % CI)", color="tab:blue", capsize=2)
    if paper_col and paper_col in table:
        ax.bar(x + 0.2, table[paper_col].astype(float).to_numpy(), 0.4, label="paper", color="tab:gray")
    ax.set_xticks(x, [str(v) for v in table[label_col]], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("%" if percent else "")
    ax.set_title(title, fontsize=9)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(out, name, lambda folder: save_figure(fig, name, folder))


# ----------------------------------------------------------------------------------------------
# data shared by several units
# ----------------------------------------------------------------------------------------------
def prompts_of(lm, bag):
    from ..data.pararel import causal_prompts

    return list(bag.prompts) if lm.arch.is_masked_lm else causal_prompts(bag)


def relations(ctx):
    from ..data.pararel import relations as all_relations

    rels = all_relations(ctx.data_dir)
    m = ctx.sizes["max_relations"]
    return rels[:m] if m else rels


def fact_items(ctx, min_prompts=1):
    """ParaRel facts (bags) per relation: the first facts_per_relation of each that have at least
    ``min_prompts`` usable prompts (later facts stand in for those that have fewer, so that every
    relation with enough such facts reaches the size): items {"id": "P36/0002", relation, fact,
    bag, prompts}, the id's number being the fact's index in the relation's bags; the data source;
    the relations with no such fact."""
    from ..data import source_of
    from ..data.pararel import load_bags

    out, sources, lacking, want = [], [], [], ctx.sizes["facts_per_relation"]
    for rel in relations(ctx):
        bags = load_bags(rel, data_dir=ctx.data_dir, n=None)
        sources.append(source_of(bags))
        taken = 0
        for i, bag in enumerate(bags):
            if want is not None and taken >= want:
                break
            prompts = prompts_of(ctx.lm, bag)
            if len(prompts) >= min_prompts:
                out.append({"id": f"{rel}/{i:04d}", "relation": rel, "fact": i, "bag": bag, "prompts": prompts})
                taken += 1
        if not taken:
            lacking.append(rel)
    return out, merge_sources(sources, "relations"), lacking


def merge_sources(labels, parts: str = "parts") -> str:
    """One entry per data file of ``"<path> (N items)"`` labels (one per relation, say): ``"<path>
    (N items over K <parts>)"`` with N summed, so a report names a file once."""
    import re

    files: dict[str, list[int]] = {}
    for label in labels:
        if not label:
            continue
        m = re.fullmatch(r"(.*) \((\d+) items\)", label)
        path, n = (m.group(1), int(m.group(2))) if m else (label, None)
        files.setdefault(path, []).append(n)
    out = []
    for path, counts in sorted(files.items()):
        if len(counts) == 1 or any(c is None for c in counts):
            out.append(path if counts[0] is None else f"{path} ({counts[0]} items)")
        else:
            out.append(f"{path} ({sum(counts)} items over {len(counts)} {parts})")
    return "; ".join(out)


def paradigm_pairs(ctx, uid, n):
    """(minimal pairs of ``uid``, None) or (None, why the model type cannot read the paradigm)."""
    from ..data.blimp import minimal_pairs

    try:
        return minimal_pairs(ctx.lm, uid, data_dir=ctx.data_dir, n=n), None
    except ValueError as exc:
        return None, str(exc).split(":")[0]


def blimp_bag_items(ctx, uids):
    """The DNA paradigms' KN bags (the group's single-token prompts): items {"id": "<uid>/<group>",
    paradigm, group, pairs, bag}, the skipped paradigms with why, and the data source."""
    out, skipped, sources = [], [], set()
    for uid in uids:
        pairs, why = paradigm_pairs(ctx, uid, ctx.sizes["fig6b_pairs"])
        if pairs is None:
            skipped.append((uid, why[:120]))
            continue
        sources.add(pairs.attrs.get("data_source") or "")
        for group in ("singular", "plural"):
            bag = pairs[(pairs.group == group) & (pairs.n_good_tokens == 1)].head(ctx.sizes["bag_prompts"])
            if len(bag) >= 2:
                out.append({"id": f"{uid}/{group}", "paradigm": uid, "group": group, "pairs": pairs, "bag": bag})
    return out, skipped, "; ".join(sorted(s for s in sources if s))


# ----------------------------------------------------------------------------------------------
# evidence: paired before -> after rows and verdict lines (kn_utils.stats / kn_utils.verdicts)
# ----------------------------------------------------------------------------------------------
def paired_row(before, after, scale: float = 100.0) -> dict:
    """stats.paired_difference of per-item values as report columns (in % for fractions): before,
    after (each with its interval), diff = after - before with its paired interval, n, method, p,
    and the 1 -> 0 / 0 -> 1 flips where the values are 0/1.  The Paired itself is under "_paired"."""
    from ..stats import paired_difference

    p = paired_difference(pd.Series(before, dtype=float).to_numpy(), pd.Series(after, dtype=float).to_numpy())
    row = {"before": scale * p.before, "before_lo": scale * p.before_lo, "before_hi": scale * p.before_hi,
           "after": scale * p.after, "after_lo": scale * p.after_lo, "after_hi": scale * p.after_hi,
           "diff": scale * p.diff, "diff_lo": scale * p.lo, "diff_hi": scale * p.hi, "n": p.n,
           "method": p.method, "p": p.p}
    if p.good_to_bad is not None:
        row.update(good_to_bad=p.good_to_bad, bad_to_good=p.bad_to_good)
    row["_paired"] = p
    return row


def after_interval(row) -> dict:
    """The after value of a :func:`paired_row` as an interval for kn_utils.verdicts (fractions)."""
    return {"mean": row["after"] / 100, "lo": row["after_lo"] / 100, "hi": row["after_hi"] / 100, "n": row["n"]}


def verdict_line(v, what: str = "") -> str:
    """"verdict: <verdict> — <reason>" (the report's form, next to each result)."""
    return f"{what + ' ' if what else ''}verdict: {v.verdict} — {v.reason}"


def strip_private(rows) -> pd.DataFrame:
    return pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
