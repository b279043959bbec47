"""ct_rome.ipynb runs top to bottom with tiny sizes on a tiny random LLaMA (the real model's tokenizer)."""
from pathlib import Path

import nbformat

from kn_utils.notebooks import error_outputs, run_notebook
from tiny_models import save_tiny

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "ct_rome.ipynb"
FIGURES = ("ct_fact", "ct_dna", "ct_sva", "aie_facts", "aie_dna", "aie_sva")


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    for name in ("KN_MODEL", "KN_DATA_DIR", "KN_FIGURES_DIR", "KN_N_FACTS", "KN_N_ITEMS", "KN_SAMPLES"):
        assert name in code[0].source


def test_notebook_runs_with_tiny_sizes(tmp_path, data_dir):
    model_dir = save_tiny("llama", tmp_path / "tiny-llama")
    figures = tmp_path / "figures"
    env = dict(KN_MODEL=model_dir, KN_DEVICE="cpu", KN_DATA_DIR=str(data_dir), KN_FIGURES_DIR=str(figures),
               KN_SAMPLES=1, KN_N_FACTS=1, KN_N_ITEMS=1, KN_N_EDITS=1, KN_RELATIONS="P36",
               KN_EDITORS="rome,kn", KN_ONLY_CORRECT=0, KN_UTILS_CACHE=str(tmp_path / "cache"))
    nb, seconds = run_notebook(NOTEBOOK, tmp_path / "executed.ipynb", env=env, timeout=600)
    assert error_outputs(nb) == []
    for name in FIGURES:
        assert (figures / f"{name}.png").exists() and (figures / f"{name}.pdf").exists(), name
    print(f"ct_rome.ipynb with tiny sizes: {seconds:.0f} s")
