"""Resources found through the package or the environment: an installed wheel, used from a folder
outside the repository, finds its built-in data and writes figures where the user is."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import kn_utils.plotting as kp
import kn_utils.resources as kr
from kn_utils import evaluation
from kn_utils.data import BUILTIN_DIR, counterfact, pararel

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_data_is_package_data():
    package = Path(kr.__file__).parent
    assert BUILTIN_DIR == kr.resource_dir() == package
    for name in ("synonyms.json", "builtin/pararel_mini.json", "builtin/known_facts.json",
                 "builtin/blimp_mini.jsonl"):
        assert (package / name).is_file(), name
    assert pararel.BUILTIN_BAGS.parent == package / "builtin"
    assert counterfact.BUILTIN_KNOWN.parent == package / "builtin"
    assert evaluation.synonyms() == json.loads((package / "synonyms.json").read_text())["field_to_occupation"]


def test_checkout_is_recognised_by_its_pyproject(tmp_path, monkeypatch):
    assert kr.checkout_root() == ROOT
    kr.checkout_root.cache_clear()
    monkeypatch.setattr(kr, "_PACKAGE_ROOT", tmp_path)  # a site-packages folder: no pyproject.toml
    try:
        assert kr.checkout_root() is None
        (tmp_path / "pyproject.toml").write_text('[project]\nname = "something_else"\n')
        assert kr.checkout_root() is None  # someone else's project above the package
    finally:
        kr.checkout_root.cache_clear()


def test_figures_dir_order(tmp_path, monkeypatch):
    monkeypatch.delenv("KN_FIGURES_DIR", raising=False)
    assert kp.figures_dir() == ROOT / "figures"
    with pytest.warns(DeprecationWarning, match=r"figures_dir\(\).*|0\.2"):
        assert kp.FIGURES_DIR == ROOT / "figures"  # the old constant's name answers, with a warning
    monkeypatch.setenv("KN_FIGURES_DIR", "  ")  # blank means not set
    assert kp.figures_dir() == ROOT / "figures"
    monkeypatch.setenv("KN_FIGURES_DIR", str(tmp_path / "mine"))
    assert kp.figures_dir() == tmp_path / "mine"
    monkeypatch.delenv("KN_FIGURES_DIR")
    monkeypatch.setattr(kp.core, "checkout_root", lambda: None)  # as in an installed wheel
    monkeypatch.chdir(tmp_path)
    assert kp.figures_dir() == tmp_path / "figures"


def test_save_figure_without_folder_uses_figures_dir(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    monkeypatch.setenv("KN_FIGURES_DIR", str(tmp_path / "out"))
    fig = Figure()
    fig.subplots().plot([0, 1])
    paths = kp.save_figure(fig, "probe")
    assert paths == [tmp_path / "out" / "probe.png", tmp_path / "out" / "probe.pdf"]
    assert all(p.stat().st_size > 0 for p in paths)


_SCRIPT = r"""
import json, os, sys, warnings
from pathlib import Path
import kn_utils
from kn_utils import evaluation, plotting
from kn_utils.data import BuiltinDataWarning, data_root, pararel, counterfact
from matplotlib.figure import Figure

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    bags = pararel.load_bags("P36", n=2)
    facts = counterfact.load_known_facts(n=3)
fig = Figure()
fig.subplots().plot([0, 1])
saved = plotting.save_figure(fig, "wheel_probe")
print(json.dumps({"file": kn_utils.__file__, "data_root": str(data_root()), "synonyms": len(evaluation.synonyms()),
                  "bags": len(bags), "bag_source": bags.source, "facts": len(facts),
                  "builtin_warnings": sum(issubclass(w.category, BuiltinDataWarning) for w in caught),
                  "saved": [str(p) for p in saved], "figures_dir": str(plotting.figures_dir())}))
"""


@pytest.mark.slow
def test_installed_wheel_finds_its_resources_outside_the_repository(tmp_path):
    # Build from a copy, so that an in-tree build leaves no build/ or egg-info in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "kn_utils", src / "kn_utils", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KN_DATA_DIR", "KN_FIGURES_DIR")}
    env.update(OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(src)], check=True, env=env, timeout=300)
    (wheel,) = wheels.glob("kn_utils-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert {"kn_utils/resources/synonyms.json", "kn_utils/resources/builtin/pararel_mini.json",
            "kn_utils/resources/builtin/blimp_mini.jsonl"} <= names
    assert "kn_utils/cli.py" in names and "kn_utils/plotting/tracing.py" in names

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, env=env, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=work, env={**env, "PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve() == (target / "kn_utils" / "__init__.py").resolve()
    assert got["data_root"] == "None"  # no checkout, so no ../shared/data beside it
    assert got["synonyms"] == len(evaluation.synonyms()) > 0
    assert got["bags"] == 2 and got["bag_source"].startswith("builtin:pararel_mini.json")
    assert got["facts"] == 3 and got["builtin_warnings"] == 2
    assert got["figures_dir"] == str(work / "figures")
    assert got["saved"] == [str(work / "figures" / "wheel_probe.png"), str(work / "figures" / "wheel_probe.pdf")]
    assert all(Path(p).stat().st_size > 0 for p in got["saved"])
    assert not list(target.rglob("wheel_probe.*"))  # nothing written into the installed package


# ---------------------------------------------------------------------------- one plotting convention
def test_every_plot_function_takes_save_and_folder():
    import inspect

    for fname in kp.__all__ if hasattr(kp, "__all__") else dir(kp):
        if not fname.startswith("plot_"):
            continue
        params = inspect.signature(getattr(kp, fname)).parameters
        assert "save" in params and "folder" in params, fname


def test_old_name_argument_still_saves_with_a_deprecation_warning(tmp_path):
    import pandas as pd

    sweep = pd.DataFrame({"layer": [0, 1], "efficacy": [0.5, 1.0], "paraphrase": [0.2, 0.4]})
    kp.plot_edit_success_by_layer(sweep, save="new", folder=tmp_path)
    with pytest.warns(DeprecationWarning, match=r"plot_edit_success_by_layer\(name=...\) is deprecated"):
        kp.plot_edit_success_by_layer(sweep, name="old", folder=tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"new.png", "new.pdf", "old.png", "old.pdf"}
    with pytest.raises(TypeError, match="pass only save="):
        kp.plot_edit_success_by_layer(sweep, save="a", name="b", folder=tmp_path)
    assert len(list(tmp_path.iterdir())) == 4
