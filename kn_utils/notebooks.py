"""Run the notebooks top to bottom with papermill (``make notebooks``, the tests, the reproduction).

Each notebook's first code cell holds plain assignments tagged ``parameters`` (papermill's
convention).  Run by hand it uses those defaults; run here, ``parameters`` override them through a
cell papermill injects after it:

    python -m kn_utils.notebooks localise_kn.ipynb ct_rome.ipynb               # in place, defaults
    make notebooks                                                              # the same
    python -m kn_utils.notebooks -p MODEL gemma-3-270m -p N_PROMPTS 20 --out results localise_kn.ipynb

A ``-p`` name the notebook does not have, or a value of another type than the default's ("abc" for
an int), is refused before any cell runs (exit status 2).  Each executed notebook is written to a
temporary file and renamed over the target only when every cell ran: an interrupted run leaves the
old notebook; a failed one leaves it too, with the failed copy as ``<name>.failed.ipynb`` beside it.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import time
from pathlib import Path

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
# a cell that draws: it calls a plot function of kn_utils (directly or through kn_utils.explore)
PLOT_CALL = re.compile(r"\b(plot_\w+|plots\.plot_\w+|explore\.(attribution|knowledge_neurons|intervention|trace))\(")


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def parameter_cell(nb):
    """The code cell tagged ``parameters`` (a ValueError names the notebook's problem if there is none)."""
    cells = [c for c in nb.cells if c.cell_type == "code" and PARAMETERS_TAG in _tags(c)]
    if len(cells) != 1:
        raise ValueError(f"a notebook needs exactly one code cell tagged {PARAMETERS_TAG!r}, found {len(cells)}")
    return cells[0]


def _assignments(source: str) -> dict:
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = ast.literal_eval(node.value)
        elif not isinstance(node, ast.Expr):  # comments and docstrings are fine, code is not
            raise ValueError(f"the parameters cell must hold plain assignments of literals, got: "
                             f"{ast.unparse(node)!r}")
    return values


def parameters(nb) -> dict:
    """The notebook's parameters: its ``parameters`` cell's defaults, then any injected overrides."""
    values = _assignments(parameter_cell(nb).source)
    for cell in nb.cells:
        if cell.cell_type == "code" and INJECTED_TAG in _tags(cell):
            values.update(_assignments(cell.source))
    return values


def default_parameters(path) -> dict:
    """The defaults written in the notebook's ``parameters`` cell (ignoring injected overrides)."""
    import nbformat

    return _assignments(parameter_cell(nbformat.read(Path(path), as_version=4)).source)


def _type_name(value) -> str:
    return type(value).__name__


def _fits(default, value) -> bool:
    """Whether ``value`` may replace ``default``: the same kind of literal (an int for a float is
    fine, a bool is not an int); a default of None takes anything."""
    if default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def check_parameters(nb, parameters: dict | None, where: str = "the notebook") -> dict:
    """Refuse overrides that would fail (or mislead) only once a cell uses them: unknown names and
    values of another type than the default's ("abc" for an int).  One ValueError names every
    problem; returns the defaults."""
    known = _assignments(parameter_cell(nb).source)
    problems = []
    unknown = sorted(set(parameters or {}) - set(known))
    if unknown:
        problems.append(f"unknown parameters {unknown} for {where}; it has {sorted(known)}")
    for name, value in (parameters or {}).items():
        if name in known and not _fits(known[name], value):
            problems.append(f"parameter {name} of {where} must be of type {_type_name(known[name])} like "
                            f"its default {known[name]!r}, got {value!r} ({_type_name(value)})")
    if problems:
        raise ValueError("; ".join(problems))
    return known


def _kernel(nb, kernel):
    """The notebook's own kernel (``make lab`` / ``make install`` register it) when installed, else
    the Python running this (so a plain checkout, e.g. on CI before ``make``, still runs)."""
    if kernel:
        return kernel
    from jupyter_client.kernelspec import KernelSpecManager

    wanted = nb.metadata.get("kernelspec", {}).get("name")
    return wanted if wanted and wanted in KernelSpecManager().find_kernel_specs() else "python3"


def run_notebook(path, out=None, *, parameters: dict | None = None, env: dict | None = None,
                 timeout: int = 3600, kernel: str | None = None):
    """Execute ``path`` in a fresh kernel and write the executed copy to ``out`` (default: in place).

    ``parameters`` override the notebook's ``parameters`` cell (papermill injection); without them any
    stale injected cell is dropped, so the copy runs with the notebook's own defaults.  ``env``
    entries are set in the kernel's environment (e.g. ``KN_UTILS_CACHE``, ``PYTHONPATH``; None
    removes a variable).  Raises
    ``papermill.PapermillExecutionError`` on the first failing cell (the copy keeps its traceback).
    Returns (executed notebook, wall seconds).
    """
    import nbformat
    import papermill

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"notebook not found: {path}")
    nb = nbformat.read(path, as_version=4)
    check_parameters(nb, parameters, path.name)
    nb.cells = [c for c in nb.cells if INJECTED_TAG not in _tags(c)]
    out = Path(out) if out else path
    out.parent.mkdir(parents=True, exist_ok=True)
    old = {k: os.environ.get(k) for k in (env or {})}
    for k, v in (env or {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = str(v)
    # papermill writes its output cell by cell: it writes to a temporary file beside ``out``, which
    # replaces ``out`` only once every cell ran, so an interrupted or failed run never leaves a
    # half-executed notebook in place of the old one
    partial = out.with_name(f".{out.stem}.{os.getpid()}.partial.ipynb")
    start = time.perf_counter()
    try:
        nb = papermill.execute_notebook(nb, str(partial), parameters=dict(parameters or {}),
                                        kernel_name=_kernel(nb, kernel), cwd=str(path.parent.resolve()),
                                        progress_bar=False, execution_timeout=timeout)
    except papermill.PapermillExecutionError as err:
        # the executed copy with its traceback, beside the untouched notebook
        failed = out.with_name(f"{out.stem}.failed.ipynb")
        if partial.exists():
            os.replace(partial, failed)
            err.failed_copy = failed
        raise
    finally:
        partial.unlink(missing_ok=True)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    seconds = time.perf_counter() - start
    # papermill records the whole input notebook (it was given one, not a path) and absolute paths:
    # keep the file names only, so the stored copies stay small and free of this machine's paths
    nb.metadata.setdefault("papermill", {}).update(input_path=path.name, output_path=out.name)
    try:
        nbformat.write(nb, partial)
        os.replace(partial, out)
        out.with_name(f"{out.stem}.failed.ipynb").unlink(missing_ok=True)  # an earlier failure's copy
    finally:
        partial.unlink(missing_ok=True)
    return nb, seconds


def error_outputs(nb) -> list[str]:
    """Texts of any error outputs left in an executed notebook."""
    return [f"{o.get('ename')}: {o.get('evalue')}" for cell in nb.cells if cell.get("cell_type") == "code"
            for o in cell.get("outputs", []) if o.get("output_type") == "error"]


def plotting_cells(nb) -> list[int]:
    """Indices of the code cells that call a plot function."""
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and PLOT_CALL.search(c.source)]


def image_count(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def _value(text: str):
    """A ``-p`` value: a Python literal when it reads as one (20, 0.5, None, True), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kn_utils.notebooks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="override a parameter (repeatable)")
    parser.add_argument("--out", type=Path, help="folder for the executed copies (default: in place)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)
    params = {name: _value(value) for name, value in args.parameter}
    if params and not args.out:
        parser.error("parameters given: pass --out DIR for the executed copies (the notebooks in the "
                     "repository keep the outputs of their own defaults)")
    import nbformat

    # every notebook's parameters are checked before the first cell of the first notebook runs
    for path in args.notebooks:
        try:
            check_parameters(nbformat.read(path, as_version=4), params, path.name)
        except (OSError, ValueError) as err:
            parser.error(f"{path}: {err}")
    import papermill

    for path in args.notebooks:
        out = args.out / path.name if args.out else path
        try:
            nb, secs = run_notebook(path, out, parameters=params, timeout=args.timeout)
        except papermill.PapermillExecutionError as err:
            where = getattr(err, "failed_copy", None)
            raise SystemExit(f"{path}: {err.ename}: {err.evalue} (cell {err.exec_count}); {out} is "
                             f"unchanged" + (f", the failed run is in {where}" if where else "")) from None
        print(f"{path}: executed in {secs:.0f} s -> {out}", flush=True)
        errors = error_outputs(nb)
        if errors:
            raise SystemExit(f"{path}: error outputs {errors}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
