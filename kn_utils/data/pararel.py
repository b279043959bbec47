"""ParaRel fact bags (Dai et al.'s ``data_all_allbags.json``): one fact, many paraphrased prompts.

    bags = load_bags("P36", n=10)
    bags[0].subject, bags[0].object        # 'Azerbaijan', 'Baku'
    bags[0].prompts[0]                     # 'The capital of Azerbaijan is [MASK] .'
    bags[0].templates[0]                   # 'The capital of [X] is [Y] .'
    causal_prompts(bags[0])                # ['The capital of Azerbaijan is', ...]

The bag file stores prompts and objects but not subjects.  The subject is recovered by matching each
prompt against the relation's ParaRel patterns (``[X] ... [Y]``); several patterns can match one
prompt ("[X] plays [Y] music" also matches "John Cage, who plays [MASK] music" with X = "John Cage,
who"), so every prompt votes for the set of subjects it admits and the subject admitted by most
prompts wins.  Without pattern files (the built-in mini set) the patterns are derived from the bags
themselves: prompt j of every bag of a relation is the same pattern with a different subject, so the
common prefix and suffix across bags, snapped to word boundaries, are the pattern.

Runs of whitespace in prompts are collapsed to one space (two bags in the file have a doubled space
inside the subject), so the subject is always a substring of each prompt.
"""
from __future__ import annotations

import functools
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import BUILTIN_DIR, Loaded, data_root, read_jsonl, source_label, warn_builtin

MASK = "[MASK]"
BAGS_FILE = Path("pararel") / "data_all_allbags.json"
PATTERN_DIRS = (Path("pararel") / "knowledge-neurons" / "patterns",
                Path("pararel") / "yanaiela-pararel" / "graphs_json")
BUILTIN_BAGS = BUILTIN_DIR / "builtin" / "pararel_mini.json"


@dataclass(frozen=True)
class Bag:
    """One fact (subject, relation, object) and its paraphrased prompts, each with one ``[MASK]``."""

    relation: str          # "P36"
    subject: str
    object: str
    prompts: tuple[str, ...]    # "The capital of Azerbaijan is [MASK] ."
    templates: tuple[str, ...]  # "The capital of [X] is [Y] ." (aligned with prompts)
    label: str = ""             # "capital" (from "P36(capital)")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip())


def _source(data_dir) -> Path:
    """The bag file: the data folder's, else the built-in mini set (see :func:`load_bags`)."""
    root = data_root(data_dir)
    if root is not None and (root / BAGS_FILE).exists():
        return root / BAGS_FILE
    return BUILTIN_BAGS


def _stamp(path) -> tuple[int, int] | None:
    """(size, mtime) of a file, None if there is none: a cache keyed by it re-reads a changed file."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _read_bags(path: str) -> dict:
    # The full file is 30 MB (~1 s to parse): parse once per process, again when the file changes.
    return _parse_bags(path, _stamp(path))


@functools.lru_cache(maxsize=4)
def _parse_bags(path: str, stamp) -> dict:
    with open(path, encoding="utf-8") as f:
        try:
            table = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}); the file is damaged "
                             f"or truncated: restore it, or pass another data folder") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a JSON object of relations, got {type(table).__name__}")
    return table


def _check_bags(path, rel, bags) -> None:
    """Every bag a non-empty list of [prompt with one [MASK], object, relation label] strings."""
    if not isinstance(bags, list):
        raise ValueError(f"{path}: relation {rel!r} holds {type(bags).__name__}, not a list of bags")
    for i, bag in enumerate(bags):
        if not isinstance(bag, list) or not bag:
            raise ValueError(f"{path}: relation {rel!r}, bag {i}: expected a non-empty list of "
                             f"[prompt, object, relation] entries, got {bag!r:.80}")
        for j, entry in enumerate(bag):
            if not (isinstance(entry, list) and len(entry) == 3
                    and all(isinstance(x, str) and x.strip() for x in entry)):
                raise ValueError(f"{path}: relation {rel!r}, bag {i}, entry {j}: expected [prompt, "
                                 f"object, relation] (three non-empty strings), got {entry!r:.80}")
            if entry[0].count(MASK) != 1:
                raise ValueError(f"{path}: relation {rel!r}, bag {i}, entry {j}: the prompt must hold "
                                 f"one {MASK}, got {entry[0]!r}")


def _read_patterns(root: str | None, relation: str) -> tuple[str, ...] | None:
    if root is None:
        return None
    for folder in PATTERN_DIRS:
        path = Path(root) / folder / f"{relation}.jsonl"
        if path.exists():
            return _parse_patterns(str(path), _stamp(path))
    return None


@functools.lru_cache(maxsize=64)
def _parse_patterns(path: str, stamp) -> tuple[str, ...]:
    patterns = []
    for number, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row.get("pattern"), str) or not row["pattern"].strip():
            raise ValueError(f"{path}: pattern record {number} has no 'pattern' string")
        patterns.append(_norm(row["pattern"]))
    return tuple(patterns)


def relations(data_dir=None) -> list[str]:
    """Relation ids available in the bag file (the built-in mini set without a data directory)."""
    return sorted(_read_bags(str(_source(data_dir))), key=lambda r: int(r[1:]) if r[1:].isdigit() else 0)


def _relation_id(relation) -> str:
    if not isinstance(relation, str) or not relation.strip():
        raise ValueError(f"relation must be a ParaRel id such as 'P36', got {relation!r}")
    return relation.strip().split("(")[0]


def _pattern_regex(pattern: str) -> re.Pattern:
    escaped = re.escape(pattern)
    escaped = escaped.replace(re.escape("[X]"), "(.+?)").replace(re.escape("[Y]"), re.escape(MASK))
    return re.compile(escaped)


_WORD = re.compile(r"\w")


def derive_patterns(bags_prompts: list[list[str]]) -> list[str]:
    """Patterns from bags whose prompt j shares one pattern: common prefix/suffix = the pattern.

    Needs at least two bags with different subjects per prompt count.  The prefix is cut back and
    the suffix forward to word boundaries, so subjects sharing letters ("Canada", "Cameroon") do not
    lose them to the pattern.
    """
    by_len: dict[int, list[list[str]]] = {}
    for prompts in bags_prompts:
        by_len.setdefault(len(prompts), []).append(prompts)
    patterns = []
    for group in by_len.values():
        if len(group) < 2:
            continue
        for j in range(len(group[0])):
            texts = [bag[j] for bag in group]
            prefix = texts[0]
            for t in texts[1:]:
                while not t.startswith(prefix):
                    prefix = prefix[:-1]
            suffix = texts[0]
            for t in texts[1:]:
                while not t.endswith(suffix):
                    suffix = suffix[1:]
            while prefix and _WORD.match(prefix[-1]):
                prefix = prefix[:-1]
            while suffix and _WORD.match(suffix[0]):
                suffix = suffix[1:]
            if MASK not in prefix + suffix:
                continue  # the mask sits inside the varying part: not a pattern we can use
            patterns.append((prefix + "[X]" + suffix).replace(MASK, "[Y]"))
    return sorted(set(patterns))


def recover_subject(prompts, patterns) -> str:
    """The subject admitted by most prompts when matched against ``patterns`` ([X]/[Y] form)."""
    regexes = [_pattern_regex(_norm(p)) for p in patterns]
    votes: Counter = Counter()
    for prompt in prompts:
        text = _norm(prompt)
        votes.update({m.group(1) for rx in regexes for m in [rx.fullmatch(text)] if m})
    if not votes:
        raise ValueError(f"no pattern matches any prompt of the bag {list(prompts)[:2]}...")
    best = max(votes.items(), key=lambda kv: (kv[1], len(kv[0])))
    return best[0]


def _template(prompt: str, subject: str) -> str:
    return prompt.replace(subject, "[X]", 1).replace(MASK, "[Y]")


def load_bags(relation: str, data_dir=None, n: int | None = None) -> list[Bag]:
    """The first ``n`` (all if None) fact bags of ``relation`` ("P36" or "P36(capital)").

    Reads ``<data_root>/pararel/data_all_allbags.json``; without a data directory, the built-in mini
    set ``kn_utils/resources/builtin/pararel_mini.json`` (a few bags of P36, P1376 and P101), with a
    :class:`~kn_utils.data.BuiltinDataWarning`.  The list's ``.source`` names the file and how many
    bags of the relation it holds.
    """
    rel = _relation_id(relation)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise ValueError(f"n must be a non-negative integer or None, got {n!r}")
    source = _source(data_dir)
    table = _read_bags(str(source))
    if rel not in table:
        raise ValueError(f"unknown ParaRel relation {relation!r} in {source}; "
                         f"valid relations: {', '.join(relations(data_dir))}")
    _check_bags(source, rel, table[rel])    # a damaged bag names itself before anything is computed
    raw = table[rel][:n] if n is not None else table[rel]
    if source == BUILTIN_BAGS:
        origin = warn_builtin(f"ParaRel {rel}", source, len(table[rel]),
                              "no data directory with " + str(BAGS_FILE))
    else:
        origin = source_label(source, len(table[rel]))
    root = data_root(data_dir) if source != BUILTIN_BAGS else None
    patterns = _read_patterns(str(root) if root else None, rel)
    if patterns is None:
        patterns = _derived_patterns(str(source), rel, _stamp(source))
    bags = []
    for entries in raw:
        prompts = tuple(_norm(p) for p, _, _ in entries)
        subject = recover_subject(prompts, patterns)
        label = entries[0][2]
        label = label[label.find("(") + 1:-1] if "(" in label else ""
        bags.append(Bag(relation=rel, subject=subject, object=entries[0][1], prompts=prompts,
                        templates=tuple(_template(p, subject) for p in prompts), label=label))
    return Loaded(bags, origin)


@functools.lru_cache(maxsize=64)
def _derived_patterns(source: str, rel: str, stamp=None) -> tuple[str, ...]:
    bags = [[_norm(p) for p, _, _ in entries] for entries in _read_bags(source)[rel]]
    patterns = derive_patterns(bags)
    if not patterns:
        raise ValueError(f"no pattern files and too few bags of {rel} in {source} to derive them")
    return tuple(patterns)


def causal_prompts(bag: Bag) -> list[str]:
    """Prompts a decoder can complete: those whose mask ends the sentence, cut before the mask.

    "The capital of Azerbaijan is [MASK] ." -> "The capital of Azerbaijan is"; prompts with text
    after the mask other than punctuation ("[MASK] is the capital of ...") are left out.
    """
    out = []
    for prompt in bag.prompts:
        head, _, tail = prompt.partition(MASK)
        if MASK in tail or not head.strip():
            continue
        if re.fullmatch(r"[\s.!?]*", tail):
            out.append(head.rstrip())
    return out


def causal_templates(bag: Bag) -> list[str]:
    """The [X]-form templates of :func:`causal_prompts`, cut before [Y] ("The capital of [X] is")."""
    out = []
    for template in bag.templates:
        head, _, tail = template.partition("[Y]")
        if "[Y]" in tail or not head.strip():
            continue
        if re.fullmatch(r"[\s.!?]*", tail):
            out.append(head.rstrip())
    return out
