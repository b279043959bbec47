"""Issue 20: trying a prompt in the notebooks' "Your prompt" cells never changes a tracked file: the
figures go to the git-ignored results/<model>/your_prompt/<prompt>/, one folder per prompt and model."""
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

from kn_utils.notebooks import error_outputs, run_notebook
from tiny_models import save_tiny

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # executes notebook cells in a kernel


def _git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout


def _your_prompt_cells(name: str, first: int, last: int, tmp_path) -> Path:
    """The notebook cut to its parameters, set-up and "Your prompt" cells (cells ``first..last``)."""
    nb = nbformat.read(ROOT / name, as_version=4)
    code = [c for c in nb.cells[:first] if c.cell_type == "code"]
    nb.cells = code + [c for c in nb.cells[first:last + 1] if c.cell_type == "code"]
    assert any("your_prompt_folder" in c.source for c in nb.cells)
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
@pytest.mark.parametrize("name, first, last, params", [
    ("localise_kn.ipynb", 4, 8, dict(IG_STEPS=2)),
    ("ct_rome.ipynb", 3, 5, dict(SAMPLES=1)),
])
def test_your_prompt_leaves_the_checkout_clean(tmp_path, name, first, last, params):
    model_dir = save_tiny("llama", tmp_path / "tiny-llama")
    path = _your_prompt_cells(name, first, last, tmp_path)
    before = _git_status()
    # run against this checkout's package, with the default figure and results places (no overrides)
    env = {"PYTHONPATH": str(ROOT), "KN_RESULTS_DIR": None, "KN_FIGURES_DIR": None,
           "KN_UTILS_CACHE": str(tmp_path / "cache")}
    nb, _ = run_notebook(path, tmp_path / "out.ipynb", env=env, timeout=600,
                         parameters=dict(params, MODEL=str(model_dir), DEVICE="cpu"))
    try:
        assert error_outputs(nb) == []
        assert _git_status() == before
        written = sorted((ROOT / "results").glob("*tiny-llama*/your_prompt/*/*.png"))
        assert written and all(p.parent.parent.name == "your_prompt" for p in written)
        ignored = subprocess.run(["git", "check-ignore", "-q", str(written[0])], cwd=ROOT).returncode
        assert ignored == 0, f"{written[0]} is not git-ignored"
    finally:
        for folder in (ROOT / "results").glob("*tiny-llama*"):
            shutil.rmtree(folder)
