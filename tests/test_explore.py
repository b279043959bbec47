"""kn_utils.explore (the notebooks' "Your prompt" calls) against direct library calls, on tiny models."""
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

import kn_utils as ku  # noqa: E402
from kn_utils import explore  # noqa: E402
from kn_utils.attribution import coarse_neurons  # noqa: E402
from kn_utils.editing.rome import ROMEHyperParams  # noqa: E402

PROMPTS = ["The capital of France is", "France has its capital city in", "The French capital is"]


def test_top_tokens_is_predict(tiny):
    lm = tiny("llama")
    table = explore.top_tokens(lm, PROMPTS[0], k=7)
    assert list(zip(table.token, table.probability)) == ku.predict(lm, PROMPTS[0], top_k=7)
    assert list(table.index) == list(range(1, 8))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        explore.top_tokens(lm, PROMPTS[0], k=0)


def test_attribution_map_top_neurons_and_labelled_heatmap(tiny, tmp_path):
    lm = tiny("llama")
    att = explore.attribution(lm, PROMPTS[0], "Paris", steps=3, top=4, save="mine", folder=tmp_path)
    direct = ku.integrated_gradients(lm, PROMPTS[0], "Paris", steps=3)
    torch.testing.assert_close(att.scores, direct, rtol=1e-4, atol=1e-6)
    # the top table: the 4 largest scores, found by a sort over every (layer, neuron)
    cells = sorted(((float(att.scores[l, n]), (l, n)) for l in range(att.scores.shape[0])
                    for n in range(att.scores.shape[1])), reverse=True)[:4]
    assert att.neurons == [c[1] for c in cells]
    assert att.top.score.tolist() == pytest.approx([c[0] for c in cells])
    assert att.probability == pytest.approx(ku.target_probability(lm, PROMPTS[0], "Paris"))
    labels = {t.get_text() for t in att.figure.axes[0].texts}
    assert labels == {f"L{l}.N{n}" for l, n in att.neurons} == set(att.top.label)
    assert (tmp_path / "mine.png").exists()
    with pytest.raises(ValueError, match="target"):
        explore.attribution(lm, PROMPTS[0], "  ")
    with pytest.raises(ValueError, match="steps"):
        explore.attribution(lm, PROMPTS[0], "Paris", steps=0)


def test_knowledge_neurons_match_the_direct_search(tiny):
    lm = tiny("llama")
    kns = explore.knowledge_neurons(lm, PROMPTS, "Paris", steps=3, threshold=0.1)
    direct = ku.find_knowledge_neurons(lm, PROMPTS, "Paris", steps=3, threshold=0.1, progress=False)
    assert kns.neurons == direct.neurons and kns.result.tau == direct.tau
    assert len(kns.table) == len(kns.neurons) > 0
    maps = ku.attribution_maps(lm, PROMPTS, ["Paris"] * 3, steps=3, progress=False)
    for row in kns.table.itertuples():
        n = (row.layer, row.neuron)
        assert row.status == "KN"
        assert row._5 == sum(n in coarse_neurons(m, threshold=0.1) for m in maps)  # "coarse in prompts"
        assert row._6 == pytest.approx(float(maps[:, row.layer, row.neuron].mean()), rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="at least 2 paraphrases"):
        explore.knowledge_neurons(lm, PROMPTS[:1], "Paris")


def test_intervention_matches_hooks_and_leaves_none(tiny, tmp_path):
    lm = tiny("llama")
    neurons = [(2, 5), (1, 17)]
    words = ["Paris", "London", "the"]
    table = explore.intervention(lm, PROMPTS, "Paris", neurons, others=words[1:], factor=3.0, save="iv",
                                 folder=tmp_path)
    assert list(table.word) == words and list(table.role) == ["target", "other", "other"]

    def mean_p(word):
        return sum(ku.target_probability(lm, p, word) for p in PROMPTS) / len(PROMPTS)

    for row in table.itertuples(index=False):
        assert row[2] == pytest.approx(mean_p(row.word), rel=1e-4)               # p before
        with ku.suppress(lm, neurons, positions=-1):
            assert row[3] == pytest.approx(mean_p(row.word), rel=1e-4)           # p suppressed
        with ku.enhance(lm, neurons, factor=3.0, positions=-1):
            assert row[4] == pytest.approx(mean_p(row.word), rel=1e-4)           # p enhanced
        assert row[5] == pytest.approx((row[3] - row[2]) / min(row[3], row[2]), rel=1e-6)
    assert ku.hook_count(lm.model) == 0
    assert (tmp_path / "iv_suppress.png").exists() and (tmp_path / "iv_enhance.png").exists()
    with pytest.raises(ValueError, match="no neurons"):
        explore.intervention(lm, PROMPTS, "Paris", [])
    with pytest.raises(ValueError):
        explore.intervention(lm, PROMPTS, "Paris", [(99, 0)])
    assert ku.hook_count(lm.model) == 0


def test_trace_is_causal_trace_per_kind(tiny, tmp_path):
    lm = tiny("llama")
    prompt, subject = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
    traces = explore.trace(lm, prompt, subject, samples=2, kinds=("hidden", "mlp"), save="tr", folder=tmp_path)
    for kind, tr in traces.items():
        direct = ku.causal_trace(lm, prompt, subject, kind=kind, samples=2)
        assert torch.equal(tr.scores, direct.scores) and tr.low_score == direct.low_score
    summary = explore.trace_summary(traces)
    best = traces["mlp"].scores
    assert summary.loc["mlp", "peak p"] == pytest.approx(float(best.max()))
    assert summary.loc["mlp", "peak layer"] == int(best.argmax()) % best.shape[1]
    assert (tmp_path / "tr.png").exists() and (tmp_path / "tr.pdf").exists()
    with pytest.raises(ValueError, match="not in the prompt"):
        explore.trace(lm, prompt, "Louvre")
    with pytest.raises(ValueError, match="kinds"):
        explore.trace(lm, prompt, subject, kinds=("mlp", "neurons"))


def test_rome_story_before_after_restored(tiny):
    lm = tiny("llama")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    hp = ROMEHyperParams(layer=1, v_num_grad_steps=8, context_template_length_params=[[3, 2]],
                         mom2_adjustment=False)
    df = explore.rome_story(lm, "The capital of Canada is", "Canada", "Rome", reverse="Rome is the capital of",
                            others=["Ottawa is the capital of"], hparams=hp, tokens=4)
    assert list(df.stage) == ["before"] * 3 + ["after edit"] * 3 + ["restored"] * 3
    assert list(df.probe[:3]) == ["edited prompt", "reverse question", "other"]
    # each probe's own answer: the new one for the prompt and the others, the subject for the reverse
    assert list(df.answer[:3]) == ["Rome", "Canada", "Rome"]
    assert df["p(answer)"][1] == pytest.approx(ku.target_probability(lm, "Rome is the capital of", "Canada"))
    p_new = df["p(answer)"].to_numpy()
    assert p_new[3] > p_new[0]                                   # the edit raised the new answer
    assert list(p_new[6:]) == list(p_new[:3])                    # restored = before, exactly
    assert list(df.continuation[6:]) == list(df.continuation[:3])
    assert df.attrs["restored_exactly"] is True
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), n
    with pytest.raises(ValueError, match="not in the prompt"):
        explore.rome_story(lm, "The capital of Canada is", "France", "Rome", hparams=hp)


def test_rome_hparams_without_a_corpus(tiny, tmp_path, monkeypatch):
    import importlib.util

    lm = tiny("llama")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    monkeypatch.setattr("kn_utils.data.text.data_root", lambda data_dir=None: None)
    with pytest.warns(UserWarning, match="covariance adjustment"):
        hp = explore.rome_hparams(lm, config="rome")
    assert hp.mom2_adjustment is False
    with pytest.warns(UserWarning, match="random texts"):   # ROME's count, smaller on the CPU
        assert ROMEHyperParams.for_model(lm, "rome").mom2_adjustment is True  # the preset is untouched
    assert explore.rome_hparams(lm).mom2_adjustment is False   # the paper's configuration needs no C


def test_continuation_needs_a_causal_lm(tiny):
    with pytest.raises(ValueError, match="masked LM"):
        explore.continuation(tiny("bert"), "The capital of France is [MASK].")
    lm = tiny("llama")
    assert explore.continuation(lm, PROMPTS[0], 3) == explore.continuation(lm, PROMPTS[0], 3)


def test_knowledge_neurons_closest_set_is_never_called_a_kn(tiny):
    """Issue 20: when no tau gives the wanted count, the closest set is shown, the relaxed rule is
    named, and neither the table nor the figure calls those neurons KNs."""
    lm = tiny("llama")
    maps = ku.attribution_maps(lm, PROMPTS, ["Paris"] * 3, steps=3, progress=False)
    # too many: every tau keeps more than one neuron, or jumps from many to none
    kns = explore.knowledge_neurons(lm, PROMPTS, "Paris", steps=3, threshold=0.05, min_neurons=1, max_neurons=1)
    direct = ku.find_knowledge_neurons(lm, PROMPTS, "Paris", maps=maps, threshold=0.05, min_neurons=1,
                                       max_neurons=1, progress=False)
    assert not direct.converged and kns.neurons == direct.neurons == []
    assert len(kns.closest) == 1 and kns.chosen == kns.closest
    assert "rule relaxed: the count (1-1)" in kns.relaxed and direct.message in kns.relaxed
    mean = maps.mean(0)
    tau = max(t for t, k in direct.history if k > 1)
    pool = [n for n, c in direct.counts.items() if c > tau * 3]
    assert kns.closest == [max(pool, key=lambda n: float(mean[n]))]    # the best of the nearest set
    assert list(kns.table.status) == ["closest set (relaxed, not a KN)"]
    assert [t.get_text() for t in kns.figure.axes[0].texts] == ["candidate " + kns.table.label[0]]
    assert "not KNs" in kns.figure.axes[0].get_title()
    # too few: the minimum is relaxed, and said so
    few = explore.knowledge_neurons(lm, PROMPTS, "Paris", steps=3, threshold=0.1, min_neurons=500, max_neurons=600)
    assert few.neurons == [] and "rule relaxed: the minimum count (500)" in few.relaxed
    assert 0 < len(few.closest) < 500


def test_paraphrases_from_pararel_patterns_else_generic(data_dir):
    par = explore.paraphrases("The capital of France is", n=5, data_dir=data_dir)
    assert par[0] == "The capital of France is" and len(par) >= 5 and "ParaRel P36" in par.source
    assert "France's capital is" in par and all("France" in p for p in par)
    generic = explore.paraphrases("My cat likes to sleep on the", n=5, data_dir=data_dir)
    assert len(generic) == 5 and "GENERIC_FRAMES" in generic.source
    assert all(p.endswith("My cat likes to sleep on the") for p in generic)
    assert len(set(generic)) == 5


def test_knowledge_neurons_of_one_prompt_use_its_paraphrases(tiny, data_dir):
    lm = tiny("llama")
    kns = explore.knowledge_neurons(lm, "The capital of France is", "Paris", steps=2, data_dir=data_dir)
    assert len(kns.prompts) >= 5 and kns.prompts[0] == "The capital of France is"


def test_known_examples_use_the_models_own_check(tiny):
    import pandas as pd

    lm = tiny("llama")
    from kn_utils.tracing import filter_known

    prompts = ["The capital of France is", "The Eiffel Tower is in", "Water is made of", "Snow is"]
    top1 = [ku.predict(lm, p, 1)[0][0] for p in prompts]
    cands = pd.DataFrame({"prompt": prompts, "attribute": [top1[0], "zzzq", top1[2], top1[3]]})
    cands.attrs["source"] = "/somewhere/else/facts.json"
    known = list(filter_known(lm, cands).prompt)
    assert prompts[0] in known and prompts[1] not in known        # the model's own top-1 decides
    got = explore.known_examples(lm, n=2, candidates=cands)
    assert list(got.prompt) == known[:2]
    assert not got.attrs["source"].startswith("/")                # shown relative, not as a machine path
    with pytest.raises(ValueError, match="none of the 1 candidate"):
        explore.known_examples(lm, candidates=cands.iloc[[1]])


def test_where_your_prompt_results_go_and_sweeps(tiny):
    from kn_utils.resources import checkout_root

    lm = tiny("llama")
    a = explore.your_prompt_folder(lm, "The capital of France is")
    b = explore.your_prompt_folder(lm, "The capital of Spain is")
    assert a != b and a.parent == b.parent and a.parts[-3:-1] == (a.parts[-3], "your_prompt")
    assert a.relative_to(checkout_root()).parts[0] == "results"
    assert explore.layer_sweep_file(lm) is None                  # a tiny model has no sweep
    lm.name = "gemma-3-270m"
    assert explore.layer_sweep_file(lm).name == "layer_sweep_gemma_paper.csv"
    lm.name = "default"
    assert explore.layer_sweep_file(lm).name == "layer_sweep.csv"
    assert explore.shown_path(f"data: {checkout_root()}/x/y.json (3 items)") == "data: x/y.json (3 items)"


def test_relative_paths_rewrites_only_the_folder_asked_for(tmp_path):
    from kn_utils.resources import relative_paths

    data = tmp_path / "shared" / "data"
    out = tmp_path / "repo" / "reports" / "m"
    text = f"Data: {data}/pararel/x.json (3 items); model {tmp_path}/models/y; `{{'d': '{data}'}}` | {data}/b.csv |"
    got = relative_paths(text, out, under=data)
    assert got == (f"Data: ../../../shared/data/pararel/x.json (3 items); model {tmp_path}/models/y; "
                   f"`{{'d': '../../../shared/data'}}` | ../../../shared/data/b.csv |")
    # every absolute path when no folder is named
    assert str(tmp_path) not in relative_paths(text, out)
