"""Data loaders.  Every loader takes ``data_dir=None`` and finds its files through :func:`data_root`."""
from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "KN_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]
BUILTIN_DIR = REPO_ROOT / "data"  # data the project writes itself (synonyms, built-in sets)


def data_root(data_dir=None) -> Path | None:
    """The folder holding blimp/, pararel/, counterfact/, wikitext/ ... or None if there is none.

    Order: the argument, ``$KN_DATA_DIR``, then ``../shared/data`` beside the checkout.
    """
    for candidate in (data_dir, os.environ.get(DATA_ENV), REPO_ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate).expanduser().is_dir():
            return Path(candidate).expanduser()
    if data_dir:
        raise FileNotFoundError(f"data directory not found: {data_dir}")
    return None
