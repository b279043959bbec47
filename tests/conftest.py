from pathlib import Path

import pytest

import kn_utils as ku
from kn_utils.settings import env

from tiny_models import tiny_lm

ROOT = Path(__file__).resolve().parents[1]
# Read-only data sets beside the checkout (CI lays ../shared/data); KN_DATA_DIR overrides.
# An empty KN_DATA_DIR means not set (kn_utils.settings.env), as everywhere in the package.
DATA_DIR = Path(env("KN_DATA_DIR", ROOT.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    # The test tiers' one rule that needs no decorator: whatever uses the real default model is slow
    # (pytest -m "not slow" / make test-fast runs tiny random models only).  Notebook, report, CLI
    # end-to-end and wheel tests carry @pytest.mark.slow themselves.
    for item in items:
        if "default_lm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def default_lm():
    """The real embedded SmolLM2-135M-Instruct (converted once into the kn_utils cache)."""
    return ku.load_model("default", device="cpu")


@pytest.fixture(scope="session")
def data_dir():
    if not DATA_DIR.exists():
        pytest.skip(f"data sets not found at {DATA_DIR} (set KN_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny():
    """tiny('llama') -> LanguageModel with random weights; cached per family for the session."""
    cache = {}

    def get(family, seed=0):
        if (family, seed) not in cache:
            cache[family, seed] = tiny_lm(family, seed)
        return cache[family, seed]
    return get


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A private kn_utils cache (models, statistics, templates) for one test."""
    monkeypatch.setenv("KN_UTILS_CACHE", str(tmp_path))
    return tmp_path
