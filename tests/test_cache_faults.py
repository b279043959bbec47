"""Fault injection on the caches: concurrent and killed writers, damaged model folders, damaged
covariance statistics and context templates. Every case either repairs itself (with a warning that
names the path) or raises an error naming the path; none gives a raw library error or NaN weights.

The model folders here are tiny random models written by a builder function through the same
``cached_folder`` / ``load_converted`` code that ``convert_gguf`` uses, so no GGUF is converted.
"""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import kn_utils as ku
from kn_utils import cache, models
from kn_utils.editing import rome
from kn_utils.editing.rome import context_templates, layer_stats, model_key, stats_path

import tiny_models
from tiny_models import save_tiny, tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    tiny_models.default_tokenizer_dir()   # resolved in the real cache before the cache moves
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    rome.stats._STATS_IN_MEMORY.clear()
    rome.templates._TEMPLATE_CACHE.clear()
    yield tmp_path / "cache"
    rome.stats._STATS_IN_MEMORY.clear()
    rome.templates._TEMPLATE_CACHE.clear()


@pytest.fixture
def stats_passes(monkeypatch):
    """A spy: one entry per statistics pass over the corpus (a cache hit reads no corpus)."""
    calls, real = [], rome.stats._corpus_texts
    monkeypatch.setattr(rome.stats, "_corpus_texts", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


class Builder:
    """Writes a tiny LLaMA (seed 0) into the folder it is given and counts its calls."""

    def __init__(self, nan=False):
        self.calls = 0
        self.nan = nan

    def __call__(self, folder):
        self.calls += 1
        model, tok = tiny_model("llama")
        if self.nan:
            with torch.no_grad():
                model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
        model.save_pretrained(folder)
        tok.save_pretrained(folder)


def _load(target, build):
    return models.load_converted(
        lambda inode: cache.cached_folder(target, build, damaged_inode=inode), torch.float32, {})


def _assert_is_seed0_llama(model):
    reference = tiny_model("llama")[0].state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name]), name


def _tmp_folders(parent):
    return sorted(p.name for p in Path(parent).glob(".tmp-*"))


# ----------------------------------------------------------------------------- concurrent writers
_CHILD = r"""
import sys, time, json
from pathlib import Path
from kn_utils import cache, models
target, log, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
def build(folder):
    with open(log, "a") as f:
        f.write("build\n")
    time.sleep(1.5)      # a slow conversion: the other process arrives meanwhile
    (folder / "config.json").write_text(json.dumps({"model_type": "stand-in"}))
    (folder / "weights.bin").write_bytes(b"x" * 1000)
while not go.exists():
    time.sleep(0.01)
print(cache.cached_folder(target, build))
"""


@pytest.mark.slow  # subprocesses / a statistics pass
def test_two_processes_loading_at_once_build_one_folder(tmp_path):
    target, log, go = tmp_path / "models" / "m", tmp_path / "log", tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(target), str(log), str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]      # before: OSError [Errno 39] Directory not empty
        assert out.strip() == str(target)
    assert log.read_text() == "build\n"            # the second waited and found the first's folder
    assert cache.check_model_folder(target) is None and (target / "weights.bin").stat().st_size == 1000
    assert _tmp_folders(target.parent) == []


def test_without_a_lock_the_rename_race_keeps_the_winner(tmp_path, monkeypatch):
    # Where flock does nothing (some network file systems) both writers build; the loser's rename
    # meets a non-empty folder and must drop its own copy instead of failing.
    monkeypatch.setattr(cache, "_locked", lambda target: contextlib.nullcontext())
    target = tmp_path / "models" / "m"
    both_building = threading.Barrier(2, timeout=60)
    calls, results, errors = [], [], []

    def build(folder):
        calls.append(folder)
        both_building.wait()
        (folder / "config.json").write_text(json.dumps({"model_type": "stand-in", "by": str(folder)}))

    def run():
        try:
            results.append(cache.cached_folder(target, build))
        except Exception as err:   # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and results == [target, target] and len(calls) == 2
    assert cache.check_model_folder(target) is None
    assert _tmp_folders(target.parent) == []


_KILLED = r"""
import sys, time
from pathlib import Path
from kn_utils import cache, models
def build(folder):
    (folder / "model.safetensors").write_bytes(b"half written")
    print(folder, flush=True)
    time.sleep(600)
cache.cached_folder(Path(sys.argv[1]), build)
"""


@pytest.mark.slow  # subprocesses / a statistics pass
def test_a_killed_conversion_leaves_nothing_behind_a_live_one_is_untouched(tmp_path):
    target = tmp_path / "models" / "m"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", _KILLED, str(target)], env=env,
                             stdout=subprocess.PIPE, text=True)
    half = Path(child.stdout.readline().strip())
    assert half.parent == target.parent and half.name.startswith(".tmp-pid")
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
    child.stdout.close()
    # a writer that is still alive (this process), and a folder of an older kn_utils (no pid)
    live = target.parent / f".tmp-pid{os.getpid()}-busy"
    live.mkdir()
    legacy_old, legacy_new = target.parent / ".tmp-abc_old", target.parent / ".tmp-abc_new"
    legacy_old.mkdir(), legacy_new.mkdir()
    os.utime(legacy_old, (time.time() - 2 * cache._LEGACY_TMP_AGE_S,) * 2)
    assert half.exists()

    build = Builder()
    model, _, folder = _load(target, build)
    assert folder == target and build.calls == 1
    assert not half.exists() and not legacy_old.exists()
    assert live.exists() and legacy_new.exists()
    _assert_is_seed0_llama(model)


# ----------------------------------------------------------------------------- damaged model folders
def _truncate(folder):
    path = folder / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _garbage(name):
    def damage(folder):
        (folder / name).write_bytes(b"\x00garbage{[" * 50)
    return damage


def _nan_bytes(folder, keep_mtime=True):
    """A few KB of 0xFF bytes (float32 NaN) inside the tensor data, the mtime put back: only the
    finite-weights check after loading can see it."""
    path = folder / "model.safetensors"
    stat = path.stat()
    n = int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as f:
        f.seek(8 + n + 64)
        f.write(b"\xff" * 4096)
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


DAMAGE = {
    "truncated weights": _truncate,
    "garbage config.json": _garbage("config.json"),
    "garbage tokenizer.json": _garbage("tokenizer.json"),
    "flipped bytes, mtime kept": _nan_bytes,
    "flipped bytes": lambda folder: _nan_bytes(folder, keep_mtime=False),
    "garbage manifest": _garbage(cache.MANIFEST),
}


@pytest.mark.slow  # 12 cases, each builds and loads a model folder twice
@pytest.mark.parametrize("legacy", [False, True], ids=["manifest", "no manifest"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_cached_model_is_rebuilt_with_a_warning(tmp_path, damage, legacy):
    if legacy and damage == "garbage manifest":
        pytest.skip("no manifest to damage")
    target = tmp_path / "models" / "m"
    build = Builder()
    _load(target, build)
    if legacy:   # a cache written by an older kn_utils
        (target / cache.MANIFEST).unlink()
    DAMAGE[damage](target)
    with pytest.warns(UserWarning, match=re.escape(str(target))):
        model, tok, folder = _load(target, build)
    assert build.calls == 2 and folder == target
    _assert_is_seed0_llama(model)
    assert tok("Paris")["input_ids"]
    assert cache.check_model_folder(target) is None and _tmp_folders(target.parent) == []
    # repaired for good: the next load neither warns nor rebuilds
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _load(target, build)
    assert build.calls == 2


def test_intact_cache_is_not_rebuilt_and_a_copy_is_trusted(tmp_path):
    target = tmp_path / "models" / "m"
    build = Builder()
    _load(target, build)
    os.utime(target / "model.safetensors")      # touched (copied, backed up): content still intact
    _load(target, build)
    assert build.calls == 1
    manifest = json.loads((target / cache.MANIFEST).read_text())["files"]
    assert manifest["model.safetensors"]["mtime_ns"] == (target / "model.safetensors").stat().st_mtime_ns


def test_a_cache_that_stays_damaged_says_which_folder_to_delete(tmp_path):
    target = tmp_path / "models" / "m"
    # files as written (manifest digests match) but NaN weights: rebuilding cannot help
    build = Builder(nan=True)
    with pytest.raises(cache.DamagedCache, match=re.escape(str(target)) + ".*NaN.*delete"):
        _load(target, build)
    assert build.calls == 1
    # without a manifest (an older cache) it is rebuilt once, then the error names the folder
    (target / cache.MANIFEST).unlink()
    with pytest.warns(UserWarning, match=re.escape(str(target))):
        with pytest.raises(cache.DamagedCache, match=re.escape(str(target)) + ".*delete"):
            _load(target, build)
    assert build.calls == 2


def test_a_load_error_that_is_not_the_caches_fault_is_not_a_rebuild(tmp_path):
    target = tmp_path / "models" / "m"
    build = Builder()
    _load(target, build)
    with pytest.raises(Exception) as info:
        models.load_converted(lambda inode: cache.cached_folder(target, build, damaged_inode=inode),
                              torch.float32, {"device_map": "no-such-device"})
    assert not isinstance(info.value, cache.DamagedCache)
    assert build.calls == 1 and cache.check_model_folder(target) is None


@pytest.mark.parametrize("damage", ["truncated weights", "garbage config.json", "flipped bytes"])
def test_damaged_user_folder_names_the_folder(tmp_path, damage):
    folder = Path(save_tiny("llama", tmp_path / "llama"))
    DAMAGE[damage](folder)
    with pytest.raises(OSError, match=re.escape(str(folder))):
        ku.load_model(str(folder), device="cpu")


# ----------------------------------------------------------------------------- covariance statistics
def _nan_stats(path):
    data = torch.load(path, weights_only=True)
    data["mom2"][0, 0] = float("nan")
    torch.save(data, path)


STATS_DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "garbage": lambda p: p.write_bytes(b"not a torch file" * 20),
    "wrong shape": lambda p: torch.save({"mom2": torch.eye(3)}, p),
    "no mom2": lambda p: torch.save({"count": 5}, p),
    "NaN": _nan_stats,
}


@pytest.mark.parametrize("damage", list(STATS_DAMAGE))
def test_damaged_statistics_are_recomputed(tiny, tmp_cache, data_dir, damage, stats_passes):
    lm = tiny("llama")
    first = layer_stats(lm, 1, "wikitext", 200, data_dir=data_dir, progress=False)
    path = stats_path(lm, 1, "wikitext", 200)
    STATS_DAMAGE[damage](path)
    rome.stats._STATS_IN_MEMORY.clear()
    start = len(stats_passes)
    with pytest.warns(UserWarning, match=re.escape(str(path))):
        again = layer_stats(lm, 1, "wikitext", 200, data_dir=data_dir, progress=False)
    assert len(stats_passes) == start + 1
    assert torch.equal(again, first)
    rome.stats._STATS_IN_MEMORY.clear()
    assert torch.equal(layer_stats(lm, 1, "wikitext", 200, data_dir=data_dir, progress=False), first)
    assert len(stats_passes) == start + 1     # the rewritten file is read back


def test_a_killed_statistics_writer_leaves_nothing_behind(tiny, tmp_cache, data_dir):
    lm = tiny("llama")
    path = stats_path(lm, 2, "wikitext", 100)
    path.parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = path.with_name(f"{path.name}.{dead}.tmp")
    live = path.with_name(f"{path.name}.1.tmp")     # pid 1 is alive: another writer, mid-write
    stale.write_bytes(b"half"), live.write_bytes(b"busy")
    layer_stats(lm, 2, "wikitext", 100, data_dir=data_dir, progress=False)
    assert not stale.exists() and live.exists() and path.exists()


def test_nan_activations_give_an_error_and_no_statistics_file(tmp_cache, data_dir):
    model, tok = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    lm = ku.load_model(model, tokenizer=tok, device="cpu")
    with pytest.raises(ValueError, match="NaN or inf"):
        layer_stats(lm, 1, "wikitext", 200, data_dir=data_dir, progress=False)
    assert not stats_path(lm, 1, "wikitext", 200).exists()
    assert ku.hook_count(lm.model) == 0


def test_rome_refuses_nan_statistics_and_changes_no_weight(tmp_cache, monkeypatch):
    model, tok = tiny_model("llama")
    lm = ku.load_model(model, tokenizer=tok, device="cpu")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    nan = torch.full((lm.arch.n_neurons,) * 2, float("nan"))
    monkeypatch.setattr(rome.stats, "layer_stats", lambda *a, **k: nan)
    hp = rome.ROMEHyperParams(layer=1, v_num_grad_steps=2, context_template_length_params=[[3, 1]],
                              mom2_adjustment=True)
    with pytest.raises(ValueError, match="not finite"):   # before: delta_norm = nan, NaN weights
        ku.rome_edit(lm, "The capital of France is", "France", "Rome", hp)
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert ku.hook_count(lm.model) == 0


@pytest.mark.slow  # subprocesses / a statistics pass
def test_same_weights_in_two_folders_share_one_statistics_file(tmp_cache, tmp_path, data_dir, stats_passes):
    a = save_tiny("llama", tmp_path / "a")
    b = shutil.copytree(a, tmp_path / "elsewhere" / "b")
    lm_a, lm_b = ku.load_model(a, device="cpu"), ku.load_model(str(b), device="cpu")
    assert lm_a.name != lm_b.name and model_key(lm_a) == model_key(lm_b)
    start = len(stats_passes)
    first = layer_stats(lm_a, 0, "wikitext", 150, data_dir=data_dir, progress=False)
    second = layer_stats(lm_b, 0, "wikitext", 150, data_dir=data_dir, progress=False)
    assert len(stats_passes) == start + 1 and torch.equal(first, second)
    assert len(list((tmp_cache / "stats").iterdir())) == 1
    # other weights under the same folder name: another key
    other = ku.load_model(save_tiny("llama", tmp_path / "c", seed=1), device="cpu")
    assert model_key(other) != model_key(lm_a)


def test_statistics_truncate_to_the_models_context(tmp_cache, data_dir):
    import transformers as T

    tok = tiny_models.bpe_tokenizer()
    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=16,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    lm = ku.load_model(T.GPT2LMHeadModel(cfg).eval(), tokenizer=tok, device="cpu")
    assert lm.arch.max_positions == 16
    # before: the 256-token default overflowed the 16 positions (index error)
    fast = layer_stats(lm, 1, "wikitext", 300, data_dir=data_dir, progress=False)
    from kn_utils.data.text import load_texts
    total, seen = torch.zeros(lm.arch.n_neurons, lm.arch.n_neurons, dtype=torch.float64), 0
    for text in load_texts("wikitext", data_dir):
        ids = tok(text, truncation=True, max_length=16)["input_ids"]
        if len(ids) < 2:
            continue
        with ku.record(lm, "neurons", 1) as acts, torch.no_grad():
            lm.model(torch.tensor([ids]))
        k = acts[1][0, : 300 - seen].double()
        total += k.T @ k
        seen += k.shape[0]
        if seen == 300:
            break
    assert torch.allclose(fast.double(), total / seen, atol=1e-6, rtol=1e-4)


def test_roberta_context_excludes_its_padding_offset(tiny):
    lm = tiny("roberta")   # 130 position embeddings; positions start after padding_idx
    n = lm.arch.max_positions
    assert n == 130 - lm.model.config.pad_token_id - 1
    ids = torch.full((1, n), 100)
    with torch.no_grad():
        lm.model(input_ids=ids)                 # the longest input it accepts runs ...
        with pytest.raises((IndexError, RuntimeError)):
            lm.model(input_ids=torch.full((1, n + 1), 100))   # ... one more token does not
    llama = tiny("llama")
    assert llama.arch.max_positions == llama.model.config.max_position_embeddings


# ----------------------------------------------------------------------------- context templates
@pytest.mark.parametrize("content", ["{not json", json.dumps({"a": 1}), json.dumps(["{}", "no slot"])])
def test_damaged_context_templates_are_generated_again(tiny, tmp_cache, content):
    lm = tiny("llama")
    first = context_templates(lm, [[3, 2]], seed=0)
    [path] = (tmp_cache / "context_templates").iterdir()
    path.write_text(content)
    rome.templates._TEMPLATE_CACHE.clear()
    with pytest.warns(UserWarning, match=re.escape(str(path))):
        again = context_templates(lm, [[3, 2]], seed=0)
    assert again == first and json.loads(path.read_text()) == first


# ----------------------------------------------------------------------------- caches keyed by the weights
ERASED = [(layer, i) for layer in range(3) for i in range(0, 64, 2)]   # half the neurons of every layer


def _clean_templates(lm, params, seed=0):
    """What the unedited, unhooked model generates (no cache involved)."""
    return ["{}"] + rome.templates._generate(lm, tuple(tuple(p) for p in params), seed)


def test_templates_generated_under_an_edit_or_a_hook_never_reach_the_clean_model(tiny, tmp_cache):
    lm = tiny("llama")
    clean = _clean_templates(lm, [[5, 3]])
    with ku.kn_erase(lm, ERASED):
        erased = context_templates(lm, [[5, 3]])
    assert erased != clean                      # the edit changes what the model generates ...
    assert context_templates(lm, [[5, 3]]) == clean   # before: the erased model's templates
    with pytest.warns(UserWarning, match="forward hook"), ku.suppress(lm, ERASED):
        hooked = context_templates(lm, [[5, 3]])
    assert hooked != clean
    files = sorted(p.name for p in (tmp_cache / "context_templates").iterdir())
    assert len(files) == 2                      # clean and erased; nothing written under the hook
    rome.templates._TEMPLATE_CACHE.clear()      # a new process reads the disk copies
    assert context_templates(lm, [[5, 3]]) == clean
    with ku.kn_erase(lm, ERASED):
        assert context_templates(lm, [[5, 3]]) == erased


def test_statistics_under_an_edit_or_a_hook_never_reach_the_clean_model(tiny, tmp_cache, data_dir,
                                                                         stats_passes):
    lm = tiny("llama")
    clean = layer_stats(lm, 2, "wikitext", 150, data_dir=data_dir, progress=False)
    rome.stats._STATS_IN_MEMORY.clear()
    clean_path = stats_path(lm, 2, "wikitext", 150)
    with ku.kn_erase(lm, [(0, i) for i in range(0, 64, 2)]):
        assert stats_path(lm, 2, "wikitext", 150) != clean_path      # layer 0 feeds layer 2's keys
        erased = layer_stats(lm, 2, "wikitext", 150, data_dir=data_dir, progress=False)
    assert not torch.equal(erased, clean)
    with ku.kn_erase(lm, [(2, i) for i in range(0, 64, 2)]):
        # layer 2's own value slots (what ROME edits) come after its keys: same entry, no new pass
        assert stats_path(lm, 2, "wikitext", 150) == clean_path
        start = len(stats_passes)
        assert torch.equal(layer_stats(lm, 2, "wikitext", 150, data_dir=data_dir, progress=False), clean)
        assert len(stats_passes) == start
    with pytest.warns(UserWarning, match="forward hook"), ku.suppress(lm, [(1, i) for i in range(32)]):
        hooked = layer_stats(lm, 2, "wikitext", 150, data_dir=data_dir, progress=False)
    assert not torch.equal(hooked, clean)
    rome.stats._STATS_IN_MEMORY.clear()
    # before: the statistics computed inside `with ku.suppress(...)` replaced the clean ones
    assert torch.equal(layer_stats(lm, 2, "wikitext", 150, data_dir=data_dir, progress=False), clean)
    assert torch.load(clean_path, weights_only=True)["key"] == rome.stats.stats_key(lm, 2)


def test_a_statistics_file_of_another_model_is_recomputed(tiny, tmp_cache, data_dir, stats_passes):
    a, b = tiny("llama"), tiny("llama", seed=1)   # same shapes, other weights
    layer_stats(a, 1, "wikitext", 120, data_dir=data_dir, progress=False)
    target = stats_path(b, 1, "wikitext", 120)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(stats_path(a, 1, "wikitext", 120), target)
    start = len(stats_passes)
    with pytest.warns(UserWarning, match="another model or other weights"):
        got = layer_stats(b, 1, "wikitext", 120, data_dir=data_dir, progress=False)
    assert len(stats_passes) == start + 1
    assert torch.equal(got, layer_stats(b, 1, "wikitext", 120, data_dir=data_dir, progress=False,
                                        recompute=True))


def test_weights_digest_sees_one_value_slot_and_every_row(tiny):
    lm = tiny("gpt2")                            # Conv1D: value slots are rows, not columns
    before = rome.stats.weights_digest(lm.model.parameters())
    for neurons in ([(1, 63)], [(0, 0)]):
        with ku.kn_erase(lm, neurons):
            assert rome.stats.weights_digest(lm.model.parameters()) != before
    assert rome.stats.weights_digest(lm.model.parameters()) == before


# ----------------------------------------------------------------------------- read-only caches
def _read_only(monkeypatch, root: Path):
    """Make ``root`` unwritable: permissions for a user; for root (whom permissions do not stop),
    every write, folder creation or rename under it fails with EROFS, as on a read-only mount."""
    import builtins
    import errno
    import io

    root = Path(root)
    if os.geteuid() != 0:
        for folder in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
            folder.chmod(0o555)
        return

    def refuse(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    def inside(path):
        return str(Path(path).absolute()).startswith(str(root.absolute()))

    real_open, real_mkdir, real_replace = builtins.open, Path.mkdir, Path.replace

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_mkdir(self, *args, **kwargs):
        if inside(self) and not self.is_dir():
            refuse(self)
        return real_mkdir(self, *args, **kwargs)

    def guarded_replace(self, target):
        if inside(target):
            refuse(target)
        return real_replace(self, target)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(Path, "mkdir", guarded_mkdir)
    monkeypatch.setattr(Path, "replace", guarded_replace)


HP = dict(layer=1, v_num_grad_steps=2, context_template_length_params=[[3, 2]], mom2_adjustment=True,
          mom2_n_samples=100, mom2_dataset="wikitext")


def test_a_read_only_cache_that_holds_the_statistics_and_templates_serves_them(
        tiny, tmp_cache, data_dir, monkeypatch, stats_passes, recwarn):
    lm = tiny("llama")
    hp = rome.ROMEHyperParams(**HP)
    with ku.rome_edit(lm, "The capital of France is", "France", "Rome", hp, data_dir=data_dir) as first:
        pass
    rome.stats._STATS_IN_MEMORY.clear()
    rome.templates._TEMPLATE_CACHE.clear()
    _read_only(monkeypatch, tmp_cache)
    start = len(stats_passes)
    recwarn.clear()
    with ku.rome_edit(lm, "The capital of France is", "France", "Rome", hp, data_dir=data_dir) as again:
        assert torch.equal(again.update_matrix(), first.update_matrix())
    assert len(stats_passes) == start
    assert not [w for w in recwarn if "kn_utils" in str(w.message)]


def test_an_empty_read_only_cache_keeps_rome_usable_with_a_warning(tiny, tmp_cache, data_dir,
                                                                    monkeypatch, stats_passes):
    lm = tiny("llama")
    tmp_cache.mkdir(parents=True)
    _read_only(monkeypatch, tmp_cache)
    hp = rome.ROMEHyperParams(**HP)
    with pytest.warns(UserWarning) as caught:
        # before: OSError [Errno 30] (or 13) from writing the templates file; ROME unusable
        edit = ku.rome_edit(lm, "The capital of France is", "France", "Rome", hp, data_dir=data_dir)
    edit.restore()
    texts = [str(w.message) for w in caught]
    for what in ("context templates", "covariance statistics"):
        assert any(f"cannot write {what} under {tmp_cache}" in t and "in memory" in t for t in texts), texts
    start = len(stats_passes)
    ku.rome_edit(lm, "The capital of France is", "France", "Rome", hp, data_dir=data_dir).restore()
    assert len(stats_passes) == start            # the second edit of the process reuses them
    assert not any(tmp_cache.rglob("*.tmp"))


def test_a_cache_below_a_read_only_folder_warns_naming_it(tiny, tmp_path, monkeypatch):
    tiny_models.default_tokenizer_dir()
    parent = tmp_path / "ro"
    parent.mkdir()
    _read_only(monkeypatch, parent)
    monkeypatch.setenv(cache.CACHE_ENV, str(parent / "cache"))
    rome.templates._TEMPLATE_CACHE.clear()
    lm = tiny("llama")
    with pytest.warns(UserWarning, match=re.escape(str(parent / "cache"))):
        templates = context_templates(lm, [[3, 2]])
    assert templates == _clean_templates(lm, [[3, 2]])
    rome.templates._TEMPLATE_CACHE.clear()


def test_cache_files_follow_the_umask(tiny, tmp_cache, data_dir):
    lm = tiny("llama")
    old = os.umask(0o002)
    try:
        context_templates(lm, [[3, 1]])
        layer_stats(lm, 0, "wikitext", 50, data_dir=data_dir, progress=False)
    finally:
        os.umask(old)
    for path in [*tmp_cache.joinpath("context_templates").rglob("*"), *tmp_cache.joinpath("stats").rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o775 if path.is_dir() else 0o664), path
