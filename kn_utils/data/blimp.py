"""BLiMP minimal pairs (Warstadt et al. 2020) as prompts and targets for knowledge-neuron work.

Where the rows come from, in order: ``<data_root>/blimp/<UID>.jsonl`` (see :func:`kn_utils.data.data_root`),
the hub data set ``nyu-mll/blimp`` (only if the optional ``datasets`` package is installed), then the
project's own small set ``kn_utils/resources/builtin/blimp_mini.jsonl`` (our sentences in BLiMP's format, ~30 rows per
paradigm the paper uses) so that everything runs without the real data.

How a pair becomes a prompt (the paper §3, REFERENCE.md §2):

* masked LMs: the single differing token is masked; the good token is the target
  ("Raymond is selling this [MASK]." → "sketch" vs "sketches").  Rows whose difference is not one
  token for this tokenizer are skipped and counted (``df.attrs["n_skipped"]``).
* decoders: the prompt is the text before the difference (``one_prefix_prefix``) and the good word the
  target; only *one-prefix* paradigms (the deciding word comes first: type-1 determiner–noun agreement,
  subject–verb agreement, anaphors) can be read that way.
"""
from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path

import pandas as pd

from . import (BUILTIN_DIR, Loaded, checked_rows, data_root, read_jsonl, read_jsonl_lines, source_label,
               warn_builtin)

BUILTIN_FILE = BUILTIN_DIR / "builtin" / "blimp_mini.jsonl"
HUB_ID = "nyu-mll/blimp"

# The 67 BLiMP paradigms (file names of the published data = the hub configurations).
ALL_UIDS = (
    "adjunct_island", "anaphor_gender_agreement", "anaphor_number_agreement", "animate_subject_passive",
    "animate_subject_trans", "causative", "complex_NP_island",
    "coordinate_structure_constraint_complex_left_branch",
    "coordinate_structure_constraint_object_extraction", "determiner_noun_agreement_1",
    "determiner_noun_agreement_2", "determiner_noun_agreement_irregular_1",
    "determiner_noun_agreement_irregular_2", "determiner_noun_agreement_with_adj_2",
    "determiner_noun_agreement_with_adj_irregular_1", "determiner_noun_agreement_with_adj_irregular_2",
    "determiner_noun_agreement_with_adjective_1", "distractor_agreement_relational_noun",
    "distractor_agreement_relative_clause", "drop_argument", "ellipsis_n_bar_1", "ellipsis_n_bar_2",
    "existential_there_object_raising", "existential_there_quantifiers_1",
    "existential_there_quantifiers_2", "existential_there_subject_raising",
    "expletive_it_object_raising", "inchoative", "intransitive", "irregular_past_participle_adjectives",
    "irregular_past_participle_verbs", "irregular_plural_subject_verb_agreement_1",
    "irregular_plural_subject_verb_agreement_2", "left_branch_island_echo_question",
    "left_branch_island_simple_question", "matrix_question_npi_licensor_present", "npi_present_1",
    "npi_present_2", "only_npi_licensor_present", "only_npi_scope", "passive_1", "passive_2",
    "principle_A_c_command", "principle_A_case_1", "principle_A_case_2", "principle_A_domain_1",
    "principle_A_domain_2", "principle_A_domain_3", "principle_A_reconstruction",
    "regular_plural_subject_verb_agreement_1", "regular_plural_subject_verb_agreement_2",
    "sentential_negation_npi_licensor_present", "sentential_negation_npi_scope",
    "sentential_subject_island", "superlative_quantifiers_1", "superlative_quantifiers_2",
    "tough_vs_raising_1", "tough_vs_raising_2", "transitive", "wh_island", "wh_questions_object_gap",
    "wh_questions_subject_gap", "wh_questions_subject_gap_long_distance", "wh_vs_that_no_gap",
    "wh_vs_that_no_gap_long_distance", "wh_vs_that_with_gap", "wh_vs_that_with_gap_long_distance",
)

_DNA = "determiner_noun_agreement_"
# The paper's short names (Table 8, Fig 6b) -> UIDs.  Note the data's own inconsistency:
# "..._with_adjective_1" beside "..._with_adj_2".
SHORT_NAMES = {
    "dna_1": _DNA + "1", "dna_2": _DNA + "2",
    "dna_irr_1": _DNA + "irregular_1", "dna_irr_2": _DNA + "irregular_2",
    "irregular_1": _DNA + "irregular_1", "irregular_2": _DNA + "irregular_2",
    "dna_adj_1": _DNA + "with_adjective_1", "dna_adj_2": _DNA + "with_adj_2",
    "with_adj_1": _DNA + "with_adjective_1", "with_adj_2": _DNA + "with_adj_2",
    "with_adjective_1": _DNA + "with_adjective_1", "with_adjective_2": _DNA + "with_adj_2",
    _DNA + "with_adj_1": _DNA + "with_adjective_1", _DNA + "with_adjective_2": _DNA + "with_adj_2",
    "dna_adj_irr_1": _DNA + "with_adj_irregular_1", "dna_adj_irr_2": _DNA + "with_adj_irregular_2",
    "with_adj_irr_1": _DNA + "with_adj_irregular_1", "with_adj_irr_2": _DNA + "with_adj_irregular_2",
    "with_adj_irregular_1": _DNA + "with_adj_irregular_1",
    "with_adj_irregular_2": _DNA + "with_adj_irregular_2",
    "sva_1": "regular_plural_subject_verb_agreement_1", "sva_2": "regular_plural_subject_verb_agreement_2",
    "rsva_1": "regular_plural_subject_verb_agreement_1", "rsva_2": "regular_plural_subject_verb_agreement_2",
    "isva_1": "irregular_plural_subject_verb_agreement_1",
    "isva_2": "irregular_plural_subject_verb_agreement_2",
    "anaphor_gender": "anaphor_gender_agreement", "anaphor_number": "anaphor_number_agreement",
    "distractor_relational_noun": "distractor_agreement_relational_noun",
    "distractor_relative_clause": "distractor_agreement_relative_clause",
}

# The paradigms the paper uses (REFERENCE.md §2).
PAPER_PARADIGMS = (
    "anaphor_gender_agreement", "anaphor_number_agreement",
    _DNA + "1", _DNA + "2", _DNA + "irregular_1", _DNA + "irregular_2", _DNA + "with_adjective_1",
    _DNA + "with_adj_2", _DNA + "with_adj_irregular_1", _DNA + "with_adj_irregular_2",
    "distractor_agreement_relational_noun", "distractor_agreement_relative_clause",
    "irregular_plural_subject_verb_agreement_1", "irregular_plural_subject_verb_agreement_2",
    "regular_plural_subject_verb_agreement_1", "regular_plural_subject_verb_agreement_2",
)

DETERMINER_NUMBER = {
    "this": "singular", "that": "singular", "a": "singular", "an": "singular", "every": "singular",
    "each": "singular", "one": "singular", "these": "plural", "those": "plural", "two": "plural",
    "both": "plural", "several": "plural", "many": "plural",
}
# Auxiliaries and copulas by number; other verbs: the -s form is singular (3rd person present).
VERB_NUMBER = {
    **{v: "singular" for v in ("is", "was", "has", "does", "isn't", "wasn't", "hasn't", "doesn't")},
    **{v: "plural" for v in ("are", "were", "have", "do", "aren't", "weren't", "haven't", "don't")},
}
REFLEXIVE_GROUP = {"herself": "female", "himself": "male", "itself": "neuter", "themselves": "plural"}

COLUMNS = ["uid", "pair_id", "prompt", "good", "bad", "good_token", "bad_token", "n_good_tokens",
           "n_bad_tokens", "group", "determiner", "subject"]

_WORD = re.compile(r"[A-Za-z0-9']+")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _builtin_table() -> tuple[dict, ...]:
    # read once per process: every paradigm-name lookup consults the built-in set
    if not BUILTIN_FILE.exists():
        return ()
    return tuple(read_jsonl(BUILTIN_FILE))


def _builtin_rows() -> list[dict]:
    """Fresh copies of the built-in rows (callers may change them)."""
    return [dict(r) for r in _builtin_table()]


def builtin_paradigms() -> list[str]:
    """UIDs covered by the built-in mini set."""
    return sorted({r["UID"] for r in _builtin_table()})


def paradigms(data_dir=None) -> list[str]:
    """Every paradigm name :func:`load_paradigm` accepts as a UID (short names: :data:`SHORT_NAMES`)."""
    names = set(ALL_UIDS) | set(builtin_paradigms())
    root = data_root(data_dir)
    if root is not None and (root / "blimp").is_dir():
        names |= {p.stem for p in (root / "blimp").glob("*.jsonl")}
    return sorted(names)


def resolve_uid(name: str, data_dir=None) -> str:
    """A paradigm's UID from its UID or one of the paper's short names; ValueError listing valid names."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a BLiMP paradigm name must be a non-empty string, got {name!r}")
    key = name.strip()
    key = key[:-len(".jsonl")] if key.endswith(".jsonl") else key
    key = SHORT_NAMES.get(key, SHORT_NAMES.get(key.lower(), key))
    valid = paradigms(data_dir)
    if key not in valid:
        raise ValueError(f"unknown BLiMP paradigm {name!r}; valid UIDs: {', '.join(valid)}; "
                         f"short names: {', '.join(sorted(SHORT_NAMES))}")
    return key


def _check_n(n):
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"n must be a positive integer or None, got {n!r}")


def _from_hub(uid: str) -> list[dict]:
    try:
        import datasets  # optional: not a kn_utils requirement
    except ImportError as err:
        raise ValueError(f"loading BLiMP {uid!r} from the hub needs the 'datasets' package "
                         f"(pip install datasets), or pass data_dir / set KN_DATA_DIR") from err
    try:
        return [dict(r) for r in datasets.load_dataset(HUB_ID, uid, split="train")]
    except Exception as err:  # offline, hub down, renamed config: say which and how to avoid it
        raise ValueError(f"could not load {HUB_ID}/{uid} from the hub ({type(err).__name__}: {err}); "
                         f"pass data_dir or set KN_DATA_DIR to a folder with blimp/{uid}.jsonl") from err


def _load(uid, data_dir=None, n=None, source="auto") -> tuple[Loaded, str]:
    """(rows with ``.source`` = "<origin> (N items)", origin); N counts the paradigm's rows there."""
    _check_n(n)
    if source not in ("auto", "files", "hub", "builtin"):
        raise ValueError(f"source must be 'auto', 'files', 'hub' or 'builtin', got {source!r}")
    uid = resolve_uid(uid, data_dir)
    rows, origin = None, None
    if source in ("auto", "files"):
        root = data_root(data_dir)
        path = root / "blimp" / f"{uid}.jsonl" if root is not None else None
        if path is not None and path.exists():
            numbered = [(f"line {i}", r) for i, r in read_jsonl_lines(path)]
            rows, origin = checked_rows(numbered, path, _FIELDS, "BLiMP row", _METHOD_FIELDS), str(path)
        elif source == "files":
            raise ValueError(f"no BLiMP file for {uid!r}: looked for "
                             f"{path or '<data_dir>/blimp/' + uid + '.jsonl'} (set KN_DATA_DIR)")
    if rows is None and source in ("auto", "hub"):
        try:
            rows, origin = _from_hub(uid), f"hub:{HUB_ID}"
            rows = checked_rows(list(enumerate(rows)), f"{origin}/{uid} row", _FIELDS, "BLiMP row", _METHOD_FIELDS)
        except ValueError as err:
            if source == "hub":
                raise
            if uid not in builtin_paradigms():
                raise ValueError(f"no BLiMP data for {uid!r}: no data directory with blimp/{uid}.jsonl, "
                                 f"the hub is unavailable ({err}), and the built-in mini set only has "
                                 f"{', '.join(builtin_paradigms())}") from None
    if rows is None:
        rows = [r for r in _builtin_rows() if r["UID"] == uid]
        if not rows:
            raise ValueError(f"the built-in BLiMP mini set has no {uid!r}; it has "
                             f"{', '.join(builtin_paradigms())}")
        origin = f"builtin:{BUILTIN_FILE.name}"
        if source == "auto":
            warn_builtin(f"BLiMP {uid}", BUILTIN_FILE, len(rows),
                         "no data directory with blimp/ and no hub access", stacklevel=4)
    return Loaded(rows[:n] if n else rows, source_label(origin, len(rows))), origin


_FIELDS = ("sentence_good", "sentence_bad")   # every row's; below: what a prompt method reads, where used
_METHOD_FIELDS = {"one_prefix_method": ("one_prefix_prefix", "one_prefix_word_good", "one_prefix_word_bad"),
                  "two_prefix_method": ("two_prefix_prefix_good", "two_prefix_prefix_bad", "two_prefix_word")}


def load_paradigm(uid: str, data_dir=None, n: int | None = None, *, source: str = "auto") -> list[dict]:
    """The rows (dicts with BLiMP's fields) of one paradigm, the first ``n`` if given.

    ``uid``: a BLiMP UID or a paper short name ("dna_1", "with_adj_1", ...).  ``source``: "auto" (data
    directory, hub, built-in set, in that order), or one of "files", "hub", "builtin" only.
    """
    return _load(uid, data_dir, n, source)[0]  # a list; .source says where it came from


# --------------------------------------------------------------------------------------------------
# Minimal pairs -> prompts
# --------------------------------------------------------------------------------------------------
def _kind(uid: str) -> str | None:
    if uid.startswith("determiner_noun_agreement"):
        return "dna"
    if "subject_verb_agreement" in uid or uid.startswith("distractor_agreement"):
        return "sva"
    if uid == "anaphor_gender_agreement":
        return "anaphor_gender"
    if uid == "anaphor_number_agreement":
        return "anaphor_number"
    return None


def _differing_word(good: str, bad: str) -> tuple[int, int, int] | None:
    """(start, end_in_good, end_in_bad) of the one word in which two sentences differ, or None.

    A word is a run of letters and digits, so "haven't"/"hasn't" differ in "haven"/"hasn" and a
    tokenizer that splits off "'t" still sees a single differing token.
    """
    if good == bad:
        return None
    p = 0
    while p < min(len(good), len(bad)) and good[p] == bad[p]:
        p += 1
    s = 0
    while s < min(len(good), len(bad)) - p and good[-1 - s] == bad[-1 - s]:
        s += 1
    start = p
    while start > 0 and good[start - 1].isalnum():
        start -= 1
    end_g, end_b = len(good) - s, len(bad) - s
    while end_g < len(good) and good[end_g].isalnum():
        end_g += 1
        end_b += 1
    word_g, word_b = good[start:end_g], bad[start:end_b]
    if not (word_g.isalnum() and word_b.isalnum()):
        return None  # empty, or more than one word differs
    return start, end_g, end_b


def _verb_number(verb: str, other: str | None = None) -> str:
    v = verb.lower()
    if v in VERB_NUMBER:
        return VERB_NUMBER[v]
    if other is not None:
        o = other.lower()
        if v in (o + "s", o + "es"):
            return "singular"
        if o in (v + "s", v + "es"):
            return "plural"
    return "singular" if v.endswith("s") and not v.endswith("ss") else "plural"


def _last_determiner(text: str) -> str | None:
    for word in reversed(_WORD.findall(text)):
        if word.lower() in DETERMINER_NUMBER:
            return word
    return None


def _annotate(kind, row, text_before: str, good: str, bad: str, masked_span: bool) -> dict:
    """group / determiner / subject columns for one pair (``text_before``: sentence before the target)."""
    out = {"group": None, "determiner": None, "subject": None}
    if kind == "dna":
        det = good if good.lower() in DETERMINER_NUMBER else _last_determiner(text_before)
        out["determiner"] = det.lower() if det else None
        out["group"] = DETERMINER_NUMBER.get(det.lower()) if det else None
    elif kind == "sva":
        two_prefix = row.get("two_prefix_word")
        if two_prefix and masked_span:  # the noun is the target; the shared verb decides the group
            out["subject"] = good
            out["group"] = _verb_number(two_prefix.split()[0])
        else:
            words = _WORD.findall(text_before)
            if row.get("UID", "").startswith(("regular_plural", "irregular_plural")) and words:
                out["subject"] = words[-1]
            out["group"] = _verb_number(good, bad)
    elif kind == "anaphor_gender":
        out["group"] = REFLEXIVE_GROUP.get(good.lower())
    elif kind == "anaphor_number":
        out["group"] = "plural" if good.lower() == "themselves" else "singular"
    return out


def _token_text(lm, ids) -> str:
    return lm.tokenizer.decode(list(ids))


def _unusable_causal(uid: str) -> ValueError:
    return ValueError(
        f"{uid} is a two-prefix BLiMP paradigm: its good and bad sentences differ *before* the shared "
        f"word (e.g. 'this/these committee'), so the text before the difference does not decide which "
        f"word is grammatical and a causal LM cannot be asked for it; use a masked LM, or a one-prefix "
        f"paradigm (type-1 determiner_noun_agreement_*_1, *subject_verb_agreement_1, anaphor_*)")


def minimal_pairs(lm, uid: str, data_dir=None, n: int | None = None, *, source: str = "auto",
                  on_unusable: str = "skip") -> pd.DataFrame:
    """One row per usable minimal pair: prompt, good / bad target words and the model's tokens for them.

    Columns: ``uid, pair_id, prompt, good, bad, good_token, bad_token, n_good_tokens, n_bad_tokens,
    group, determiner, subject``.  ``group`` is "singular"/"plural" for agreement paradigms (from the
    determiner, or the verb form for subject–verb agreement), "female"/"male"/"neuter"/"plural" for
    anaphor gender.  ``good_token`` is the target as the model reads it, e.g. " sketch" after
    "Raymond is selling this" for a byte-level BPE decoder.

    Masked LMs: rows whose difference is not a single token are skipped (``on_unusable="skip"``, the
    count in ``df.attrs["n_skipped"]``, reasons in ``df.attrs["skipped"]``) or raise (``"error"``).
    Decoders: two-prefix paradigms raise ValueError (see :func:`_unusable_causal`).
    """
    from ..targets import MASK_PLACEHOLDER, prepare

    if on_unusable not in ("skip", "error"):
        raise ValueError(f"on_unusable must be 'skip' or 'error', got {on_unusable!r}")
    rows, origin = _load(uid, data_dir, n, source)
    uid = resolve_uid(uid, data_dir)
    kind = _kind(uid)
    masked = lm.arch.is_masked_lm
    if not masked and not all(r.get("one_prefix_method") and r.get("one_prefix_prefix") for r in rows):
        raise _unusable_causal(uid)
    records, skipped = [], []
    for i, row in enumerate(rows):
        pair_id = int(row.get("pairID", i))
        good_s, bad_s = row["sentence_good"], row["sentence_bad"]
        if masked:
            span = _differing_word(good_s, bad_s)
            if span is None:
                skipped.append((pair_id, "the sentences differ in more than one word"))
                continue
            start, end_g, end_b = span
            good, bad = good_s[start:end_g], bad_s[start:end_b]
            prompt = good_s[:start] + MASK_PLACEHOLDER + good_s[end_g:]
            before = good_s[:start]
        else:
            prompt = row["one_prefix_prefix"]
            good, bad = row["one_prefix_word_good"], row["one_prefix_word_bad"]
            before = prompt
        t_good, t_bad = prepare(lm, prompt, good), prepare(lm, prompt, bad)
        if masked and (len(t_good.target_ids) != 1 or len(t_bad.target_ids) != 1):
            skipped.append((pair_id, f"{good!r}/{bad!r} are {len(t_good.target_ids)}/"
                                     f"{len(t_bad.target_ids)} tokens, not one each"))
            continue
        records.append({
            "uid": uid, "pair_id": pair_id, "prompt": prompt, "good": good, "bad": bad,
            "good_token": _token_text(lm, t_good.target_ids), "bad_token": _token_text(lm, t_bad.target_ids),
            "n_good_tokens": len(t_good.target_ids), "n_bad_tokens": len(t_bad.target_ids),
            **_annotate(kind, row, before, good, bad, masked)})
    if skipped and on_unusable == "error":
        pid, why = skipped[0]
        raise ValueError(f"{uid}: pair {pid} cannot be masked as a single token for {lm.name}: {why} "
                         f"({len(skipped)} such rows; on_unusable='skip' drops them)")
    if not records:
        raise ValueError(f"{uid}: none of the {len(rows)} rows is usable with {lm.name} "
                         f"(first reason: {skipped[0][1] if skipped else 'no rows'})")
    df = pd.DataFrame.from_records(records, columns=COLUMNS)
    df.attrs.update(uid=uid, source=origin, data_source=rows.source, n_rows=len(rows),
                    n_skipped=len(skipped), skipped=skipped)
    return df


def expand_templates(lm, uid: str = _DNA + "2", data_dir=None, n: int | None = None, *,
                     n_templates: int | None = None, source: str = "auto") -> pd.DataFrame:
    """DNA.2-style prompt bags for masked LMs: every unique determiner–noun pair in every template.

    The paper (REFERENCE.md §2) takes the 283 unique determiner–noun pairs of a type-2 paradigm and,
    for each pair, substitutes it into all of the paradigm's sentences, masking the determiner; a
    pair's prompts form one bag for :func:`kn_utils.attribution.find_knowledge_neurons`.
    Pairs come from the first ``n`` rows, templates are the first ``n_templates`` of those.

    Columns: ``uid, pair, determiner, noun, group, template_id, prompt, good, bad`` (``good`` = the
    pair's determiner, ``bad`` = the one of the other number used in its source row).
    """
    from ..targets import MASK_PLACEHOLDER, prepare

    _check_n(n_templates)
    rows, origin = _load(uid, data_dir, n, source)
    uid = resolve_uid(uid, data_dir)
    if not lm.arch.is_masked_lm:
        raise ValueError(f"expand_templates masks the determiner, which needs a masked LM; {lm.name} is "
                         f"a causal LM (use minimal_pairs on a one-prefix paradigm)")
    if _kind(uid) != "dna" or not all(r.get("two_prefix_method") for r in rows):
        raise ValueError(f"expand_templates needs a type-2 determiner_noun_agreement paradigm (the "
                         f"determiner differs), e.g. {_DNA}2, {_DNA}with_adj_2; got {uid!r}")
    templates, pairs = [], {}
    for row in rows:
        pg, pb, word = row["two_prefix_prefix_good"], row["two_prefix_prefix_bad"], row["two_prefix_word"]
        span = _differing_word(pg, pb)
        if span is None or not row["sentence_good"].startswith(f"{pg} {word}"):
            continue
        start, end_g, end_b = span
        det, bad_det = pg[start:end_g], pb[start:end_b]
        rest = row["sentence_good"][len(pg) + 1 + len(word):]
        # head [MASK] (adjective) NOUN rest; the noun slot is filled per pair below
        templates.append((int(row.get("pairID", len(templates))), pg[:start], pg[end_g:], rest))
        pairs.setdefault((det.lower(), word), bad_det.lower())
    templates = templates[:n_templates] if n_templates else templates
    records = []
    for p, ((det, noun), bad_det) in enumerate(pairs.items()):
        for tid, head, between, rest in templates:
            prompt = f"{head}{MASK_PLACEHOLDER}{between} {noun}{rest}"
            # a sentence-initial determiner is capitalised like the template's
            good, bad = det, bad_det
            if not head.strip():
                good, bad = det.capitalize(), bad_det.capitalize()
            records.append({"uid": uid, "pair": p, "determiner": det, "noun": noun,
                            "group": DETERMINER_NUMBER.get(det), "template_id": tid, "prompt": prompt,
                            "good": good, "bad": bad})
    if not records:
        raise ValueError(f"{uid}: no usable templates in {len(rows)} rows")
    df = pd.DataFrame.from_records(records)
    # the determiners must be single tokens for this tokenizer (one check per determiner, not per row)
    for det in set(df["good"]) | set(df["bad"]):
        ids = prepare(lm, df["prompt"].iloc[0], det).target_ids
        if len(ids) != 1:
            raise ValueError(f"determiner {det!r} is {len(ids)} tokens for {lm.name}; a mask covers one")
    df.attrs.update(uid=uid, source=origin, data_source=rows.source, n_pairs=len(pairs),
                    n_templates=len(templates))
    return df


__all__ = ["ALL_UIDS", "PAPER_PARADIGMS", "SHORT_NAMES", "builtin_paradigms", "expand_templates",
           "load_paradigm", "minimal_pairs", "paradigms", "resolve_uid"]
