"""The README's headline: every model's ``reports/<model>/headline.csv`` in one short table.

One row per result, one column per model (ours, its 95 % interval and n; a paired result as
before → after with the difference's interval), and the paper's number with its setting; above it one line per model: its report, scale, commit and wall time. Short on
purpose: the README is a landing page, each report holds the full tables.  ``make readme-headline``
(:func:`kn_utils.reproduce.update_readme`) writes :func:`readme_block` between the README's markers.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

# "AIE facts: MLP peak at last subject token (%, layer 4)": the layer differs between models, so it
# goes into the cell and the row is the result without it
_LAYER = re.compile(r"^(?P<head>.*\(%), layer (?P<layer>\d+)\)$")


def _number(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _cell(row, layer) -> str:
    ours = _number(row.ours)
    if not ours:
        return "—"
    ci = f" [{_number(row.ci_lo)}, {_number(row.ci_hi)}]" if _number(row.ci_lo) else ""
    where = f", layer {layer}" if layer else ""
    return f"{ours}{ci} n={int(row.n)}{where}"


def _meta_line(folder: Path, meta: dict) -> str:
    """The line of a report rendered from the result store (its report.json)."""
    parts = [f"[REPORT.md](reports/{folder.name}/REPORT.md)",
             f"scale `{meta.get('scale')}`" + (", sizes overridden" if meta.get("overridden") else ""),
             "commit " + ", ".join(f"`{c}`" for c in dict.fromkeys(
                 c[:9] + ("-dirty" if c.endswith("-dirty") else "") for c in meta.get("commits", []))),
             f"rendered by `{str(meta.get('rendered_by', 'unknown'))[:9]}`",
             f"total compute time: {meta.get('compute_seconds', 0) / 3600:.2f} h"]
    if meta.get("incomplete"):
        parts.append("**incomplete**")
    if meta.get("below_minimum"):
        parts.append("**below the report minimum**")
    return f"- **{folder.name}**: " + "; ".join(parts)


def _report_line(folder: Path) -> str:
    if (folder / "report.json").is_file():
        import json

        return _meta_line(folder, json.loads((folder / "report.json").read_text(encoding="utf-8")))
    report = folder / "REPORT.md"
    text = report.read_text(encoding="utf-8") if report.is_file() else ""
    meta = {m.group(1): m.group(2) for m in re.finditer(r"^- (scale|commit|total wall time): (.*)$", text, re.M)}
    scale = re.match(r"`[^`]*`", meta.get("scale", "")) or None
    parts = [f"[REPORT.md](reports/{folder.name}/REPORT.md)"]
    if scale:
        parts.append(f"scale {scale.group(0)}" + (", sizes overridden" if "overridden" in meta["scale"] else ""))
    if "commit" in meta:
        parts.append(f"commit {meta['commit'][:9]}`" if meta["commit"].startswith("`") else meta["commit"])
    if "total wall time" in meta:
        parts.append(f"total wall time: {meta['total wall time'].split(' (')[0]}")
    if "**Incomplete**" in text:
        parts.append("**incomplete**")
    return f"- **{folder.name}**: " + "; ".join(parts)


# "<base>: before (<unit>)" and "<base>: after − before (points)" rows fold into the "<base> (<unit>)"
# row of the README: one cell "before → after (Δ diff [lo, hi]) n=..."
_PAIRED = re.compile(r"^(?P<base>.*): (?P<part>before|after − before) \((?P<unit>[^()]*)\)$")


def _split(result):
    m = _PAIRED.match(result)
    return (m["base"], m["part"]) if m else (None, None)


def _folded_cell(after, before, diff, layer) -> str:
    if after is None or not _number(after.ours):
        return "—"
    if before is None or diff is None or not _number(diff.ours):
        return _cell(after, layer)
    ci = f" [{_number(diff.ci_lo)}, {_number(diff.ci_hi)}]" if _number(diff.ci_lo) else ""
    return f"{_number(before.ours)} → {_number(after.ours)} (Δ {diff.ours:+.2f}{ci}) n={int(after.n)}"


def readme_block(reports, folders=None) -> str:
    """The markdown between the README's headline markers, from ``reports/*/headline.csv`` (only
    the report folders named in ``folders``, if given).  Paired results (a before and an
    after − before row beside the after row) become one "before → after (Δ ...)" cell."""
    csvs = sorted(Path(reports).glob("*/headline.csv"))
    if folders is not None:
        csvs = [c for c in csvs if c.parent.name in set(folders)]
    if not csvs:
        return "(no report generated yet: `make reproduce`)"
    models = [c.parent.name for c in csvs]
    cells: dict[str, dict[str, str]] = {}
    paper: dict[str, str] = {}
    for model, csv in zip(models, csvs):
        rows = list(pd.read_csv(csv).itertuples(index=False))
        parts = {}
        for row in rows:
            base, part = _split(row.result)
            if base:
                parts[(base, part)] = row
        for row in rows:
            if _split(row.result)[0]:
                continue
            m = _LAYER.match(row.result)
            key = f"{m['head']})" if m else row.result
            layer = m["layer"] if m else None
            base = row.result.rsplit(" (", 1)[0]
            before, diff = parts.get((base, "before")), parts.get((base, "after − before"))
            if before is not None or diff is not None:
                key = f"{base}: before → after (" + row.result.rsplit(" (", 1)[1]
                cells.setdefault(key, {})[model] = _folded_cell(row, before, diff, layer)
            else:
                cells.setdefault(key, {})[model] = _cell(row, layer)
            if _number(row.paper) and key not in paper:
                paper[key] = f"{_number(row.paper)} ({row.paper_setting})"
    lines = [_report_line(c.parent) for c in csvs] + [
        "", "| result | " + " | ".join(models) + " | paper |", "|---|" + "---|" * (len(models) + 1)]
    lines += [f"| {key} | " + " | ".join(row.get(m, "") for m in models) + f" | {paper.get(key, '')} |"
              for key, row in cells.items()]
    return "\n".join(lines)


__all__ = ["readme_block"]
