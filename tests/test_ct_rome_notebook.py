"""ct_rome.ipynb runs top to bottom with tiny sizes (through its parameters) on a tiny random LLaMA (the
real model's tokenizer): once with no data folder at all, once with the data sets."""
from pathlib import Path

import pytest

from kn_utils.notebooks import error_outputs, run_notebook
from notebook_runs import cells_without_figure, fresh_checkout, stream_text
from tiny_models import save_tiny

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "ct_rome.ipynb"
FIGURES = ("ct_fact", "ct_dna", "ct_sva", "aie_facts", "aie_dna", "aie_sva")
TINY = dict(DEVICE="cpu", SAMPLES=1, N_FACTS=1, N_ITEMS=1, N_EDITS=1, RELATIONS=["P36"], EDITORS=["rome", "kn"],
            ONLY_CORRECT=False)

pytestmark = pytest.mark.slow  # each test executes the notebook (tiers: see conftest.py)


def _run(tmp_path, notebook, params, env):
    model_dir = save_tiny("llama", tmp_path / "tiny-llama")
    figures = tmp_path / "figures"
    env = dict(env, KN_UTILS_CACHE=str(tmp_path / "cache"),  # ROME statistics of the tiny model
               KN_RESULTS_DIR=str(tmp_path / "results"))     # the "Your prompt" figures
    nb, seconds = run_notebook(notebook, tmp_path / "executed.ipynb", env=env, timeout=600,
                               parameters=dict(TINY, MODEL=str(model_dir), FIG_DIR=str(figures), **params))
    assert error_outputs(nb) == []
    for name in FIGURES:
        assert (figures / f"{name}.png").exists() and (figures / f"{name}.pdf").exists(), name
    assert [p.name for p in (tmp_path / "results").glob("*/your_prompt/*/*.png")] == ["trace.png"]
    # the ROME stories: three stages, the edit undone bit for bit
    text = "".join(stream_text(c) for c in nb.cells)
    assert text.count("weights restored bit for bit") == 2 and "restored bit for bit: False" not in text
    return nb, seconds


def test_notebook_without_data(tmp_path):
    root, env = fresh_checkout(tmp_path)
    nb, seconds = _run(tmp_path, root / NOTEBOOK.name, {}, env)
    # the layer sweep's CSV lives in benchmarks/, which a checkout of the package alone lacks
    missing = cells_without_figure(nb)
    assert list(missing.values()) == ["skipped: sweep_csv = explore.layer_sweep_file(lm)   # this model's own "
                                      "sweep, or None"], missing
    print(f"ct_rome.ipynb, tiny sizes, no data: {seconds:.0f} s")


def test_notebook_with_data(tmp_path, data_dir):
    nb, seconds = _run(tmp_path, NOTEBOOK, {"DATA_DIR": str(data_dir)}, {})
    # a tiny model has no layer sweep of its own (the default model's is not shown for it)
    assert [m.split(":")[0] for m in cells_without_figure(nb).values()] == ["skipped"]
    assert "no layer sweep for this model" in "".join(stream_text(c) for c in nb.cells)
    assert not (tmp_path / "figures" / "rome_layer_sweep.png").exists()
    print(f"ct_rome.ipynb, tiny sizes, data sets: {seconds:.0f} s")
