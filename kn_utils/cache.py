"""The converted-model cache: where converted models live and how a folder gets there safely.

Below the loaders (:mod:`kn_utils.models`, :mod:`kn_utils.registry`): nothing here loads a model.
A GGUF is dequantised once (:func:`convert_gguf`) into a safetensors folder under :func:`cache_dir`.
Cache folders are written atomically under a per-folder lock (:func:`cached_folder`), carry a
manifest of their files, and are checked on every load (:func:`check_model_folder`): a damaged one is
rebuilt with a warning. Folders and files are created with the user's umask (a cache shared between
users stays readable by them), and a read-only cache that already holds what a call needs serves it;
one that does not raises :class:`CacheNotWritable` naming the folder.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

from .settings import env

CACHE_ENV = "KN_UTILS_CACHE"
_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


class CacheNotWritable(OSError):
    """The cache lacks what a call needs and cannot be written (read-only, or not ours)."""


@contextlib.contextmanager
def writing_into(folder: Path, what: str):
    """Turn a read-only or permission error while writing ``what`` into ``folder`` into one
    :class:`CacheNotWritable` that names the folder and what to do."""
    try:
        yield
    except CacheNotWritable:
        raise
    except OSError as err:
        if err.errno not in _READ_ONLY_ERRNOS:
            raise
        raise CacheNotWritable(
            f"the kn_utils cache {folder} cannot be written ({os.strerror(err.errno)}) and does not "
            f"hold {what} yet: set {CACHE_ENV} to a writable folder, or fill this cache once where "
            f"it can be written (e.g. `make model`)") from err


def umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)   # elsewhere: the only portable read is to set it and put it back
    os.umask(old)
    return old


def share_like_umask(path: str | os.PathLike) -> None:
    """Give a folder made by ``tempfile`` (0o700) or a file (0o600), and everything inside the
    folder, the mode the user's umask gives an ordinary one (folders 0o777, files 0o666, less the
    umask), so a cache shared between users stays readable. (Some writers, e.g. safetensors, also
    create their files 0o600.)"""
    mask = umask()
    if os.path.isdir(path):
        for folder, dirs, files in os.walk(path):
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~mask)
            for name in dirs:
                os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def cache_dir() -> Path:
    """Where converted models and covariance statistics live: ``$KN_UTILS_CACHE`` or ~/.cache/kn_utils."""
    # (a blank value is "not set", as for every variable the package reads: kn_utils.settings)
    path = Path(env(CACHE_ENV) or os.path.join("~", ".cache", "kn_utils")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    with writing_into(target.parent, target.name):
        handle = open(target.parent / f".{target.name}.lock", "a+")
    with handle:
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
    with writing_into(target.parent, target.name):
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
        with writing_into(target.parent, target.name):
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{_TMP_PREFIX}{os.getpid()}-"))
        try:
            build(tmp)
            _write_manifest(tmp)
            share_like_umask(tmp)   # mkdtemp made it 0o700
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

