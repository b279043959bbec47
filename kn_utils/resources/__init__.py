"""Where the package finds its own files, installed or not.

The data the project writes itself (``synonyms.json``, the built-in mini sets under ``builtin/``) is
package data beside this file, so a wheel installed anywhere (``pip install .``) carries it; it is
found through :mod:`importlib.resources`, never relative to a source tree.

:func:`checkout_root` is the one place that asks whether the package runs from a source checkout (a
clone, or an editable install of one): only there do ``../shared/data`` beside the checkout
(:func:`kn_utils.data.data_root`) and the checkout's ``figures/`` (:func:`kn_utils.plotting.figures_dir`)
mean anything.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def resource_dir() -> Path:
    """The folder of the package's own data files (``synonyms.json``, ``builtin/``).

    A real folder in every supported install (wheel, editable, source tree); a zipped install, whose
    files would have no path, is refused with an explanation rather than failing later."""
    root = resources.files(__name__)
    if not isinstance(root, Path):
        raise RuntimeError(f"kn_utils resources are inside an archive ({root}); install kn_utils as "
                           f"a regular (unzipped) package, e.g. pip install kn_utils")
    return root


@lru_cache(maxsize=1)
def checkout_root() -> Path | None:
    """The source checkout this package is imported from, or None for an installed wheel.

    A checkout is the folder above ``kn_utils/`` that holds the project's ``pyproject.toml``; in a
    site-packages folder that file is absent."""
    project = _PACKAGE_ROOT / "pyproject.toml"
    try:
        is_ours = project.is_file() and 'name = "kn_utils"' in project.read_text(encoding="utf-8")
    except OSError:
        is_ours = False
    return _PACKAGE_ROOT if is_ours else None


RESOURCE_DIR = resource_dir()

__all__ = ["RESOURCE_DIR", "checkout_root", "resource_dir"]
