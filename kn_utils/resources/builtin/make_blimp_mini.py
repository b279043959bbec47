"""Writes ``blimp_mini.jsonl``: a small BLiMP-format set of our own sentences (not BLiMP's).

It stands in for the real BLiMP files when neither ``<data_dir>/blimp/`` nor the hub is available,
so the notebook, the CLI and the tests run anywhere.  Same fields as BLiMP; one-prefix paradigms
(type 1: the deciding word comes first) and two-prefix paradigms (type 2: the deciding word is in
the prefix).  Run ``python data/builtin/make_blimp_mini.py`` to rebuild; the output is deterministic.
"""
import json
import random
from pathlib import Path

ROWS = 30
NAMES = ["Mary", "John", "Alice", "Robert", "Laura", "David", "Emma", "Peter", "Sarah", "Thomas",
         "Helen", "Daniel", "Julia", "Mark", "Anna", "Steven"]
FEMALE = {"Mary", "Alice", "Laura", "Emma", "Sarah", "Helen", "Julia", "Anna"}
VERBS = ["is selling", "bought", "was painting", "has found", "cleaned", "will carry", "noticed",
         "was fixing", "liked", "had moved", "watched", "is hiding"]
REGULAR = [("book", "books"), ("chair", "chairs"), ("picture", "pictures"), ("car", "cars"),
           ("window", "windows"), ("box", "boxes"), ("glass", "glasses"), ("lamp", "lamps"),
           ("table", "tables"), ("bottle", "bottles"), ("bicycle", "bicycles"), ("door", "doors"),
           ("letter", "letters"), ("painting", "paintings"), ("shirt", "shirts")]
IRREGULAR = [("child", "children"), ("man", "men"), ("woman", "women"), ("mouse", "mice"),
             ("person", "people"), ("goose", "geese"), ("foot", "feet"), ("tooth", "teeth"),
             ("cactus", "cacti"), ("analysis", "analyses"), ("fungus", "fungi"), ("ox", "oxen")]
ADJS = ["big", "small", "old", "new", "red", "heavy", "clean", "broken", "lovely", "dark"]
SING_DET, PLUR_DET = ["this", "that"], ["these", "those"]
OTHER = {"this": "these", "that": "those", "these": "this", "those": "that"}
# (singular, plural) verb forms for subject-verb agreement
SVA_VERBS = [("is", "are"), ("was", "were"), ("has", "have"), ("runs", "run"), ("sees", "see"),
             ("throws", "throw"), ("fights", "fight"), ("sleeps", "sleep"), ("walks", "walk"),
             ("isn't", "aren't"), ("wasn't", "weren't"), ("hasn't", "haven't")]
SVA_TAIL = {"is": "here", "are": "here", "was": "there", "were": "there", "has": "left",
            "have": "left", "isn't": "ready", "aren't": "ready", "wasn't": "late", "weren't": "late",
            "hasn't": "arrived", "haven't": "arrived"}
REFLEXIVE_VERBS = ["hurt", "saw", "likes", "was helping", "can't help", "talked to", "forgot about",
                   "is describing", "admired", "questioned"]


def row(uid, term, good, bad, *, prefix=None, word_good=None, word_bad=None, prefix_good=None,
        prefix_bad=None, word=None, pair_id=0, field="morphology"):
    one = prefix is not None
    return {
        "sentence_good": good, "sentence_bad": bad,
        **({"one_prefix_prefix": prefix, "one_prefix_word_good": word_good,
            "one_prefix_word_bad": word_bad} if one else
           {"two_prefix_prefix_good": prefix_good, "two_prefix_prefix_bad": prefix_bad,
            "two_prefix_word": word}),
        "field": field, "linguistics_term": term, "UID": uid, "simple_LM_method": True,
        "one_prefix_method": one, "two_prefix_method": not one, "lexically_identical": True,
        "pairID": str(pair_id)}


def dna(rng, uid, nouns, adjective, type2):
    out = []
    for i in range(ROWS):
        name, verb = rng.choice(NAMES), rng.choice(VERBS)
        sing, plur = rng.choice(nouns)
        det = (SING_DET + PLUR_DET)[i % 4]
        noun, other = (sing, plur) if det in SING_DET else (plur, sing)
        adj = f" {rng.choice(ADJS)}" if adjective else ""
        head = f"{name} {verb}"
        good = f"{head} {det}{adj} {noun}."
        if type2:
            bad = f"{head} {OTHER[det]}{adj} {noun}."
            out.append(row(uid, "determiner_noun_agreement", good, bad, prefix_good=f"{head} {det}{adj}",
                           prefix_bad=f"{head} {OTHER[det]}{adj}", word=noun, pair_id=i))
        else:
            bad = f"{head} {det}{adj} {other}."
            out.append(row(uid, "determiner_noun_agreement", good, bad, prefix=f"{head} {det}{adj}",
                           word_good=noun, word_bad=other, pair_id=i))
    return out


def sva(rng, uid, nouns, type2):
    out = []
    for i in range(ROWS):
        sing, plur = rng.choice(nouns)
        v_sing, v_plur = rng.choice(SVA_VERBS)
        plural = i % 2 == 1
        det = rng.choice(["The", "Those", "Some"] if plural else ["The", "This", "That"])
        if type2:
            det = "The"
        noun, other = (plur, sing) if plural else (sing, plur)
        verb, bad_verb = (v_plur, v_sing) if plural else (v_sing, v_plur)
        tail = SVA_TAIL.get(verb, "every day")
        good = f"{det} {noun} {verb} {tail}."
        if type2:
            bad = f"{det} {other} {verb} {tail}."
            out.append(row(uid, "subject_verb_agreement", good, bad, prefix_good=f"{det} {noun}",
                           prefix_bad=f"{det} {other}", word=verb, pair_id=i))
        else:
            bad = f"{det} {noun} {bad_verb} {tail}."
            out.append(row(uid, "subject_verb_agreement", good, bad, prefix=f"{det} {noun}",
                           word_good=verb, word_bad=bad_verb, pair_id=i))
    return out


def anaphor_gender(rng):
    out = []
    for i in range(ROWS):
        name, verb = rng.choice(NAMES), rng.choice(REFLEXIVE_VERBS)
        good = "herself" if name in FEMALE else "himself"
        bad = rng.choice([w for w in ("herself", "himself", "itself") if w != good])
        out.append(row("anaphor_gender_agreement", "anaphor_agreement", f"{name} {verb} {good}.",
                       f"{name} {verb} {bad}.", prefix=f"{name} {verb}", word_good=good, word_bad=bad,
                       pair_id=i, field="morphology"))
    return out


def anaphor_number(rng):
    out = []
    for i in range(ROWS):
        verb = rng.choice(REFLEXIVE_VERBS)
        if i % 2:
            subject = f"The {rng.choice(IRREGULAR)[1]}"
            good, bad = "themselves", rng.choice(["herself", "himself"])
        else:
            name = rng.choice(NAMES)
            subject, good, bad = name, ("herself" if name in FEMALE else "himself"), "themselves"
        out.append(row("anaphor_number_agreement", "anaphor_agreement", f"{subject} {verb} {good}.",
                       f"{subject} {verb} {bad}.", prefix=f"{subject} {verb}", word_good=good,
                       word_bad=bad, pair_id=i))
    return out


def distractor(rng, uid, relative):
    out = []
    for i in range(ROWS):
        sing, plur = rng.choice(IRREGULAR + REGULAR)
        d_sing, d_plur = rng.choice(REGULAR)
        v_sing, v_plur = rng.choice(SVA_VERBS)
        plural = i % 2 == 1
        noun, distractor_noun = (plur, d_sing) if plural else (sing, d_plur)
        verb, bad_verb = (v_plur, v_sing) if plural else (v_sing, v_plur)
        middle = f"that liked the {distractor_noun}" if relative else f"of the {distractor_noun}"
        prefix = f"The {noun} {middle}"
        tail = SVA_TAIL.get(verb, "every day")
        out.append(row(uid, "subject_verb_agreement", f"{prefix} {verb} {tail}.",
                       f"{prefix} {bad_verb} {tail}.", prefix=prefix, word_good=verb,
                       word_bad=bad_verb, pair_id=i))
    return out


def build():
    rng = random.Random(2024)
    rows = []
    for suffix, nouns in (("", REGULAR), ("irregular_", IRREGULAR)):
        rows += dna(rng, f"determiner_noun_agreement_{suffix}1", nouns, False, False)
        rows += dna(rng, f"determiner_noun_agreement_{suffix}2", nouns, False, True)
    rows += dna(rng, "determiner_noun_agreement_with_adjective_1", REGULAR, True, False)
    rows += dna(rng, "determiner_noun_agreement_with_adj_2", REGULAR, True, True)
    rows += dna(rng, "determiner_noun_agreement_with_adj_irregular_1", IRREGULAR, True, False)
    rows += dna(rng, "determiner_noun_agreement_with_adj_irregular_2", IRREGULAR, True, True)
    rows += sva(rng, "regular_plural_subject_verb_agreement_1", REGULAR, False)
    rows += sva(rng, "regular_plural_subject_verb_agreement_2", REGULAR, True)
    rows += sva(rng, "irregular_plural_subject_verb_agreement_1", IRREGULAR, False)
    rows += sva(rng, "irregular_plural_subject_verb_agreement_2", IRREGULAR, True)
    rows += anaphor_gender(rng) + anaphor_number(rng)
    rows += distractor(rng, "distractor_agreement_relational_noun", False)
    rows += distractor(rng, "distractor_agreement_relative_clause", True)
    return rows


if __name__ == "__main__":
    out = Path(__file__).with_name("blimp_mini.jsonl")
    with out.open("w") as f:
        for r in build():
            f.write(json.dumps(r) + "\n")
    print(f"wrote {out}")
