"""localise_kn.ipynb runs top to bottom (tiny sizes) on the default decoder and on a masked LM."""
import json
from pathlib import Path

import nbformat
import pytest

from kn_utils.notebooks import error_outputs, run_notebook
from tiny_models import save_tiny

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "localise_kn.ipynb"
TINY = dict(KN_N_PROMPTS=2, KN_N_EVAL=6, KN_N_FACTS=1, KN_N_PAIRS=4, KN_IG_STEPS=2, KN_RELATIONS="P36")


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") if "text" in o else json.dumps(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    first = code[0].source
    for name in ("KN_MODEL", "KN_N_PROMPTS", "KN_DATA_DIR", "KN_FIGURES_DIR"):
        assert name in first
    # branches on the model's kind, never on its name
    assert "is_masked_lm" in "".join(c.source for c in code) and "bert-base" not in first


@pytest.mark.slow
def test_notebook_default_model(tmp_path):
    figures = tmp_path / "figures"
    env = dict(TINY, KN_MODEL="default", KN_FIGURES_DIR=figures,
               KN_PARADIGMS="dna_1,regular_plural_subject_verb_agreement_1")
    nb, seconds = run_notebook(NOTEBOOK, tmp_path / "executed.ipynb", env=env, timeout=600)
    assert error_outputs(nb) == []
    names = {p.name for p in figures.glob("*.png")}
    for want in ("fig2b_kn_frequency", "fig2a_attribution_singular", "fig2a_attribution_plural",
                 "fig11_suppress_plural_verbs", "fig11_suppress_singular_verbs", "fig6b_blimp_accuracy",
                 "fig5b_layer_distribution"):
        assert any(n.endswith(f"_{want}.png") for n in names), (want, names)
    assert not any("fig3_" in n for n in names)  # the modifier plot is for masked LMs only
    text = _text(nb)
    assert "determiner_noun_agreement_1" in text and "P36" in text and "causal LM" in text


@pytest.mark.slow
def test_notebook_masked_lm_path(tmp_path):
    model_dir = tmp_path / "tiny-bert"
    save_tiny("bert", model_dir)
    figures = tmp_path / "figures"
    env = dict(TINY, KN_MODEL=model_dir, KN_FIGURES_DIR=figures,
               KN_PARADIGMS="dna_2,with_adj_2")
    nb, seconds = run_notebook(NOTEBOOK, tmp_path / "executed.ipynb", env=env, timeout=600)
    assert error_outputs(nb) == []
    names = {p.name for p in figures.glob("*.png")}
    for want in ("fig2b_kn_frequency", "fig3_suppress_plural_modifiers", "fig3_suppress_singular_modifiers",
                 "fig11_suppress_plural_verbs", "fig6b_blimp_accuracy", "fig5b_layer_distribution"):
        assert any(n.endswith(f"_{want}.png") for n in names), (want, names)
    text = _text(nb)
    assert "masked LM" in text and "determiner_noun_agreement_2" in text


def test_localise_command(tmp_path, data_dir):
    """`python -m kn_utils localise` on a tiny saved decoder: files, and numbers equal to a direct run."""
    import pandas as pd

    import kn_utils as ku
    from kn_utils.attribution import find_knowledge_neurons
    from kn_utils.cli import main
    from kn_utils.data import blimp

    model_dir = tmp_path / "tiny-llama"
    save_tiny("llama", model_dir)
    out = tmp_path / "results"
    args = ["localise", "--model", str(model_dir), "--device", "cpu", "--paradigm", "isva_1", "--n", "3",
            "--steps", "3", "--data-dir", str(data_dir), "--out", str(out)]
    assert main(args) == 0
    uid = "irregular_plural_subject_verb_agreement_1"
    summary = json.loads((out / f"localise_{uid}.json").read_text())
    groups = pd.read_csv(out / f"localise_{uid}_groups.csv")
    prompts = pd.read_csv(out / f"localise_{uid}_prompts.csv")
    assert set(summary["groups"]) == {"singular", "plural"} == set(groups["group"])
    assert len(prompts) == 6 and set(prompts.columns) >= {"prompt", "target", "max_score", "top_neuron",
                                                          "n_coarse", "kn_score_sum"}
    for suffix in ("singular_heatmap", "plural_heatmap", "layers"):
        assert (out / "figures" / f"{uid}_{suffix}.png").exists()
    lm = ku.load_model(str(model_dir), device="cpu")
    pairs = blimp.minimal_pairs(lm, uid, data_dir)
    for group, info in summary["groups"].items():
        sub = pairs[(pairs.group == group) & (pairs.n_good_tokens == 1)].head(3)
        assert list(prompts[prompts.group == group].prompt) == list(sub.prompt)
        direct = find_knowledge_neurons(lm, list(sub.prompt), list(sub.good), steps=3, progress=False)
        assert [list(x) for x in direct.neurons] == info["neurons"]
        assert info["tau"] == direct.tau and info["r2"] == pytest.approx(direct.r2, abs=1e-6)
        ev = pairs.head(6)
        assert info["accuracy_before"] == blimp.accuracy(lm, ev)
        if info["neurons"]:
            assert info["accuracy_after_suppression"] == blimp.accuracy(
                lm, ev, neurons=[tuple(x) for x in info["neurons"]])
    with pytest.raises(ValueError, match="--n"):
        main(args[:-2] + ["--out", str(out), "--n", "1"])
