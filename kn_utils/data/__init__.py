"""Data loaders.  Every loader takes ``data_dir=None`` and finds its files through :func:`data_root`.

Where a loader had to use one of the project's built-in mini sets instead of the data set, it says so
with one :class:`BuiltinDataWarning`, and what it returns carries its source (:func:`source_of`):
a path or ``builtin:<file>``, with the number of items, so that no table of results can pass for the
data set's when it came from a handful of our own examples.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..resources import checkout_root, resource_dir
from ..settings import env, env_flag, given

DATA_ENV = "KN_DATA_DIR"
# "0" turns off the look beside the checkout (tests of a machine without data; a fresh clone)
SHARED_ENV = "KN_SHARED_DATA"
REPO_ROOT = checkout_root()  # None in an installed wheel
# data the project writes itself (synonyms, built-in sets): package data, found in a wheel too
BUILTIN_DIR = resource_dir()
# the read-only data sets beside a source checkout; an installed wheel has no "beside"
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data" if REPO_ROOT is not None else None
BUILTIN_PREFIX = "builtin:"


class BuiltinDataWarning(UserWarning):
    """A loader fell back to a built-in mini set: results are not the data set's."""


def data_root(data_dir=None) -> Path | None:
    """The folder holding blimp/, pararel/, counterfact/, wikitext/ ... or None if there is none.

    Order: the argument, ``$KN_DATA_DIR``, then ``../shared/data`` beside the source checkout (unless
    ``KN_SHARED_DATA=0``; an installed wheel has no checkout, so only the first two).  An empty
    argument or variable counts as not given; one that is given but
    is not a folder raises FileNotFoundError rather than being passed over.
    """
    if given(data_dir):
        path = Path(str(data_dir).strip()).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"data directory not found: data_dir={str(data_dir)!r} is not a folder; pass the folder "
                f"holding blimp/, pararel/, counterfact/, wikitext/, or data_dir=None to use "
                f"${DATA_ENV} / the built-in mini sets")
        return path
    value = env(DATA_ENV)
    if value is not None:
        path = Path(value).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"data directory not found: {DATA_ENV}={value!r} is not a folder; point it at the folder "
                f"holding blimp/, pararel/, counterfact/, wikitext/, or unset it (unset {DATA_ENV}) to "
                f"use ../shared/data beside the checkout or the built-in mini sets")
        return path
    if env_flag(SHARED_ENV, True) and SHARED_DATA_DIR is not None and SHARED_DATA_DIR.is_dir():
        return SHARED_DATA_DIR
    return None


# --------------------------------------------------------------------------------------------------
# Where a loaded set came from
# --------------------------------------------------------------------------------------------------
def source_label(path, n_items: int) -> str:
    """``"<path> (N items)"``, or ``"builtin:<file> (N items)"`` for a file of the built-in sets.

    ``path`` may already be a label such as ``"hub:nyu-mll/blimp"``.
    """
    text = str(path)
    p = Path(text)
    if p.is_absolute() and p.resolve().parent == (BUILTIN_DIR / "builtin").resolve():
        text = BUILTIN_PREFIX + p.name
    return f"{text} ({n_items} items)"


def is_builtin(source) -> bool:
    """Whether a source (label, DataFrame or loaded list) is one of the built-in mini sets."""
    label = source if isinstance(source, str) else source_of(source)
    return bool(label) and label.startswith(BUILTIN_PREFIX)


def source_of(loaded) -> str | None:
    """The ``data_source`` label of a loaded set or a result table (None if it has none)."""
    attrs = getattr(loaded, "attrs", None)
    if isinstance(attrs, dict):
        return attrs.get("data_source")
    return getattr(loaded, "source", None)


def warn_builtin(what: str, path, n_items: int, why: str, stacklevel: int = 3) -> str:
    """The one warning a loader gives when it falls back to a built-in set; returns the source label."""
    label = source_label(path, n_items)
    warnings.warn(f"{what}: {why}; using the built-in mini set {label}, our own examples, so results "
                  f"are not the data set's (set {DATA_ENV} to the data folder)",
                  BuiltinDataWarning, stacklevel=stacklevel)
    return label


class Loaded(list):
    """A list of loaded items that knows where they came from (``.source``, see :func:`source_label`)."""

    def __init__(self, items=(), source: str | None = None):
        super().__init__(items)
        self.source = source


def read_jsonl(path) -> list[dict]:
    """The JSON objects of a jsonl file, one per non-blank line; a bad line names the file and its
    1-based line number."""
    return [row for _, row in read_jsonl_lines(path)]


def read_jsonl_lines(path) -> list[tuple[int, dict]]:
    """(1-based line number, JSON object) for each non-blank line of a jsonl file (see
    :func:`read_jsonl`): callers that check fields can name the line of a bad row."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno}); "
                                 f"fix or remove that line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got "
                                 f"{type(row).__name__}")
            rows.append((number, row))
    return rows


def checked_rows(numbered, where, fields, what: str = "record", when: dict | None = None) -> list[dict]:
    """The rows of ``numbered`` ((label, row) pairs, e.g. ("line 3", {...})), each checked to hold
    ``fields`` (plus ``when[flag]`` where the row's ``flag`` is true) as text by :func:`require_text`,
    which names ``where`` and the label."""
    for label, row in numbered:
        extra = tuple(f for flag, names in (when or {}).items() if row.get(flag) for f in names)
        require_text(row, tuple(fields) + extra, f"{where}, {label}", what)
    return [row for _, row in numbered]


def require_text(row: dict, fields, where: str, what: str = "record") -> None:
    """ValueError naming ``where`` (file and line or record) and the field, when ``row`` lacks one of
    ``fields`` as a non-empty string: a missing answer must not become the text "nan"."""
    problem = missing_text(row, fields)
    if problem:
        raise ValueError(f"{where}: {what} unusable: {problem} (needed: {', '.join(fields)}); fix or "
                         f"remove it")


def missing_text(row: dict, fields) -> str | None:
    """The first of ``fields`` that ``row`` lacks, holds null / NaN, or holds no text, described
    ("field 'target_new' is missing"); None when all are non-empty strings."""
    for name in fields:
        if name not in row:
            return f"field {name!r} is missing"
        value = row[name]
        if value is None or (isinstance(value, float) and value != value):
            return f"field {name!r} is null"
        if not isinstance(value, str):
            return f"field {name!r} is {type(value).__name__} {value!r}, not text"
        if not value.strip():
            return f"field {name!r} is empty"
    return None


__all__ = ["BuiltinDataWarning", "Loaded", "data_root", "is_builtin", "missing_text", "read_jsonl",
           "checked_rows", "require_text",
           "read_jsonl_lines", "source_label",
           "source_of", "warn_builtin"]
