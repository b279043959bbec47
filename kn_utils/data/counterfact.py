"""ROME's known facts (for causal tracing) and CounterFact (for edit evaluation).

Files come from ``data_root()/counterfact/`` (see ``shared/data/README.md``): ``known_1000.json`` and
``easyedit-split/counterfact-{train,val,edit}.json``.  Without them, :func:`load_known_facts` falls back
to a small list the project writes itself (``kn_utils/resources/builtin/known_facts.json``: landmarks, companies
and people whose completion the default model gets right).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from . import BUILTIN_DIR, data_root, require_text, source_label, warn_builtin
from ..settings import given

KNOWN_FILE = "known_1000.json"
BUILTIN_KNOWN = BUILTIN_DIR / "builtin" / "known_facts.json"
KNOWN_COLUMNS = ("known_id", "subject", "attribute", "template", "prediction", "prompt", "relation_id")
COUNTERFACT_SPLITS = ("train", "val", "edit")
# what an edit and its evaluation read from a record (EasyEdit's ground_truth is ROME's target_true)
COUNTERFACT_FIELDS = ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
                      "locality_ground_truth")


def _check_n(n):
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"n must be None or a positive integer, got {n!r}")


def _read_json(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        try:
            rows = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a JSON list of records (objects)")
    return rows


def check_records(rows, fields, where) -> None:
    """Every record holds each of ``fields`` as text and its subject inside its prompt, else a
    ValueError naming ``where`` (the file), the record and the field: a missing ``target_new`` would
    otherwise be edited towards the text "nan" and counted."""
    for i, row in enumerate(rows):
        ident = f"record {i}" + (f" (case_id {row['case_id']})" if "case_id" in row else "")
        require_text(row, fields, f"{where}, {ident}")
        if "subject" in fields and row["subject"].strip() not in row["prompt"]:
            raise ValueError(f"{where}, {ident}: subject {row['subject']!r} is not in its prompt "
                             f"{row['prompt']!r}")


def load_known_facts(data_dir=None, n: int | None = None, *, builtin: bool = False) -> pd.DataFrame:
    """ROME's known facts as a DataFrame (known_id, subject, attribute, template, prediction, prompt,
    relation_id, target), first ``n`` rows.

    ``target`` is the attribute with a leading space (the token the model should produce).  Uses
    ``counterfact/known_1000.json`` under the data folder; a ``data_dir`` given without that file is
    an error.  Without a data folder (or one found through ``$KN_DATA_DIR`` / ``../shared/data``
    without the file), the project's built-in list, with a
    :class:`~kn_utils.data.BuiltinDataWarning`; ``builtin=True`` asks for it (no warning).
    ``df.attrs["data_source"]``: the file and its number of facts.
    """
    _check_n(n)
    root = None if builtin else data_root(data_dir)
    path = root / "counterfact" / KNOWN_FILE if root is not None else None
    fallback = path is None or not path.exists()
    if fallback:
        if given(data_dir) and not builtin:
            raise FileNotFoundError(f"{KNOWN_FILE} not found under {root / 'counterfact'}: pass the data "
                                    f"folder holding counterfact/{KNOWN_FILE}, or data_dir=None for the "
                                    f"built-in known facts")
        path = BUILTIN_KNOWN
    rows = _read_json(path)
    check_records(rows, ("subject", "attribute", "prompt"), path)
    df = pd.DataFrame(rows)
    for col in KNOWN_COLUMNS:
        if col not in df.columns:
            df[col] = range(len(df)) if col == "known_id" else None
    df = df[list(KNOWN_COLUMNS)].copy()
    df["target"] = " " + df["attribute"].astype(str).str.strip()
    df.attrs["source"] = str(path)
    if fallback and not builtin:
        why = "no data directory" if root is None else f"no {KNOWN_FILE} under {root / 'counterfact'}"
        df.attrs["data_source"] = warn_builtin("known facts", path, len(df), why)
    else:
        df.attrs["data_source"] = source_label(path, len(df))
    return df.head(n).reset_index(drop=True) if n else df


def load_counterfact(data_dir=None, split: str = "edit", n: int | None = None) -> pd.DataFrame:
    """CounterFact in EasyEdit's reduced format: case_id, prompt, subject, target_new, ground_truth,
    rephrase_prompt, locality_prompt, locality_ground_truth; first ``n`` rows of ``split``."""
    _check_n(n)
    if split not in COUNTERFACT_SPLITS:
        raise ValueError(f"unknown CounterFact split {split!r}; choose one of {COUNTERFACT_SPLITS}")
    root = data_root(data_dir)
    if root is None:
        raise FileNotFoundError("no data folder: pass data_dir= or set KN_DATA_DIR to the folder "
                                "holding counterfact/easyedit-split/")
    path = root / "counterfact" / "easyedit-split" / f"counterfact-{split}.json"
    if not path.exists():
        raise FileNotFoundError(f"CounterFact file not found: {path}")
    rows = _read_json(path)
    check_records(rows[:n] if n else rows, COUNTERFACT_FIELDS, path)
    df = pd.DataFrame(rows)
    df.attrs["source"] = str(path)
    df.attrs["data_source"] = source_label(path, len(df))
    return df.head(n).reset_index(drop=True) if n else df


__all__ = ["COUNTERFACT_FIELDS", "check_records", "load_known_facts", "load_counterfact"]
