"""kn_utils.store and the runner over it: resume, kills, time budgets, render-only, subset and
concurrent runs, version bumps, shards and torchrun give the single-process numbers."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from kn_utils import reproduce
from kn_utils.store import Store, clean

from tiny_models import save_tiny

pytestmark = pytest.mark.filterwarnings("ignore::kn_utils.data.BuiltinDataWarning")
ROOT = Path(__file__).resolve().parents[1]
MODEL_CACHE = os.environ.get("KN_UTILS_CACHE")   # subprocesses build tiny models from the real cache
FAST = ["blimp", "dai", "table9"]      # the quickest units on a tiny model


@pytest.fixture
def builtin_only(monkeypatch, tmp_path_factory, tiny):
    tiny("llama")   # built first: its tokenizer comes from the model cache, not the empty one below
    monkeypatch.delenv("KN_DATA_DIR", raising=False)
    monkeypatch.setenv("KN_SHARED_DATA", "0")
    monkeypatch.setenv("KN_UTILS_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def counted(monkeypatch):
    """Count compute calls per unit (the real compute runs)."""
    calls = {}
    for name, unit in reproduce.UNITS.items():
        def wrap(ctx, item, _real=unit.compute, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(ctx, item)
        monkeypatch.setattr(unit, "compute", wrap)
    return calls


def _results(folder, unit):
    """{item: result} of the records the report uses (the plan's key)."""
    store = Store(folder)
    return {k: r["result"] for k, r in store.records(unit, store.plan(unit)["key"]).items()}


def _without_run_columns(df):
    return df.drop(columns=[c for c in ("worker", "seconds") if c in df])


def _report_body(path):
    """REPORT.md without the lines that name the run (date, compute time, workers)."""
    skip = ("- rendered:", "- total compute time", "| [", "Items ")
    return [ln for ln in Path(path).read_text().splitlines() if not ln.startswith(skip)]


# ---------------------------------------------------------------------------------------------
# the store itself
# ---------------------------------------------------------------------------------------------
def test_records_union_skips_a_half_written_line_and_keeps_the_earlier_duplicate(tmp_path):
    store = Store(tmp_path)
    base = {"key": "k", "model": "m", "unit": "blimp", "version": 1, "seconds": 1.0, "commit": "c", "device": "cpu"}
    store.append({**base, "item": "a", "result": {"x": 1.0}, "worker": {"pid": 1}, "created": "2026-01-01T00:00:01Z"})
    store.close()
    folder = tmp_path / "records" / "blimp"
    (folder / "other-r0-2.jsonl").write_text(
        json.dumps({**base, "item": "a", "result": {"x": 2.0}, "worker": {"pid": 2}, "created": "2026-01-01T00:00:00Z"})
        + "\n" + json.dumps({**base, "item": "b", "result": {"x": 3.0}})[:40])   # killed mid-line
    recs = store.records("blimp", "k")
    assert set(recs) == {"a"} and recs["a"]["result"] == {"x": 2.0}
    assert store.records("blimp", "other-key") == {}
    # a new writer that reuses the file of a killed process starts on a fresh line
    path = folder / "other-r0-2.jsonl"
    with open(path, "ab") as fh:
        fh.write(b'{"half')
    import socket

    shutil.copy(path, folder / f"{socket.gethostname()}-r0-{os.getpid()}.jsonl")   # as if our pid's
    store2 = Store(tmp_path)
    store2.append({**base, "item": "c", "result": {"x": 4.0}, "worker": {"pid": 3}, "created": "2026-01-01T00:00:02Z"})
    store2.close()
    assert set(Store(tmp_path).records("blimp", "k")) == {"a", "c"}


def test_write_plan_keeps_the_file_when_only_the_time_differs(tmp_path):
    store = Store(tmp_path)
    store.write_plan("u", {"key": "k1", "items": ["a", "b"], "created": "2026-01-01T00:00:00Z"})
    store.write_plan("u", {"key": "k1", "items": ["a", "b"], "created": "2026-02-02T00:00:00Z"})
    assert store.plan("u")["created"] == "2026-01-01T00:00:00Z"
    store.write_plan("u", {"key": "k1", "items": ["a"], "created": "2026-03-03T00:00:00Z"})
    assert store.plan("u") == {"key": "k1", "items": ["a"], "created": "2026-03-03T00:00:00Z"}
    store.write_plan("u", {"key": "k1", "items": ["a"], "error": "x", "created": "2026-03-03T00:00:00Z"})
    assert store.plan("u")["error"] == "x"


def test_clean_rounds_floats_and_converts_numpy():
    import numpy as np

    out = clean({"a": np.float32(1 / 3), "b": [np.int64(2), np.bool_(True)], "c": float("nan"), "d": (1.23456789012345,)})
    assert out["a"] == pytest.approx(1 / 3, rel=1e-7) and out["b"] == [2, True] and out["d"] == [1.23456789]
    assert json.loads(json.dumps(out))["b"] == [2, True]


# ---------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------
def test_resume_computes_nothing_the_second_time(tiny, tmp_path, builtin_only, counted):
    lm = tiny("llama")
    first = reproduce.reproduce(lm, "smoke", tmp_path, sections=FAST)
    n_first = dict(counted)
    assert first.computed == sum(n_first.values()) > 0
    counted.clear()
    plans = {p: p.read_bytes() for p in (tmp_path / "records").glob("*/plan.json")}
    second = reproduce.reproduce(lm, "smoke", tmp_path, sections=FAST)
    assert counted == {} and second.computed == 0
    assert plans and all(p.read_bytes() == text for p, text in plans.items())   # no diff to commit
    assert _report_body(first.path) == _report_body(second.path)
    # another size that changes results is another key: computed afresh
    third = reproduce.reproduce(lm, "smoke", tmp_path, sections=["blimp"], sizes={"blimp_n": 5})
    assert counted == {"blimp": third.computed} and third.computed == first.meta["sections"]["blimp"]["n_planned"]


def test_unit_version_bump_recomputes(tiny, tmp_path, builtin_only, counted, monkeypatch):
    lm = tiny("llama")
    reproduce.reproduce(lm, "smoke", tmp_path, sections=["blimp"])
    planned = counted["blimp"]
    counted.clear()
    monkeypatch.setattr(reproduce.UNITS["blimp"], "VERSION", reproduce.UNITS["blimp"].VERSION + 1)
    rep = reproduce.reproduce(lm, "smoke", tmp_path, sections=["blimp"])
    assert counted == {"blimp": planned} and rep.meta["sections"]["blimp"]["n_done"] == planned


def test_time_budget_stops_cleanly_and_marks_the_report_incomplete(tiny, tmp_path, builtin_only, monkeypatch):
    real = reproduce.UNITS["blimp"].compute
    # the runner's clock moves only while an item computes (0.4 s each): planning and loading take
    # no budget, so the number of items done does not depend on how busy the machine is
    clock = [0.0]
    monkeypatch.setattr(reproduce, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def slow(ctx, item):
        clock[0] += 0.4
        return real(ctx, item)

    monkeypatch.setattr(reproduce.UNITS["blimp"], "compute", slow)
    rep = reproduce.reproduce(tiny("llama"), "smoke", tmp_path, sections=["blimp", "dai"], time_budget=1.0)
    st = rep.meta["sections"]
    assert rep.stopped and rep.incomplete and rep.failed == []
    assert st["blimp"]["n_done"] == 3 < st["blimp"]["n_planned"]     # started at 0, 0.4, 0.8 s
    monkeypatch.setattr(reproduce, "time", time)
    text = rep.path.read_text()
    assert "**Incomplete**" in text
    assert f"Items {st['blimp']['n_done']} done / {st['blimp']['n_planned']} planned" in text
    # the next run continues where this one stopped
    rep2 = reproduce.reproduce(tiny("llama"), "smoke", tmp_path, sections=["blimp", "dai"])
    assert st["dai"]["n_done"] == 0 and st["dai"]["n_planned"] > 0   # planned, so the report says n done / planned
    assert rep2.computed == sum(s["n_planned"] - s["n_done"] for s in st.values()) and not rep2.incomplete


def test_time_budget_on_the_command_line_exits_0(tmp_path, builtin_only, monkeypatch):
    from kn_utils.cli import main

    folder = tmp_path / "model"
    save_tiny("llama", folder)
    real = reproduce.UNITS["blimp"].compute
    monkeypatch.setattr(reproduce.UNITS["blimp"], "compute", lambda ctx, item: time.sleep(0.3) or real(ctx, item))
    out = tmp_path / "r"
    assert main(["reproduce", "--model", str(folder), "--scale", "smoke", "--sections", "blimp", "--out", str(out),
                 "--device", "cpu", "--time-budget", "0.5"]) == 0
    assert json.loads((out / "report.json").read_text())["incomplete"]


def test_render_only_equals_the_run_and_subset_runs_keep_other_sections(tiny, tmp_path, builtin_only):
    lm = tiny("llama")
    reproduce.reproduce(lm, "smoke", tmp_path, sections=["blimp"])
    rep = reproduce.reproduce(lm, "smoke", tmp_path, sections=["dai"])
    text = rep.path.read_text()
    assert reproduce.TITLES["blimp"] in text and reproduce.TITLES["dai"] in text   # blimp kept
    head = pd.read_csv(tmp_path / "headline.csv")
    assert head.result.str.startswith("BLiMP").any() and head.result.str.startswith("Dai").any()
    csvs = {p.name: p.read_text() for p in tmp_path.glob("*.csv")}
    for p in tmp_path.glob("*.csv"):
        p.unlink()
    (tmp_path / "REPORT.md").unlink()
    again = reproduce.render_report(tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.glob("*.csv")} == csvs
    body = [ln for ln in again.path.read_text().splitlines() if not ln.startswith("- rendered:")]
    assert body == [ln for ln in text.splitlines() if not ln.startswith("- rendered:")]


def _script(tmp_path, body) -> Path:
    path = tmp_path / "run.py"
    path.write_text(textwrap.dedent(f"""
        import sys, time, warnings
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
        warnings.filterwarnings("ignore")
        from tiny_models import tiny_lm
        from kn_utils import reproduce
        lm = tiny_lm("llama")
    """) + textwrap.dedent(body))
    return path


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("KN_UTILS_CACHE", None)
    if MODEL_CACHE:
        env["KN_UTILS_CACHE"] = MODEL_CACHE
    return env


def test_sigkill_mid_run_loses_only_the_item_in_progress(tiny, tmp_path, builtin_only, counted):
    out = tmp_path / "r"
    script = _script(tmp_path, f"""
        real = reproduce.UNITS["blimp"].compute
        def slow(ctx, item):
            time.sleep(0.5)
            return real(ctx, item)
        reproduce.UNITS["blimp"].compute = slow
        reproduce.reproduce(lm, "smoke", {str(out)!r}, sections=["blimp"])
    """)
    proc = subprocess.Popen([sys.executable, str(script)], env=_env(), cwd=ROOT)
    folder = out / "records" / "blimp"
    deadline = time.time() + 120
    while time.time() < deadline:
        files = list(folder.glob("*.jsonl")) if folder.exists() else []
        if files and sum(f.read_bytes().count(b"\n") for f in files) >= 3:
            break
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    kept = set(Store(out).records("blimp"))
    assert len(kept) >= 3 and not (out / "REPORT.md").exists()
    rep = reproduce.reproduce(tiny("llama"), "smoke", out, sections=["blimp"])
    planned = rep.meta["sections"]["blimp"]["n_planned"]
    assert counted["blimp"] == planned - len(kept)      # nothing finished was computed again
    assert rep.meta["sections"]["blimp"]["n_done"] == planned and not rep.incomplete


@pytest.mark.slow   # two fresh processes: ~50 s on the shared 2-core box
def test_two_concurrent_runs_into_one_folder_both_end_up_in_the_report(tmp_path, builtin_only):
    out = tmp_path / "r"
    procs = []
    for section in ("blimp", "dai"):
        (tmp_path / section).mkdir()
        script = _script(tmp_path / section, f"""
            reproduce.reproduce(lm, "smoke", {str(out)!r}, sections=[{section!r}])
        """)
        procs.append(subprocess.Popen([sys.executable, str(script)], env=_env(), cwd=ROOT))
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    text = (out / "REPORT.md").read_text()
    assert reproduce.TITLES["blimp"] in text and reproduce.TITLES["dai"] in text
    head = pd.read_csv(out / "headline.csv")
    assert head.result.str.startswith("BLiMP").any() and head.result.str.startswith("Dai").any()


def _assert_same_results(a, b, units):
    for unit in units:
        ra, rb = _results(a, unit), _results(b, unit)
        assert ra == rb and ra, unit
    for csv in Path(b).glob("*.csv"):
        x, y = pd.read_csv(Path(a) / csv.name), pd.read_csv(csv)
        pd.testing.assert_frame_equal(_without_run_columns(x), _without_run_columns(y), check_exact=False, rtol=1e-9)


def test_two_shards_merged_equal_one_process_item_for_item(tiny, tmp_path, builtin_only):
    lm = tiny("llama")
    units = ["blimp", "dai", "table9", "fig6b", "table8"]
    single = reproduce.reproduce(lm, "smoke", tmp_path / "one", sections=units)
    a = reproduce.reproduce(lm, "smoke", tmp_path / "two", sections=units, shard="0/2")
    assert a.incomplete            # half the items so far
    b = reproduce.reproduce(lm, "smoke", tmp_path / "two", sections=units, shard=(1, 2))
    assert not b.incomplete and a.computed + b.computed == single.computed
    _assert_same_results(tmp_path / "one", tmp_path / "two", units)
    # strided: shard 0 computed the plan's items 0, 2, 4, ...
    plan = Store(tmp_path / "two").plan("blimp")["items"]
    assert a.meta["sections"]["blimp"]["n_done"] == len(plan[0::2])


@pytest.mark.slow
def test_torchrun_two_cpu_processes_equal_one_process(tmp_path, builtin_only):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.skip("torchrun is not installed")
    model = tmp_path / "model"
    save_tiny("llama", model)
    args = ["-m", "kn_utils", "reproduce", "--model", str(model), "--scale", "smoke", "--device", "cpu",
            "--sections", "blimp", "dai", "table9"]
    env = {**_env(), "KN_UTILS_CACHE": os.environ["KN_UTILS_CACHE"]}
    subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env, cwd=ROOT, check=True)
    subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29517", *args, "--out", str(tmp_path / "two")],
                   env=env, cwd=ROOT, check=True, timeout=600)
    _assert_same_results(tmp_path / "one", tmp_path / "two", ["blimp", "dai", "table9"])
    ranks = {r["worker"]["rank"] for r in Store(tmp_path / "two").records("blimp").values()}
    assert ranks == {0, 1}


def _close(a, b, rtol=1e-3):
    """Equal records, floats within ``rtol`` (a batch's v* differs from one request's only by
    float rounding of the batch shape)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b) or abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12)
    return a == b


def test_batched_table1_rome_items_equal_item_by_item(tiny, tmp_path, builtin_only, monkeypatch):
    """Table 1's ROME items computed BATCH at a time (one rome_compute call per relation in a
    batch) give the records of the one-item path, item for item; a batch spans relations and KN."""
    from kn_utils.editing.rome import compute as rome_compute_module
    from kn_utils.evaluation import evaluate_edits

    lm = tiny("llama")
    table1 = reproduce.UNITS["table1"]
    sizes = {"rome_n": 3, "kn_n": 1, "rome_steps": 6, "rome_configs": 2}   # rome, rome-cov and kn items
    assert table1.BATCH(SimpleNamespace(lm=lm)) == 1    # on a CPU: item by item (measured faster)
    monkeypatch.setattr(table1, "BATCH", 1)         # the runner then calls compute item by item
    one = reproduce.reproduce(lm, "smoke", tmp_path / "one", sections=["table1"], sizes=sizes)
    batches = []
    real = rome_compute_module.compute_values

    def counted(lm_, hp, templates, requests, **kw):
        batches.append(len(requests))
        return real(lm_, hp, templates, requests, **kw)
    monkeypatch.setattr(rome_compute_module, "compute_values", counted)
    monkeypatch.setattr(table1, "BATCH", 4)
    many = reproduce.reproduce(lm, "smoke", tmp_path / "many", sections=["table1"], sizes=sizes)
    assert not one.failed and not many.failed and one.computed == many.computed == 2 * 3 * 3 + 3
    assert batches and max(batches) > 1, batches    # several requests' v* in one batch
    a, b = _results(tmp_path / "one", "table1"), _results(tmp_path / "many", "table1")
    assert a.keys() == b.keys() and any(not r.get("_skipped") for r in a.values())
    for item in a:
        assert a[item].keys() == b[item].keys(), item
        bad = {k: (a[item][k], b[item][k]) for k in a[item] if not _close(a[item][k], b[item][k])}
        assert not bad, (item, bad)
    store = Store(tmp_path / "many")
    recs = store.records("table1", store.plan("table1")["key"])
    sizes_seen = {r["batch"] for r in recs.values()}
    assert sizes_seen <= {1, 2, 3, 4} and max(sizes_seen) == 4, sizes_seen
    assert all("batch" not in r for r in Store(tmp_path / "one").records("table1").values())
    with pytest.raises(ValueError, match="batch_rome=True is for editor='rome' only"):
        evaluate_edits(lm, "kn", "P36", n=2, batch_rome=True)


# ---------------------------------------------------------------------------------------------
# KN searches shared between units (Dai and Table 9, Fig 6b and Table 8)
# ---------------------------------------------------------------------------------------------
def test_search_store_round_trips_what_the_units_read(tmp_path):
    from collections import Counter

    from kn_utils.attribution import KNResult
    from kn_utils.store import SEARCH_FIELDS, SearchStore

    res = KNResult(neurons=[(1, 5), (3, 0)], tau=0.65, n_initial=7, r2=0.123456789, coarse=[[(1, 5)]],
                   counts=Counter({(1, 5): 2}), converged=False, message="tau at its bound", n_prompts=4)
    store = SearchStore(tmp_path, "model-a")
    key = store.key(["a b", "c d"], "x", {"steps": 3})
    assert store.get(key) is None
    store.put(key, res, 1.5, what="pararel P36 0")
    store.close()
    # another process (a fresh store) reads it from the files
    got = SearchStore(tmp_path, "model-a").get(key)
    assert all(getattr(got, f) == getattr(res, f) for f in SEARCH_FIELDS)
    # another model, prompt or setting is another search
    assert SearchStore(tmp_path, "model-b").get(SearchStore(tmp_path, "model-b").key(["a b", "c d"], "x", {"steps": 3})) is None
    assert store.key(["a b"], "x", {"steps": 3}) != key and store.key(["a b", "c d"], "x", {"steps": 4}) != key
    # not a unit: the report never lists it
    assert Store(tmp_path).units() == []


def test_table9_reuses_dai_searches_from_another_run_with_the_same_results(tiny, tmp_path, builtin_only,
                                                                            monkeypatch):
    import kn_utils.attribution as attribution

    calls = []
    real = attribution.find_knowledge_neurons

    def counting(lm, prompts, target, **kw):
        calls.append(tuple(prompts))
        return real(lm, prompts, target, **kw)

    monkeypatch.setattr(attribution, "find_knowledge_neurons", counting)
    lm = tiny("llama")
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    reproduce.reproduce(lm, "smoke", shared, sections=["dai"])
    dai_searches = set(calls)
    assert dai_searches
    calls.clear()
    reproduce.reproduce(lm, "smoke", shared, sections=["table9"])    # a later run, another section
    t9 = _results(shared, "table9")
    fresh = set(calls)
    assert not fresh & dai_searches       # every fact Dai searched was read, not searched again
    assert len(fresh) < len(t9)           # and some of Table 9's facts are Dai's
    # the same numbers as Table 9 searched on its own
    calls.clear()
    reproduce.reproduce(lm, "smoke", alone, sections=["table9"])
    assert t9 == _results(alone, "table9") and len(calls) == len(t9)
    # the search store is not a section of the report
    assert "_kn_searches" not in (shared / "REPORT.md").read_text()


def test_table1_adds_facts_where_the_first_ones_cannot_be_edited(tiny, builtin_only, monkeypatch):
    """Where some of a relation's first n facts are skipped (P101: a field without an occupation),
    Table 1 plans the facts after them until n are edited; those are evaluated among the first N
    facts, the first n as before (their records stay valid)."""
    from types import SimpleNamespace

    import kn_utils.evaluation as evaluation
    from kn_utils.experiments.common import SCALES, Context

    table1 = reproduce.UNITS["table1"]
    lm = tiny("llama")
    ctx = Context(lm, "smoke", {**SCALES["smoke"], "rome_n": 2, "kn_n": 2})
    real = evaluation.skip_reason
    # P36's fact 1 cannot be edited (for this test); every other fact as evaluate_edits says
    monkeypatch.setattr(evaluation, "skip_reason", lambda lm_, rel, bags, i: "no usable prompt"
                        if (rel, i) == ("P36", 1) else real(lm_, rel, bags, i))
    plan = table1.plan(ctx)
    p36 = [it for it in plan["items"] if it["label"] == "rome" and it["relation"] == "P36"]
    assert [it["index"] for it in p36] == [0, 1, 2] and [it.get("n_eval") for it in p36] == [None, None, 3]
    assert plan["info"]["extended"]["rome/P36"] == {"facts": 3, "skipped_in_first": 1}
    assert plan["n_minimum"] == len(plan["items"])     # smoke sizes: every planned item is needed
    seen = []
    monkeypatch.setattr(evaluation, "evaluate_edits", lambda lm_, **kw: seen.append(kw) or pd.DataFrame())
    for it in p36:
        table1.compute(ctx, it)
    assert [(kw["n"], kw["items"]) for kw in seen] == [(2, [0]), (2, [1]), (3, [2])]
