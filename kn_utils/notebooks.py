"""Run a notebook top to bottom (``make demo`` and the notebook tests use this)."""
from __future__ import annotations

import os
import time
from pathlib import Path


def run_notebook(path, out=None, *, env: dict | None = None, timeout: int = 3600, kernel="python3"):
    """Execute ``path`` in a fresh kernel and write the executed copy to ``out`` (default: in place).

    ``env`` entries are set in the kernel's environment (the parameter cells read e.g. ``N_PROMPTS``
    from it).  Raises ``nbclient.exceptions.CellExecutionError`` on the first failing cell.
    Returns (executed notebook, wall seconds).
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    start = time.perf_counter()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name=kernel,
                       resources={"metadata": {"path": str(path.parent.resolve())}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    seconds = time.perf_counter() - start
    nbformat.write(nb, Path(out) if out else path)
    return nb, seconds


def error_outputs(nb) -> list[str]:
    """Texts of any error outputs left in an executed notebook."""
    return [f"{o.get('ename')}: {o.get('evalue')}" for cell in nb.cells if cell.get("cell_type") == "code"
            for o in cell.get("outputs", []) if o.get("output_type") == "error"]


if __name__ == "__main__":
    import sys

    # arguments: NOTEBOOK or NOTEBOOK:EXECUTED_COPY
    for arg in sys.argv[1:]:
        src, _, dst = arg.partition(":")
        nb, secs = run_notebook(src, dst or None)
        print(f"{src}: executed in {secs:.0f} s -> {dst or src}", flush=True)
        errors = error_outputs(nb)
        if errors:
            sys.exit(f"{src}: error outputs {errors}")
