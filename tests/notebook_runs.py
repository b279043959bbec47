"""Helpers of the notebook tests: a checkout with no data folder beside it, and figure checks."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from kn_utils.notebooks import image_count, plotting_cells

ROOT = Path(__file__).resolve().parents[1]


def fresh_checkout(tmp_path) -> tuple[Path, dict]:
    """A copy of the package, its built-in data and the notebooks in a folder with no ``../shared``
    beside it, and the kernel environment that imports that copy with ``KN_DATA_DIR`` unset: the
    notebooks then see no data folder at all, as on a fresh machine."""
    root = tmp_path / "fresh" / "kn_utils_repo"
    for name in ("kn_utils",):  # the built-in data is package data inside it
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for nb in ROOT.glob("*.ipynb"):
        shutil.copy(nb, root / nb.name)
    env = {k: v for k, v in os.environ.items() if k != "KN_DATA_DIR"}
    env["PYTHONPATH"] = str(root)
    where = subprocess.run([sys.executable, "-c", "import kn_utils.data as d; print(d.__file__, d.data_root())"],
                           env=env, cwd=root, capture_output=True, text=True, check=True).stdout.split()
    assert where == [str(root / "kn_utils" / "data" / "__init__.py"), "None"], where  # the copy, no data
    return root, {"PYTHONPATH": str(root), "KN_DATA_DIR": None}


def stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def cells_without_figure(nb) -> dict[int, str]:
    """Plotting cells that show no image: {cell index: its first line}.  A cell that does not plot
    on purpose says "skipped: why"; one that shows nothing and says nothing is reported as such."""
    out = {}
    for i in plotting_cells(nb):
        cell = nb.cells[i]
        if image_count(cell) == 0:
            said = "skipped" if "skipped:" in stream_text(cell) else "SILENT"
            out[i] = f"{said}: {cell.source.splitlines()[0]}"
    return out


def png_size(b64: str) -> tuple[int, int]:
    import base64

    head = base64.b64decode(b64[:64])
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])
