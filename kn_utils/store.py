"""The result store of a report folder: one JSON record per finished item, so a reproduction
resumes, shards across processes and never loses finished work.

Layout under ``<report folder>/records/<unit>/``:

- ``<host>-r<rank>-<pid>.jsonl``: the records one worker process wrote, one JSON object a line,
  appended, flushed and fsynced per record.  Each process writes only its own file, so concurrent
  writers never interleave; the store is read as the union of every file.  A line that does not
  parse (the half-written last line of a killed process) is ignored.
- ``plan.json``: what the last run of the unit planned (record key, item ids, sizes, data source,
  the report minimum, the unit's error or skip reason), replaced atomically; ``--render-only``
  reads it instead of the model.

A record::

    {"key": "<sha1 of model, unit, version, settings>", "model": "<fingerprint>", "unit": "table1",
     "version": 1, "item": "rome/P36/000012", "result": {...}, "seconds": 15.2,
     "worker": {"host": "box", "rank": 0, "pid": 4242}, "commit": "<git sha>", "device": "cpu",
     "created": "2026-12-07T01:30:00Z"}

The key covers every setting that changes an item's result (the sizes the unit names, its
hyperparameters), so a changed setting or a bumped unit version computes the items afresh while
the old records stay in the files (ignored by the report).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import re
import socket
import subprocess
from pathlib import Path

import numpy as np

FLOAT_DIGITS = 10     # significant digits kept of every float of a record


def record_key(model: str, unit: str, version: int, settings: dict) -> str:
    text = json.dumps({"model": model, "unit": unit, "version": version, "settings": settings},
                      sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def model_fingerprint(lm) -> str:
    """The family, a digest of the config and of a sample of the weights (ROME's statistics key,
    not the name), and of the tokenizer (its size and how it splits a probe sentence)."""
    from .editing.rome.stats import model_key

    tok = lm.tokenizer
    probe = tok("The capital of France is Paris, isn't it?", add_special_tokens=True)["input_ids"]
    digest = hashlib.sha1(json.dumps([len(tok), list(probe)]).encode()).hexdigest()[:6]
    return f"{model_key(lm)}-{digest}"


def git_commit(path=None) -> str:
    """The checkout's commit (with ``-dirty`` when the package's tracked files, ``kn_utils/``, differ
    from it: the code that computes; a report folder's own records and renders do not count), or
    "unknown".  Read before a run writes anything."""
    root = Path(path or Path(__file__).resolve().parents[1])
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "kn_utils"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("-dirty" if dirty else "")) if rev else "unknown"


def worker() -> dict:
    return {"host": socket.gethostname(), "rank": int(os.environ.get("RANK", "0") or 0), "pid": os.getpid()}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def clean(obj, digits: int = FLOAT_DIGITS):
    """JSON-ready: numpy scalars and arrays to Python, floats to ``digits`` significant digits."""
    if isinstance(obj, dict):
        return {str(k): clean(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v, digits) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist(), digits)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if not math.isfinite(x) else float(f"{x:.{digits}g}")
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "item"):         # a 0-d tensor
        return clean(obj.item(), digits)
    return str(obj)


class Store:
    """Records of one report folder (``<out>/records``)."""

    def __init__(self, out):
        self.out = Path(out)
        self.root = self.out / "records"
        self._files = {}

    # ------------------------------------------------------------------ writing
    def _file(self, unit):
        if unit not in self._files:
            w = worker()
            host = re.sub(r"[^A-Za-z0-9._-]+", "_", w["host"]) or "host"
            folder = self.root / unit
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{host}-r{w['rank']}-{w['pid']}.jsonl"
            fh = open(path, "a+b")
            fh.seek(0, os.SEEK_END)
            if fh.tell():   # a file left by an earlier process with this pid: end its last line
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            self._files[unit] = fh
        return self._files[unit]

    def append(self, record: dict):
        """Write one record and make it durable before returning (a kill after this keeps it)."""
        fh = self._file(record["unit"])
        fh.write((json.dumps(clean(record), sort_keys=False) + "\n").encode())
        fh.flush()
        os.fsync(fh.fileno())

    def close(self):
        for fh in self._files.values():
            fh.close()
        self._files.clear()

    # ------------------------------------------------------------------ reading
    def records(self, unit, key: str | None = None) -> dict:
        """{item id: record} of ``unit`` (only those of ``key`` if given), the union of every
        worker's file; of two records of one item (two runs computed it) the earlier is kept."""
        out = {}
        folder = self.root / unit
        for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
            with open(path, "rb") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except ValueError:      # a half-written line of a killed process
                        continue
                    if not isinstance(rec, dict) or "item" not in rec or (key and rec.get("key") != key):
                        continue
                    old = out.get(rec["item"])
                    if old is None or (rec.get("created", ""), str(rec.get("worker"))) < \
                            (old.get("created", ""), str(old.get("worker"))):
                        out[rec["item"]] = rec
        return out

    def write_plan(self, unit, plan: dict):
        from .experiments.common import atomic_write_text

        text = json.dumps(clean(plan), indent=1) + "\n"
        old = self.plan(unit)
        # the same plan again (every run re-plans) keeps its file: only the time would change, and a
        # committed report would show a diff in every plan.json after each run
        if old is not None and {**old, "created": None} == {**json.loads(text), "created": None}:
            return
        (self.root / unit).mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / unit / "plan.json", text)

    def plan(self, unit) -> dict | None:
        path = self.root / unit / "plan.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def units(self) -> list[str]:
        return [p.parent.name for p in sorted(self.root.glob("*/plan.json"))] if self.root.is_dir() else []

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file()) if self.root.is_dir() else 0


@contextlib.contextmanager
def folder_lock(out):
    """An exclusive lock on a report folder (one render at a time, from all records).  The lock is
    on the folder itself, so no lock file is left in a committed report folder."""
    import fcntl

    fd = os.open(Path(out), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ----------------------------------------------------------------------------- shared KN searches

# Bump when what find_knowledge_neurons returns for the same prompts changes (the attribution, the
# refinement, the defaults): stored searches of the old code are then searched afresh.
SEARCH_VERSION = 1
SEARCHES = "_kn_searches"     # records/<this>/: not a unit (no plan.json), never rendered
SEARCH_FIELDS = ("neurons", "tau", "n_initial", "r2", "converged", "message", "n_prompts")


def search_key(model: str, prompts, targets, settings: dict) -> str:
    """The digest of one KN search: model fingerprint, the prompts and targets, the search settings."""
    text = json.dumps({"model": model, "prompts": list(prompts), "targets": targets, "settings": settings,
                       "version": SEARCH_VERSION}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class SearchStore:
    """KN searches of a report folder, kept beside the records (``records/_kn_searches/``, one JSONL
    file per worker, as :class:`Store`) so that units searching the same bag -- Dai and Table 9 one
    ParaRel fact, Fig 6b and Table 8 one BLiMP bag -- run the search once, whichever process or run
    gets there first.  A search is ~2-3 minutes of a unit's item on a CPU; what is kept is what the
    units read of it (:data:`SEARCH_FIELDS`), so the item that reuses it has the same result."""

    def __init__(self, out, model: str):
        self.store, self.model = Store(out), model
        self._known: dict = {}

    def key(self, prompts, targets, settings: dict) -> str:
        return search_key(self.model, prompts, targets, settings)

    def get(self, key: str):
        """The stored search ``key`` as a :class:`kn_utils.attribution.KNResult`, or None.  The files
        are read again on a miss: another worker may have stored it since."""
        if key not in self._known:
            self._known = {k: r["result"] for k, r in self.store.records(SEARCHES).items()}
        found = self._known.get(key)
        if found is None:
            return None
        from collections import Counter

        from .attribution import KNResult

        fields = {f: found[f] for f in SEARCH_FIELDS if f in found}
        fields["neurons"] = [tuple(int(x) for x in nrn) for nrn in fields.get("neurons", [])]
        return KNResult(coarse=[], counts=Counter(), **fields)

    def put(self, key: str, result, seconds: float, what: str = "") -> None:
        values = {f: getattr(result, f) for f in SEARCH_FIELDS}
        values["neurons"] = [list(map(int, nrn)) for nrn in result.neurons]
        self._known[key] = values
        self.store.append({"key": key, "model": self.model, "unit": SEARCHES, "version": SEARCH_VERSION,
                           "item": key, "what": what, "result": values, "seconds": seconds,
                           "worker": worker(), "created": now()})

    def close(self):
        self.store.close()


__all__ = ["Store", "SearchStore", "record_key", "search_key", "model_fingerprint", "worker", "clean",
           "folder_lock", "git_commit", "SEARCH_VERSION"]
