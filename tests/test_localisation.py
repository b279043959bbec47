"""kn_utils.localisation: the library function the localise command (and the notebook) call."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from kn_utils import localisation
from kn_utils.attribution import find_knowledge_neurons
from kn_utils.blimp_tasks import blimp_accuracy
from kn_utils.data import blimp

UID = "irregular_plural_subject_verb_agreement_1"


def test_localise_paradigm_returns_tables_that_match_a_direct_search(tiny, data_dir):
    lm = tiny("llama")
    loc = localisation.localise_paradigm(lm, "isva_1", n=3, eval_n=5, steps=2, data_dir=data_dir,
                                         progress=False)
    assert isinstance(loc.groups, pd.DataFrame) and isinstance(loc.prompts, pd.DataFrame)
    assert set(loc.groups["group"]) == set(loc.results) == set(loc.maps) == {"singular", "plural"}
    pairs = blimp.minimal_pairs(lm, UID, data_dir)
    for group, res in loc.results.items():
        sub = pairs[(pairs.group == group) & (pairs.n_good_tokens == 1)].head(3)
        # the same maps through find_knowledge_neurons directly: the same neurons and tau
        direct = find_knowledge_neurons(lm, list(sub.prompt), list(sub.good), maps=loc.maps[group],
                                        progress=False)
        row = loc.groups[loc.groups.group == group].iloc[0]
        assert res.neurons == direct.neurons and row.tau == direct.tau
        assert row.neurons == " ".join(localisation.neuron_label(x) for x in direct.neurons)
        rows = loc.prompts[loc.prompts.group == group]
        assert list(rows.prompt) == list(sub.prompt)
        for (_, r), m in zip(rows.iterrows(), loc.maps[group]):
            layer, unit = divmod(int(m.argmax()), m.shape[1])
            assert r.top_neuron == f"L{layer}.N{unit}" and r.max_score == pytest.approx(float(m.max()))
            want = sum(float(m[a, b]) for a, b in direct.neurons)
            assert r.kn_score_sum == pytest.approx(want, rel=1e-5, abs=1e-6)
        info = loc.summary["groups"][group]
        assert info["eval_pairs"] == 5 and info["accuracy_before"] == blimp_accuracy(lm, pairs.head(5))
    assert loc.groups.attrs["data_source"] == loc.prompts.attrs["data_source"] == loc.summary["data_source"]
    # old tuple shape of the command's helper
    summary, groups, prompts, maps = loc
    assert summary is loc.summary and groups is loc.groups and maps is loc.maps


def test_given_pairs_and_tau_mode_pass_through(tiny, data_dir, monkeypatch):
    lm = tiny("llama")
    pairs = blimp.minimal_pairs(lm, UID, data_dir)
    monkeypatch.setattr(blimp, "minimal_pairs", lambda *a, **k: pytest.fail("pairs were given"))
    seen = []
    real = localisation.find_knowledge_neurons
    monkeypatch.setattr(localisation, "find_knowledge_neurons",
                        lambda *a, **k: seen.append(k["tau_mode"]) or real(*a, **k))
    monkeypatch.setattr(localisation, "blimp_accuracy", lambda *a, **k: pytest.fail("accuracy=False"))
    loc = localisation.localise_paradigm(lm, UID, n=2, eval_n=2, steps=2, pairs=pairs,
                                         tau_mode="paper", accuracy=False, progress=False)
    assert seen == ["paper"] * len(loc.results) and loc.summary["tau_mode"] == "paper"
    assert all("accuracy_before" not in info for info in loc.summary["groups"].values())


@pytest.mark.parametrize("kwargs, match", [({"n": 1}, r"n \(prompts per group, --n\) must be an integer >= 2"),
                                           ({"n": 2.0}, "got 2.0"),
                                           ({"n": 2, "eval_n": 0}, r"eval_n .* got 0")])
def test_bad_sizes_are_refused_first(tiny, kwargs, match, monkeypatch):
    monkeypatch.setattr(blimp, "minimal_pairs", lambda *a, **k: pytest.fail("checked before loading"))
    with pytest.raises(ValueError, match=match):
        localisation.localise_paradigm(tiny("llama"), UID, **kwargs)


def test_the_command_is_a_thin_call():
    from kn_utils.commands import localise
    from kn_utils.plotting import attribution as plots

    assert localise.localise_paradigm is localisation.localise_paradigm
    assert plots.neuron_label is localisation.neuron_label
    assert len(open(localise.__file__).read().splitlines()) < 100
