"""Run the paper's experiments (:mod:`kn_utils.experiments`) into a report folder's result store
and render ``reports/<model>/REPORT.md`` from every record the folder holds.

    from kn_utils.reproduce import reproduce
    report = reproduce(lm, scale="report", out="reports/default")   # -> Report

or ``python -m kn_utils reproduce --model default --scale report`` (``make reproduce``).

Each unit plans its items; only the items without a record (same model fingerprint, unit version
and settings) are computed, one record each, durable as soon as it is written (:mod:`kn_utils.store`).
So a run resumes where a killed one stopped, ``time_budget`` stops cleanly after the item (or
the batch of a unit with ``compute_batch``) in progress, ``shard=(k, n)`` (or ``torchrun``'s RANK /
WORLD_SIZE) computes every n-th item, and the report is rendered, under a lock, from all records
of every unit in the folder (a run of one section never removes another).  ``render_report(out)``
re-renders without a model.

A unit that raises does not stop the others: its error is written into REPORT.md in place of its
results and :attr:`Report.failed` lists it (the command exits with status 1).  Scales
(:data:`SCALES`): ``smoke`` (seconds on a tiny model, built-in data), ``report`` (issue 21's report
minimum, for a CPU over as many runs as it takes), ``paper`` (the paper's sizes, for GPUs).
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .experiments import SCALES, SECTIONS, TITLES, UNITS, Context, Section, SectionSkipped
from .experiments.common import NONE_OK, batch_size, markdown_table
from .experiments.fig6b import DNA_CAUSAL, FIG6B_MASKED
from .experiments.report import README_END, README_START, headline, render_folder, update_readme
from .experiments.table1 import RELATIONS as TABLE1_RELATIONS
from .experiments.table8 import DNA_MASKED
from .experiments.tracing import AGREEMENT_TRACES
from .store import SearchStore, Store, folder_lock, git_commit, model_fingerprint, now, record_key, worker


@dataclass
class Report:
    path: Path
    sections: list
    seconds: float                       # this run's wall time
    computed: int = 0                    # items this process computed
    stopped: bool = False                # the time budget ended the run before its items were done
    meta: dict = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [s.key for s in self.sections if s.error]

    @property
    def incomplete(self) -> bool:
        return bool(self.meta.get("incomplete"))


# ----------------------------------------------------------------------------------------------
# arguments, checked before any model is loaded
# ----------------------------------------------------------------------------------------------
def _check_args(scale, sections, sizes=None):
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {tuple(SCALES)}")
    unknown = set(sizes or {}) - set(SCALES[scale])
    if unknown:
        raise ValueError(f"unknown sizes {sorted(unknown)}; the sizes are {sorted(SCALES[scale])}")
    for name, value in (sizes or {}).items():
        if value is None:
            if name not in NONE_OK:
                raise ValueError(f"--size {name}: 'none' (all) is not meaningful here; give a positive integer")
        elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"--size {name}: {value!r} must be a positive integer"
                             + (" or 'none'" if name in NONE_OK else ""))
    if sections is None:
        return list(SECTIONS)
    if isinstance(sections, str):
        sections = [sections]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        raise ValueError(f"unknown sections {bad or sections!r}; choose from {SECTIONS}")
    return list(dict.fromkeys(sections))


def parse_shard(text) -> tuple[int, int]:
    """"K/N" -> (K, N) with 0 <= K < N."""
    if isinstance(text, tuple):
        k, n = text
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not m:
            raise ValueError(f"--shard takes K/N (e.g. 0/2), got {text!r}")
        k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"--shard {k}/{n}: need 0 <= K < N")
    return k, n


# the repository's own committed reports (reports/<model>): what REPORT.md says was computed by a
# commit must be that commit's code, so a checkout whose kn_utils/ has uncommitted changes may not
# write there (earlier sessions had to drop such "-dirty" records by hand)
COMMITTED_REPORTS = Path(__file__).resolve().parents[1] / "reports"


def check_committed_code(out) -> None:
    """Refuse ``out`` inside :data:`COMMITTED_REPORTS` when ``kn_utils/`` differs from its commit."""
    out, root = Path(out).resolve(), COMMITTED_REPORTS.resolve()
    if out != root and root not in out.parents:
        return
    commit = git_commit()
    if commit.endswith("-dirty"):      # PermissionError: the CLI says it in one line
        raise PermissionError(
            f"{out}: kn_utils/ has uncommitted changes (commit {commit[:9]}-dirty); the committed reports "
            f"hold only records and renders of committed code: commit first, or pass --out <another folder>")


def check_out(out) -> Path:
    """A report folder that exists (or can be created) and is writable, and not a committed report
    while the code is uncommitted; refused before compute."""
    out = Path(out)
    check_committed_code(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"--out {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: {probe} is not writable")
    for sub in (out / "records", *(out / "records" / u for u in SECTIONS)):
        if sub.exists() and not os.access(sub, os.W_OK | os.X_OK):
            raise PermissionError(f"--out {out}: {sub} is not writable")
    return out


def _safe_name(model) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(model)).strip("_") or "model"


def _default_out(model_name) -> Path:
    return Path(__file__).resolve().parents[1] / "reports" / _safe_name(model_name)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def _distributed():
    """(rank, world size, process group started here) under torchrun / accelerate, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    import torch.distributed as dist

    started = False
    if dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=_dt.timedelta(hours=24))
        started = True
    return int(os.environ.get("RANK", "0")), world, started


def _error_text(exc) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return f"{type(exc).__name__}: {exc}\n" + "".join(tb[-3:])


def _plan_doc(unit, ctx, key, fingerprint, scale, sizes, overridden, model_name, data_dir):
    from .data import data_root

    arch = ctx.lm.arch
    return {"unit": unit.NAME, "version": unit.VERSION, "key": key, "model": fingerprint,
            "model_name": model_name, "scale": scale, "sizes": sizes, "overridden": overridden,
            "settings_sizes": {k: sizes[k] for k in unit.RESULT_SIZES},
            "arch": {"n_layers": arch.n_layers, "n_neurons": arch.n_neurons, "masked": bool(arch.is_masked_lm)},
            "data_folder": str(data_root(data_dir) or ""), "created": now()}


def reproduce(lm, scale: str = "smoke", out=None, *, sections=None, data_dir=None, model_name=None,
              sizes: dict | None = None, progress: bool = False, time_budget: float | None = None,
              shard=None, render: bool = True) -> Report:
    """Compute the missing items of ``sections`` (default all of :data:`SECTIONS`) at ``scale`` on
    ``lm`` into ``<out>/records`` and render ``<out>/REPORT.md`` from every record of the folder.

    ``sizes`` overrides some of the scale's sizes; ``time_budget`` (seconds) starts no item after
    it is spent; ``shard=(k, n)`` or "k/n" computes items k, k+n, ... of each unit (under torchrun
    the rank and world size do the same; rank 0 renders after a barrier)."""
    sections = _check_args(scale, sections, sizes)
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"time_budget must be > 0 seconds, got {time_budget!r}")
    model_name = model_name or getattr(lm.model.config, "_name_or_path", "") or "model"
    out = check_out(out if out else _default_out(model_name))
    commit = git_commit()               # before this run writes a file
    dist = _distributed()
    k, n = parse_shard(shard) if shard is not None else ((dist[0], dist[1]) if dist else (0, 1))
    out.mkdir(parents=True, exist_ok=True)
    all_sizes = {**SCALES[scale], **(sizes or {})}
    overridden = all_sizes != SCALES[scale]
    store, fingerprint, device = Store(out), model_fingerprint(lm), str(getattr(lm, "device", "cpu"))
    ctx = Context(lm, scale, all_sizes, data_dir, progress, searches=SearchStore(out, fingerprint))
    start = time.perf_counter()
    deadline = start + time_budget if time_budget else None
    computed, stopped = 0, False
    try:
        for name in sections:
            unit = UNITS[name]
            settings = {"sizes": {s: all_sizes[s] for s in unit.RESULT_SIZES},
                        **(unit.settings(ctx) if hasattr(unit, "settings") else {})}
            key = record_key(fingerprint, name, unit.VERSION, settings)
            if stopped and (store.plan(name) or {}).get("key") == key:
                continue            # out of time, and its plan is already stored: n planned is known
            doc = _plan_doc(unit, ctx, key, fingerprint, scale, all_sizes, overridden, model_name, data_dir)
            doc["settings"] = settings      # what the key digests, readable
            try:
                plan = unit.plan(ctx)
            except SectionSkipped as why:
                store.write_plan(name, {**doc, "skipped": str(why), "items": []})
                continue
            except Exception as exc:  # noqa: BLE001 — recorded in the report, the run goes on
                store.write_plan(name, {**doc, "error": _error_text(exc), "items": []})
                continue
            items = plan["items"]
            doc.update(items=[it["id"] for it in items], source=plan.get("source", ""),
                       n_minimum=plan.get("n_minimum", len(items)), info=plan.get("info", {}))
            if len(set(doc["items"])) != len(items):
                raise RuntimeError(f"unit {name}: item ids are not unique")
            store.write_plan(name, doc)
            done = store.records(name, key)
            mine = [it for it in items[k::n] if it["id"] not in done]
            t_unit = time.perf_counter()
            # a unit with compute_batch computes BATCH items at a time: a batch is the unit of work
            size = batch_size(unit, ctx)
            bar = tqdm(total=len(mine), desc=f"{name} (shard {k}/{n})", disable=not progress)
            for batch in (mine[b:b + size] for b in range(0, len(mine), size)):
                if stopped or (deadline is not None and time.perf_counter() >= deadline):
                    if progress and not stopped:
                        print(f"[reproduce] time budget of {time_budget} s spent: stopping", flush=True)
                    stopped = True
                    break
                t0 = time.perf_counter()
                try:
                    results = unit.compute_batch(ctx, batch) if size > 1 else [unit.compute(ctx, batch[0])]
                    if len(results) != len(batch):
                        raise RuntimeError(f"compute_batch returned {len(results)} results for {len(batch)} items")
                except Exception as exc:  # noqa: BLE001
                    ids = ", ".join(it["id"] for it in batch)
                    store.write_plan(name, {**doc, "error": f"item {ids}: " + _error_text(exc)})
                    break
                seconds = round((time.perf_counter() - t0) / len(batch), 3)   # each item's share
                for item, result in zip(batch, results):
                    store.append({"key": key, "model": fingerprint, "unit": name, "version": unit.VERSION,
                                  "item": item["id"], "result": result, "seconds": seconds,
                                  **({"batch": len(batch)} if size > 1 else {}),
                                  "worker": worker(), "commit": commit, "device": device, "created": now()})
                computed += len(batch)
                bar.update(len(batch))
            bar.close()
            if progress:
                print(f"[reproduce] {name}: {len(mine)} items to compute (shard {k}/{n}), "
                      f"{time.perf_counter() - t_unit:.1f} s", flush=True)
    finally:
        store.close()
        ctx.searches.close()
    path, secs, meta = out / "REPORT.md", [], {}
    if dist:
        import torch.distributed as tdist

        tdist.barrier()
        render = render and dist[0] == 0
    if render:
        with folder_lock(out):
            path, secs, meta = render_folder(out, model_name)
    if dist and dist[2]:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return Report(path=path, sections=secs, seconds=time.perf_counter() - start, computed=computed,
                  stopped=stopped, meta=meta)


def render_report(out, model_name=None) -> Report:
    """Re-render REPORT.md, CSVs, figures, headline.csv and report.json of ``out`` from its
    records (no model)."""
    out = Path(out)
    if not out.is_dir():
        raise NotADirectoryError(f"{out} is not a report folder")
    check_committed_code(out)
    if not Store(out).units():
        raise FileNotFoundError(f"{out} holds no records (no records/<unit>/plan.json): run reproduce "
                                f"first; --render-only renders only what a run stored")
    start = time.perf_counter()
    with folder_lock(out):
        path, secs, meta = render_folder(out, model_name)
    return Report(path=path, sections=secs, seconds=time.perf_counter() - start, meta=meta)


render = render_folder

__all__ = ["SCALES", "SECTIONS", "TITLES", "UNITS", "Report", "Section", "SectionSkipped", "headline",
           "update_readme", "reproduce", "render_report", "render", "markdown_table", "git_commit",
           "parse_shard", "check_out", "DNA_CAUSAL", "DNA_MASKED", "FIG6B_MASKED", "AGREEMENT_TRACES",
           "TABLE1_RELATIONS", "README_START", "README_END"]

