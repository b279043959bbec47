"""The notebook machinery (parameters, papermill runs, inline figures) and the stored notebooks."""
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from kn_utils import notebooks
from notebook_runs import ROOT, cells_without_figure, png_size

NOTEBOOKS = ["localise_kn.ipynb", "ct_rome.ipynb"]
MAX_BYTES = 4_000_000


# ------------------------------------------------------------------------------ the committed copies
def check_stored(path) -> bool:
    """Parameters the notebook way, the project's kernel, and outputs (if any) from the defaults with
    no error, every figure shown, images at a sensible resolution.  False: stored without outputs."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell must be tagged parameters"
    defaults = notebooks.default_parameters(path)
    for key in ("MODEL", "DEVICE", "DATA_DIR", "FIG_DIR"):
        assert key in defaults, key
    assert defaults["MODEL"] == "default" and defaults["DATA_DIR"] is None and defaults["FIG_DIR"] is None
    source = "".join(c.source for c in code)
    assert "os.environ" not in source and "KN_MODEL" not in source
    assert nb.metadata["kernelspec"]["name"] == "kn_utils"
    # stored parameters are the defaults: no injected cell, no papermill overrides recorded
    assert not [c for c in code if "injected-parameters" in c.metadata.get("tags", [])], "run with overrides"
    assert not nb.metadata.get("papermill", {}).get("parameters"), "run with overrides"
    assert notebooks.parameters(nb) == defaults
    assert notebooks.error_outputs(nb) == []
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes"
    if not any(c.outputs for c in code):
        return False
    assert all(c.execution_count for c in code), "cells never executed"
    assert not [msg for msg in cells_without_figure(nb).values() if msg.startswith("SILENT")]
    for cell in code:
        for out in cell.outputs:
            if "image/png" in out.get("data", {}):
                width, height = png_size(out["data"]["image/png"])
                assert width <= 2000 and height <= 2000, (width, height)
    return True


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_notebook(name):
    if not check_stored(ROOT / name):
        pytest.skip(f"{name} is stored without outputs (run `make notebooks` to store the executed copy)")


def test_stored_check_rejects_overrides_and_errors(tmp_path):
    from nbformat.v4 import new_output

    nb = nbformat.read(ROOT / NOTEBOOKS[0], as_version=4)
    injected = new_code_cell('N_PROMPTS = 2', metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(3, injected)
    nbformat.write(nb, tmp_path / "a.ipynb")
    with pytest.raises(AssertionError, match="run with overrides"):
        check_stored(tmp_path / "a.ipynb")
    nb.cells.remove(injected)
    nb.cells[-2].outputs = [new_output("error", ename="ValueError", evalue="bad", traceback=[])]
    nbformat.write(nb, tmp_path / "b.ipynb")
    with pytest.raises(AssertionError, match="ValueError: bad"):
        check_stored(tmp_path / "b.ipynb")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_branch_on_the_model_kind_not_its_name(name):
    code = [c.source for c in nbformat.read(ROOT / name, as_version=4).cells if c.cell_type == "code"]
    assert not re.search(r"[\"'](bert-|gpt2|roberta-)", "".join(code[1:]))  # a model name in code
    if name == "localise_kn.ipynb":
        assert "is_masked_lm" in "".join(code)


# ------------------------------------------------------------------------------------- run_notebook
def _notebook(tmp_path, *cells, params='X = 1\nY = "a"  # a comment\n'):
    nb = new_notebook(cells=[new_code_cell(params, metadata={"tags": ["parameters"]}),
                             *[new_code_cell(c) for c in cells]])
    nb.metadata["kernelspec"] = {"name": "kn_utils", "display_name": "kn_utils", "language": "python"}
    path = tmp_path / "t.ipynb"
    nbformat.write(nb, path)
    return path


def _stdout(nb):
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.slow  # executes both notebooks
def test_parameters_injection_in_place_and_inline_figures(tmp_path):
    plot = ("import torch\nfrom kn_utils.plotting import attribution as pa\n"
            "for i in range(2):\n    pa.plot_attribution_heatmap(torch.arange(60.).reshape(3, 20) * (i + 1), width=2)\n"
            "print('drawn')")
    path = _notebook(tmp_path, "print('values', X, Y)", plot)
    out = tmp_path / "out" / "t.ipynb"
    nb, _ = notebooks.run_notebook(path, out, parameters={"X": 5})
    assert "values 5 a" in _stdout(nb)
    assert notebooks.parameters(nbformat.read(out, as_version=4)) == {"X": 5, "Y": "a"}
    # every figure of a loop is shown inline, as a PNG
    assert notebooks.plotting_cells(nb) == [len(nb.cells) - 1]
    assert notebooks.image_count(nb.cells[-1]) == 2 and cells_without_figure(nb) == {}
    # re-run the executed copy in place without parameters: the stale injected cell goes, defaults return
    nb2, _ = notebooks.run_notebook(out)
    assert "values 1 a" in _stdout(nb2) and notebooks.parameters(nb2) == {"X": 1, "Y": "a"}
    assert not [c for c in nb2.cells if "injected-parameters" in c.metadata.get("tags", [])]
    # the command line: -p values read as Python literals, --out folder
    assert notebooks.main(["-p", "X", "12", "-p", "Y", "some text", "--out", str(tmp_path / "cli"),
                           str(path)]) == 0
    assert "values 12 some text" in _stdout(nbformat.read(tmp_path / "cli" / "t.ipynb", as_version=4))
    with pytest.raises(SystemExit):  # overrides never overwrite the notebook itself
        notebooks.main(["-p", "X", "2", str(path)])
    assert notebooks.parameters(nbformat.read(path, as_version=4)) == {"X": 1, "Y": "a"}


def test_run_notebook_bad_input(tmp_path):
    path = _notebook(tmp_path, "print(X)")
    with pytest.raises(ValueError, match=r"unknown parameters \['Z'\].*\['X', 'Y'\]"):
        notebooks.run_notebook(path, parameters={"Z": 1})
    with pytest.raises(FileNotFoundError, match="missing.ipynb"):
        notebooks.run_notebook(tmp_path / "missing.ipynb")
    bad = _notebook(tmp_path, "print(X)", params="import os\nX = os.getcwd()\n")
    with pytest.raises(ValueError, match="plain assignments"):
        notebooks.run_notebook(bad)
    untagged = tmp_path / "u.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("X = 1")]), untagged)
    with pytest.raises(ValueError, match="tagged 'parameters'"):
        notebooks.run_notebook(untagged)


def test_failing_cell_raises_and_keeps_its_traceback(tmp_path):
    import papermill

    path = _notebook(tmp_path, "raise RuntimeError('boom ' + str(X))")
    with pytest.raises(papermill.PapermillExecutionError, match="boom 1") as err:
        notebooks.run_notebook(path, tmp_path / "out.ipynb")
    assert not (tmp_path / "out.ipynb").exists()  # only a complete run replaces the target
    assert err.value.failed_copy == tmp_path / "out.failed.ipynb"
    assert notebooks.error_outputs(nbformat.read(tmp_path / "out.failed.ipynb", as_version=4)) == [
        "RuntimeError: boom 1"]


def test_figures_are_not_displayed_outside_a_notebook(tmp_path, monkeypatch):
    import torch

    from kn_utils import plotting

    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: shown.append(a))
    assert not plotting.in_notebook()
    fig = plotting.attribution.plot_attribution_heatmap(torch.ones(2, 5), save="h", folder=tmp_path)
    assert shown == [] and (tmp_path / "h.png").exists() and (tmp_path / "h.pdf").exists()
    monkeypatch.setattr(plotting.core, "in_notebook", lambda: True)
    plotting.finish(fig, None)
    assert len(shown) == 1 and shown[0][0].format == "png"


def test_interrupted_run_leaves_the_notebook_as_it_was(tmp_path, monkeypatch):
    """Issue 18: an interrupted in-place run must not leave a half-executed notebook behind."""
    import papermill

    path = _notebook(tmp_path, "print(X)")
    before = path.read_bytes()

    def interrupted(nb, output_path, **kwargs):
        Path(output_path).write_text("half-executed")  # papermill writes cell by cell
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        notebooks.run_notebook(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no partial file left either


@pytest.mark.parametrize("override, message", [
    (["-p", "Z", "3"], r"unknown parameters \['Z'\]"),
    (["-p", "X", "abc"], r"parameter X of t.ipynb must be of type int like its default 1, got 'abc' \(str\)"),
    (["-p", "Y", "[1]"], r"parameter Y .* must be of type str"),
    (["-p", "X", "True"], r"parameter X .* got True \(bool\)"),
])
def test_cli_refuses_bad_parameters_before_any_cell(tmp_path, capsys, override, message):
    path = _notebook(tmp_path, "open('ran', 'w').write('yes')")
    with pytest.raises(SystemExit) as exit_:
        notebooks.main([*override, "--out", str(tmp_path / "out"), str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()


def test_parameter_types_follow_the_defaults():
    nb = new_notebook(cells=[new_code_cell("A = 1\nB = 0.5\nC = None\nD = [1]\nE = 'x'\nF = True",
                                           metadata={"tags": ["parameters"]})])
    ok = {"A": 3, "B": 2, "C": "anything", "D": (2, 3), "E": "y", "F": False}
    assert notebooks.check_parameters(nb, ok)["A"] == 1
    for bad in ({"A": 1.5}, {"A": True}, {"B": "0.1"}, {"D": "1"}, {"E": 3}, {"F": 1}):
        with pytest.raises(ValueError, match=f"parameter {next(iter(bad))} "):
            notebooks.check_parameters(nb, bad)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_outputs_are_free_of_machine_paths_and_progress_bars(name):
    """Issue 20: what a reader sees carries no path of the machine that ran it, no stderr noise.
    (Checks the committed outputs: re-executed with ``make notebooks`` after the notebook change.)"""
    nb = nbformat.read(ROOT / name, as_version=4)
    home = str(Path.home())
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            text = out.get("text", "") + "".join(str(v) for k, v in out.get("data", {}).items()
                                                  if k.startswith("text/"))
            assert "Loading weights" not in text, (i, text[:200])
            assert str(ROOT) not in text and home not in text and "/work/" not in text, (i, text[:300])


def test_make_lab_keeps_allow_root_when_lab_args_are_overridden():
    import os
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("no make")
    cmd = ["make", "-n", "-s", "-o", ".venv/.installed", "lab", "LAB_ARGS=--no-browser --port 8890"]
    last = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    assert "jupyter lab" in last and "--no-browser --port 8890" in last
    assert ("--allow-root" in last) == (os.getuid() == 0)
    off = subprocess.run([*cmd, "LAB_ROOT_ARGS="], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "--allow-root" not in off
