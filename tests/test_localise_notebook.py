"""localise_kn.ipynb runs top to bottom (tiny sizes through its parameters): on a tiny decoder with no
data folder at all, on a tiny masked LM with the data sets, and on the real default model."""
import json
from pathlib import Path

import pytest

from kn_utils.notebooks import error_outputs, run_notebook
from notebook_runs import cells_without_figure, fresh_checkout
from tiny_models import save_tiny

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "localise_kn.ipynb"
TINY = dict(DEVICE="cpu", N_PROMPTS=2, N_EVAL=6, N_FACTS=1, N_PAIRS=4, IG_STEPS=2, RELATIONS=["P36"])
# the "Your prompt" figures: under $KN_RESULTS_DIR/<model>/your_prompt/<prompt>/, not among the figures
YOURS = ("attribution", "knowledge_neurons", "intervention_suppress", "intervention_enhance")

pytestmark = pytest.mark.slow  # notebook runs and the CLI end to end (the library: test_localisation.py)


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") if "text" in o else json.dumps(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def _check(nb, figures, want, skipped=()):
    assert error_outputs(nb) == []
    names = {p.name for p in figures.glob("*.png")}
    for name in want:
        assert any(n.endswith(f"_{name}.png") for n in names), (name, names)
    assert not any("your_prompt" in n for n in names), names
    yours = {p.name for p in (figures.parent / "results").glob("*/your_prompt/*/*.png")}
    assert yours == {f"{n}.png" for n in YOURS}, yours
    # every plotting cell shows its figures inline; only the listed ones skip, and say so
    missing = cells_without_figure(nb)
    assert sorted(missing.values()) == sorted(f"skipped: {first}" for first in skipped), missing


def test_notebook_tiny_decoder_without_data(tmp_path):
    root, env = fresh_checkout(tmp_path)
    model_dir = save_tiny("llama", tmp_path / "tiny-llama")
    figures = tmp_path / "figures"
    params = dict(TINY, MODEL=str(model_dir), FIG_DIR=str(figures),
                  PARADIGMS=["dna_1", "regular_plural_subject_verb_agreement_1"])
    nb, seconds = run_notebook(root / NOTEBOOK.name, tmp_path / "executed.ipynb", parameters=params,
                               env=dict(env, KN_RESULTS_DIR=str(tmp_path / "results")), timeout=600)
    _check(nb, figures, ("fig2b_kn_frequency", "fig2a_attribution_singular", "fig2a_attribution_plural",
                         "fig11_suppress_plural_verbs", "fig11_suppress_singular_verbs", "fig6b_blimp_accuracy",
                         "fig5b_layer_distribution"),
           skipped=["MODIFIERS = {\"plural\": [\"these\", \"those\", \"two\", \"both\", \"multiple\", \"several\", \"various\"],"])
    assert not any("fig3_" in p.name for p in figures.glob("*"))  # the modifier plot is for masked LMs only
    text = _text(nb)
    assert "built-in mini sets" in text and "causal LM" in text and "determiner_noun_agreement_1" in text
    print(f"localise_kn.ipynb, tiny decoder, no data: {seconds:.0f} s")


def test_notebook_tiny_masked_lm_with_data(tmp_path, data_dir):
    model_dir = tmp_path / "tiny-bert"
    save_tiny("bert", model_dir)
    figures = tmp_path / "figures"
    params = dict(TINY, MODEL=str(model_dir), FIG_DIR=str(figures), DATA_DIR=str(data_dir),
                  PARADIGMS=["dna_2", "with_adj_2"])
    nb, seconds = run_notebook(NOTEBOOK, tmp_path / "executed.ipynb", parameters=params, timeout=600,
                               env={"KN_RESULTS_DIR": str(tmp_path / "results")})
    _check(nb, figures, ("fig2b_kn_frequency", "fig3_suppress_plural_modifiers",
                         "fig3_suppress_singular_modifiers", "fig11_suppress_plural_verbs", "fig6b_blimp_accuracy",
                         "fig5b_layer_distribution"))
    text = _text(nb)
    assert "masked LM" in text and "determiner_noun_agreement_2" in text and "shared/data" in text
    # the data folder is shown relative to the checkout: no path of this machine in the outputs
    assert "data: /" not in text and str(data_dir.resolve()) not in text
    print(f"localise_kn.ipynb, tiny masked LM, data sets: {seconds:.0f} s")


@pytest.mark.slow
def test_notebook_default_model(tmp_path):
    figures = tmp_path / "figures"
    params = dict(TINY, MODEL="default", FIG_DIR=str(figures),
                  PARADIGMS=["dna_1", "regular_plural_subject_verb_agreement_1"])
    nb, seconds = run_notebook(NOTEBOOK, tmp_path / "executed.ipynb", parameters=params, timeout=900,
                               env={"KN_RESULTS_DIR": str(tmp_path / "results")})
    _check(nb, figures, ("fig2b_kn_frequency", "fig2a_attribution_singular", "fig2a_attribution_plural",
                         "fig11_suppress_plural_verbs", "fig11_suppress_singular_verbs", "fig6b_blimp_accuracy",
                         "fig5b_layer_distribution"),
           skipped=["MODIFIERS = {\"plural\": [\"these\", \"those\", \"two\", \"both\", \"multiple\", \"several\", \"various\"],"])
    text = _text(nb)
    assert "determiner_noun_agreement_1" in text and "P36" in text and "causal LM" in text
    assert "Loading weights" not in text
    shown = ["".join(o["data"]["text/markdown"]) for c in nb.cells for o in c.get("outputs", [])
             if "text/markdown" in o.get("data", {})]
    assert len(shown) == 1 and "What this run shows" in shown[0] and "suppressing the plural neuron" in shown[0]


def test_localise_command(tmp_path, data_dir):
    """`python -m kn_utils localise` on a tiny saved decoder: files, and numbers equal to a direct run."""
    import pandas as pd

    import kn_utils as ku
    from kn_utils.attribution import find_knowledge_neurons
    from kn_utils.cli import main
    from kn_utils.blimp_tasks import blimp_accuracy
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
        assert info["accuracy_before"] == blimp_accuracy(lm, ev)
        if info["neurons"]:
            assert info["accuracy_after_suppression"] == blimp_accuracy(
                lm, ev, neurons=[tuple(x) for x in info["neurons"]])
    # --n 1 is a user's mistake: argparse's one-line error and exit status 2 (kn_utils.cli's convention)
    with pytest.raises(SystemExit) as stop:
        main(args[:-2] + ["--out", str(out), "--n", "1"])
    assert stop.value.code == 2
