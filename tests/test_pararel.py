import json

import pytest

from kn_utils.data import pararel
from kn_utils.data.pararel import (Bag, causal_prompts, causal_templates, derive_patterns, load_bags,
                                   recover_subject, relations)


@pytest.fixture
def no_data(monkeypatch):
    """Pretend there is no data directory: the built-in mini set is used."""
    monkeypatch.setattr(pararel, "data_root", lambda data_dir=None: None)


def test_full_bags_subjects_and_templates(data_dir):
    bags = load_bags("P36", data_dir=data_dir)
    assert len(bags) == 703 and all(len(b.prompts) == 14 for b in bags)
    first = bags[0]
    assert (first.subject, first.object, first.label) == ("Azerbaijan", "Baku", "capital")
    assert first.templates[0] == "The capital of [X] is [Y] ."
    for bag in bags:
        for prompt, template in zip(bag.prompts, bag.templates):
            assert bag.subject in prompt
            assert template.replace("[X]", bag.subject).replace("[Y]", "[MASK]") == prompt
    assert len(load_bags("P1376", data_dir=data_dir)) == 234
    assert load_bags("P1376", data_dir=data_dir, n=1)[0].subject == "Edmonton"
    p101 = load_bags("P101", data_dir=data_dir, n=5)
    assert len(p101) == 5 and p101[0].subject == "Alan Turing" and p101[0].object == "logic"


def test_subjects_agree_with_query_pairs(data_dir):
    # Dai et al.'s query_pairs.json lists (subject, object) per relation: every recovered subject
    # must be one of them, for every relation in the file.
    pairs = json.loads((data_dir / "pararel/knowledge-neurons/query_pairs.json").read_text())
    for rel in ("P36", "P1376", "P101", "P136", "P19", "P279"):
        known = {" ".join(s.split()) for s, _ in pairs[rel]}
        bags = load_bags(rel, data_dir=data_dir)
        missing = [b.subject for b in bags if b.subject not in known]
        assert not missing, (rel, missing[:5])


def test_ambiguous_patterns_vote():
    # "[X] plays [Y] music" also matches "John Cage, who plays [MASK] music": the majority wins.
    patterns = ["[X] plays [Y] music .", "[X], who plays [Y] music", "musicians such as [X] play [Y] music"]
    prompts = ["John Cage plays [MASK] music .", "John Cage, who plays [MASK] music",
               "musicians such as John Cage play [MASK] music"]
    assert recover_subject(prompts, patterns) == "John Cage"
    with pytest.raises(ValueError, match="no pattern"):
        recover_subject(["nothing here [MASK]"], patterns)


def test_causal_prompts():
    bag = Bag("P36", "Azerbaijan", "Baku",
              ("The capital of Azerbaijan is [MASK] .", "[MASK] is the capital of Azerbaijan.",
               "Azerbaijan's capital, [MASK].", "Azerbaijan, which has [MASK] as capital."),
              ("The capital of [X] is [Y] .", "[Y] is the capital of [X].", "[X]'s capital, [Y].",
               "[X], which has [Y] as capital."))
    assert causal_prompts(bag) == ["The capital of Azerbaijan is", "Azerbaijan's capital,"]
    assert causal_templates(bag) == ["The capital of [X] is", "[X]'s capital,"]


def test_builtin_fallback(no_data):
    assert set(relations()) >= {"P36", "P1376", "P101"}
    p36 = load_bags("P36")
    assert [b.subject for b in p36[:3]] == ["France", "Germany", "Italy"]
    assert p36[0].object == "Paris" and "The capital of France is" in causal_prompts(p36[0])
    assert load_bags("P1376", n=2)[1].subject == "Cardiff"
    p101 = load_bags("P101")
    assert {b.subject for b in p101} >= {"Albert Einstein", "Ludwig van Beethoven"}
    for bag in p36 + p101:
        assert all(t.count("[X]") == 1 and t.count("[Y]") == 1 for t in bag.templates)


def test_derived_patterns_match_pattern_files(data_dir):
    # Without pattern files the patterns come from the bags; on real data they must equal the files'.
    raw = json.loads((data_dir / "pararel/data_all_allbags.json").read_text())["P36"][:50]
    derived = derive_patterns([[" ".join(p.split()) for p, _, _ in bag] for bag in raw])
    files = [json.loads(line)["pattern"] for line in
             (data_dir / "pararel/knowledge-neurons/patterns/P36.jsonl").read_text().splitlines()]
    assert sorted(derived) == sorted(files)


def test_word_boundary_snapping():
    bags = [["The capital of Canada is [MASK] ."], ["The capital of Cameroon is [MASK] ."]]
    assert derive_patterns(bags) == ["The capital of [X] is [Y] ."]


def test_bad_inputs(no_data):
    with pytest.raises(ValueError, match="P36"):
        load_bags("P9999")
    with pytest.raises(ValueError, match="relation"):
        load_bags("")
    with pytest.raises(ValueError, match="n must"):
        load_bags("P36", n=-1)
