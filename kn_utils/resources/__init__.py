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

import os
import re
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


_ABSOLUTE_PATH = re.compile(r"(?<![\w:])/[^\s()'\",|`]+")


def relative_paths(text, base, under=None) -> str:
    """``text`` with its absolute paths (only those in the folder ``under``, if given) written
    relative to ``base``, so that committed outputs show no path of the machine that made them and
    their links still resolve from where they lie (a report: ``../../../shared/data/...``)."""
    base = Path(base).resolve()
    inside = None if under is None else str(under).rstrip("/")

    def shown(match):
        path = match.group(0)
        if inside is not None and path != inside and not path.startswith(inside + "/"):
            return path
        try:
            return os.path.relpath(path, base)
        except ValueError:      # another drive (Windows): the name only
            return Path(path).name
    return _ABSOLUTE_PATH.sub(shown, str(text))


RESOURCE_DIR = resource_dir()

__all__ = ["RESOURCE_DIR", "checkout_root", "relative_paths", "resource_dir"]
