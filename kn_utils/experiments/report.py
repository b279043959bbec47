"""REPORT.md, the CSVs, figures, ``headline.csv`` and ``report.json`` of a report folder, rendered
from the records of every unit that has them (no model needed).  Every file is written to a
temporary file and renamed over the old one."""
from __future__ import annotations

import datetime as _dt
import json
import traceback
from pathlib import Path

import pandas as pd

from .. import paper
from ..resources import relative_paths
from ..store import Store, git_commit
from . import UNITS
from .common import Section, atomic_csv, atomic_write_text, markdown_table

# the order of headline.csv's rows (as before the units)
HEADLINE_ORDER = ("table1", "counterfact", "dai", "blimp", "fig6b", "table8", "table9", "syntax", "tracing")
HEADLINE_COLUMNS = ["result", "ours", "ci_lo", "ci_hi", "n", "paper", "paper_setting"]
META_FILE = "report.json"


def headline(sections) -> pd.DataFrame:
    """One row per headline result: ours with its 95 % interval and n beside the paper's number and
    the setting the paper's number comes from."""
    by_key = {s.key: s for s in sections if not s.error and not s.skipped}
    rows = []
    for key in HEADLINE_ORDER:
        if key in by_key:
            rows += [dict(zip(HEADLINE_COLUMNS, r)) for r in UNITS[key].headline(by_key[key])]
    return pd.DataFrame(rows, columns=HEADLINE_COLUMNS)


def _status(unit, plan, n_done) -> dict:
    n_planned, n_min = len(plan.get("items", [])), int(plan.get("n_minimum") or 0)
    sizes = plan.get("sizes", {})
    small = [f"{k} = {sizes.get(k)} < {v}" for k, v in getattr(unit, "MINIMUM", {}).items()
             if sizes.get(k) is not None and sizes.get(k) < v]
    below = bool(small) or n_done < n_min
    return {"n_done": n_done, "n_planned": n_planned, "n_minimum": n_min, "complete": n_done >= n_planned,
            "below_minimum": below, "why_below": small + ([f"{n_done} items < {n_min}"] if n_done < n_min else [])}


def build_sections(out) -> tuple[list[Section], list[dict], dict]:
    """Each unit with a plan in ``out``: its Section from its records; also every record used and
    the plans (by unit)."""
    store, sections, used, plans = Store(out), [], [], {}
    for key in UNITS:
        plan = store.plan(key)
        derived = getattr(UNITS[key], "DERIVED", ())
        if plan is None and derived and all(store.plan(d) is not None for d in derived):
            plan = UNITS[key].derived_plan({d: store.plan(d) for d in derived})
        if plan is None:
            continue
        plans[key] = plan
        unit, sec = UNITS[key], Section(key, UNITS[key].TITLE)
        sec.source = plan.get("source", "")
        if plan.get("skipped"):
            sec.skipped = plan["skipped"]
        recs = store.records(key, plan.get("key"))
        ordered = [recs[i] for i in plan.get("items", []) if i in recs]
        used += ordered
        sec.seconds = float(sum(r.get("seconds", 0.0) for r in ordered))
        sec.status = _status(unit, plan, len(ordered))
        if plan.get("error"):
            sec.error = plan["error"]
        elif not sec.skipped:
            try:
                unit.summarise(ordered, plan, sec, Path(out))
            except Exception as exc:  # noqa: BLE001 — a summary that fails is reported, others go on
                tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
                sec.error = f"(rendering) {type(exc).__name__}: {exc}\n" + "".join(tb[-3:])
        sections.append(sec)
    return sections, used, plans


def render_folder(out, model_name=None) -> tuple[Path, list[Section], dict]:
    """Rewrite REPORT.md, CSVs, figures, headline.csv and report.json of ``out`` from its records."""
    out = Path(out)
    sections, used, plans = build_sections(out)
    if not plans:
        raise FileNotFoundError(f"{out} holds no records (no records/<unit>/plan.json): run reproduce "
                                f"first; --render-only renders only what a run stored")
    for sec in sections:
        for name, df in sec.tables.items():
            atomic_csv(df, out / f"{sec.key}_{name}.csv")
    head = headline(sections)
    atomic_csv(head, out / "headline.csv")
    last = max(plans.values(), key=lambda p: p.get("created", ""))
    meta = {
        "model": model_name or last.get("model_name", out.name), "fingerprint": last.get("model"),
        "scale": last.get("scale"), "sizes": last.get("sizes"), "overridden": last.get("overridden", False),
        "units": [s.key for s in sections], "all_units": len(sections) == len(UNITS),
        "incomplete": any(not s.status.get("complete", True) for s in sections if not s.error and not s.skipped),
        "below_minimum": any(s.status.get("below_minimum") for s in sections if not s.skipped),
        "failed": [s.key for s in sections if s.error],
        "compute_seconds": round(sum(r.get("seconds", 0.0) for r in used), 1),
        "commits": sorted({r.get("commit", "unknown") for r in used}),
        "workers": len({json.dumps(r.get("worker"), sort_keys=True) for r in used}),
        "sections": {s.key: {**s.status, "seconds": round(s.seconds, 1)} for s in sections},
        "rendered": _dt.datetime.now().isoformat(timespec="seconds"),
        # the code that summarised the records: its kn_utils/ is what the report's numbers went through
        "rendered_by": git_commit(),
    }
    # the data folder relative to the report folder (../../../shared/data): no path of this machine
    text = relative_paths(render(sections, meta, last), out, under=last.get("data_folder")) \
        if last.get("data_folder") else render(sections, meta, last)
    path = out / "REPORT.md"
    atomic_write_text(path, text)
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=1) + "\n")
    return path, sections, meta


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def _status_word(s) -> str:
    if s.error:
        return "FAILED"
    if s.skipped:
        return "skipped"
    word = "ok" if s.status.get("complete") else "incomplete"
    return word + (", below the report minimum" if s.status.get("below_minimum") else "")


def render(sections, meta, plan) -> str:
    arch = plan.get("arch", {})
    sizes = meta.get("sizes") or {}
    lines = [f"# Reproduction report: {meta['model']}", ""]
    if meta["incomplete"]:
        lines += ["**Incomplete**: some sections have items still to compute (see n done / n planned); "
                  "run `reproduce` again into this folder to continue.", ""]
    lines += [f"- scale: `{meta['scale']}` (sizes: `{sizes}`{', some overridden' if meta['overridden'] else ''})",
              f"- model: {meta['model']} ({arch.get('n_layers')} layers x {arch.get('n_neurons')} MLP neurons"
              f"{', masked LM' if arch.get('masked') else ''}; fingerprint `{meta['fingerprint']}`)",
              f"- commit(s) the records came from: {', '.join(f'`{c}`' for c in meta['commits']) or 'none'}",
              f"- rendered: {meta['rendered']} by commit `{meta.get('rendered_by', 'unknown')}` (its `kn_utils/` "
              f"summarised the records)",
              f"- data folder: {plan.get('data_folder') or 'none (built-in sets)'}",
              f"- total compute time: {meta['compute_seconds']:.1f} s (sum of the records' seconds, "
              f"{meta['workers']} worker process(es))",
              f"- report minimum: {'NOT met by every section' if meta['below_minimum'] else 'met'}"
              f" (issue 21's sizes; a section below it says so)",
              "- intervals: 95 %, over items: Wilson for proportions, Student t for means, paired before -> "
              "after as McNemar mid-p with Newcombe's interval (0/1 values) or paired t (kn_utils.stats)",
              "- verdicts: computed by the rules of kn_utils.verdicts from those intervals, printed as "
              "\"verdict: <verdict> — <reason>\" beside each result (docs/reproduction.md lists the rules)",
              "- paper numbers: kn_utils/paper.py (each with its table / figure)", "",
              "| section | items done / planned | report minimum | compute time (s) | status |",
              "|---|---|---|---|---|"]
    lines += [f"| [{_cell(s.title)}](#{s.key}) | {s.status.get('n_done', 0)} / {s.status.get('n_planned', 0)} | "
              f"{s.status.get('n_minimum', 0)} | {s.seconds:.1f} | {_status_word(s)} |" for s in sections]
    lines += ["", "Compute time is the sum of the section's records' seconds. A neuron search (integrated "
              "gradients) is stored once and read by every section that needs it, and counts in the section "
              "that ran it: a section whose searches were all stored already (Table 9 reads Dai's, Table 8 "
              "Fig 6b's, when those ran first) shows about 0 s."]
    lines += ["", "## Headline ([headline.csv](headline.csv))", "",
              "Ours with its 95 % interval and n; the paper's number is from another model and setting "
              "(last column), so it is context, not a target.", "", markdown_table(headline(sections))]
    for s in sections:
        st = s.status
        lines += ["", f'<a id="{s.key}"></a>', f"## {s.title}", "",
                  f"Items {st.get('n_done', 0)} done / {st.get('n_planned', 0)} planned / report minimum "
                  f"{st.get('n_minimum', 0)}"
                  + (f" (**below the report minimum**: {'; '.join(st.get('why_below', []))})" if st.get("below_minimum") else "")
                  + (" (**incomplete**)" if not st.get("complete", True) else "")
                  + f"; compute time {s.seconds:.1f} s. Source of the paper's numbers: "
                  f"{paper.SOURCES.get(s.key, 'none (the paper gives no number here)')}."]
        if s.error:
            lines += ["", "**FAILED** — this section raised; its numbers are missing:", "", "```",
                      s.error.rstrip(), "```"]
            continue
        if s.skipped:
            lines += ["", f"**Skipped**: {s.skipped}"]
            continue
        lines += ["", f"Sizes: `{s.sizes}`", "", f"Data: {s.source or 'n/a'}", "", s.text, ""]
        for name, df in s.tables.items():
            if name in ("items", "facts") or name.startswith("aie_") or name in s.csv_only:
                what = "wide table (CSV only)" if name in s.csv_only else "per-item table"
                lines.append(f"- {what}: [{s.key}_{name}.csv]({s.key}_{name}.csv) ({len(df)} rows)")
                continue
            lines += [f"**{name}** ([{s.key}_{name}.csv]({s.key}_{name}.csv))", "",
                      markdown_table(df.drop(columns=[c for c in ("neurons", "worker", "seconds") if c in df])), ""]
        for fig in s.figures:
            lines += ["", f"![{s.key}]({fig})"]
    return "\n".join(lines) + "\n"


README_START, README_END = "<!-- reproduction-headline:start -->", "<!-- reproduction-headline:end -->"


def headline_folders(reports) -> list[str]:
    """The report folders whose headline may go into the README: a report rendered from the store
    (report.json) at the report or paper scale with every unit; a report of the old renderer unless
    its REPORT.md says smoke.  A smoke-scale or subset report is never a model's headline."""
    import sys

    keep = []
    for csv in sorted(Path(reports).glob("*/headline.csv")):
        folder = csv.parent
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            text = (folder / "REPORT.md").read_text(encoding="utf-8") if (folder / "REPORT.md").is_file() else ""
            meta = {"scale": "smoke" if "- scale: `smoke`" in text else "report", "all_units": True}
        except (OSError, ValueError):
            meta = {}
        if meta.get("scale") in ("report", "paper") and meta.get("all_units"):
            keep.append(folder.name)
        else:
            print(f"update_readme: {folder.name}: a {meta.get('scale', 'unreadable')}-scale"
                  f"{'' if meta.get('all_units') else ' or subset'} report is not the model's headline: "
                  f"left out", file=sys.stderr)
    return keep


def update_readme(readme=None, reports=None) -> str:
    """Write the headline of every ``reports/<model>/`` (:func:`kn_utils.headline.readme_block`,
    from its headline.csv and report.json) between the README's reproduction-headline markers.
    Smoke-scale and subset reports are left out; an incomplete one keeps its mark."""
    from ..headline import readme_block

    root = Path(__file__).resolve().parents[2]
    readme = Path(readme or root / "README.md")
    reports = Path(reports or root / "reports")
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} markers")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    body = readme_block(reports, headline_folders(reports))
    atomic_write_text(readme, head + README_START + "\n" + body + "\n" + README_END + tail)
    return body
