"""The README's headline: every model's ``reports/<model>/headline.csv`` in one short table.

One row per result, one column per model (ours, its 95 % interval and n), and the paper's number
with its setting; above it one line per model: its report, scale, commit and wall time. Short on
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
             "commit " + ", ".join(f"`{c[:9]}`" for c in meta.get("commits", [])),
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


def readme_block(reports, folders=None) -> str:
    """The markdown between the README's headline markers, from ``reports/*/headline.csv`` (only
    the report folders named in ``folders``, if given)."""
    csvs = sorted(Path(reports).glob("*/headline.csv"))
    if folders is not None:
        csvs = [c for c in csvs if c.parent.name in set(folders)]
    if not csvs:
        return "(no report generated yet: `make reproduce`)"
    models = [c.parent.name for c in csvs]
    cells: dict[str, dict[str, str]] = {}
    paper: dict[str, str] = {}
    for model, csv in zip(models, csvs):
        for row in pd.read_csv(csv).itertuples(index=False):
            m = _LAYER.match(row.result)
            key = f"{m['head']})" if m else row.result
            cells.setdefault(key, {})[model] = _cell(row, m["layer"] if m else None)
            if _number(row.paper) and key not in paper:
                paper[key] = f"{_number(row.paper)} ({row.paper_setting})"
    lines = [_report_line(c.parent) for c in csvs] + [
        "", "| result | " + " | ".join(models) + " | paper |", "|---|" + "---|" * (len(models) + 1)]
    lines += [f"| {key} | " + " | ".join(row.get(m, "") for m in models) + f" | {paper.get(key, '')} |"
              for key, row in cells.items()]
    return "\n".join(lines)


__all__ = ["readme_block"]
