"""load_model on the real embedded model: predictions, sizes, the GGUF cache, offline errors."""
import os
import re
import subprocess
import sys

import pytest
import torch

import kn_utils as ku
from kn_utils import cache, models


@pytest.mark.slow
def test_default_model_knows_capitals(default_lm):
    assert default_lm.arch.n_layers == 30
    assert default_lm.arch.n_neurons == 1536
    assert not default_lm.arch.is_masked_lm
    assert ku.predict(default_lm, "The capital of France is", top_k=5)[0][0] == " Paris"
    assert ku.predict(default_lm, "The capital of Canada is", top_k=5)[0][0] == " Ottawa"


@pytest.mark.slow
def test_predict_probabilities_are_sorted_and_consistent(default_lm):
    top = ku.predict(default_lm, "The capital of France is", top_k=5)
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    # target_probability of the top-1 token equals its predicted probability
    assert ku.target_probability(default_lm, "The capital of France is", "Paris") == pytest.approx(probs[0], rel=1e-5)


@pytest.mark.slow
def test_gguf_is_converted_once_then_loaded_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    calls = []
    real = models.convert_gguf

    def spy(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(models, "convert_gguf", spy)
    first = ku.load_model("default", device="cpu")
    cached = cache._gguf_cache_path(models.default_gguf_path())
    assert cached.parent == tmp_path / "models" and (cached / "model.safetensors").exists()
    mtime = (cached / "model.safetensors").stat().st_mtime_ns

    # Second load: conversion must not run again; the GGUF reader is made to fail to prove it.
    import transformers

    def no_gguf(*args, **kwargs):
        if "gguf_file" in kwargs:
            raise AssertionError("GGUF was read again instead of the cache")
        return original(*args, **kwargs)

    original = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    second = ku.load_model("default", device="cpu")
    assert (cached / "model.safetensors").stat().st_mtime_ns == mtime
    assert len(calls) == 2
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow  # a fresh interpreter importing transformers
def test_offline_hub_id_gives_a_clear_error():
    code = ("import kn_utils as ku\n"
            "try:\n    ku.load_model('gpt2-xl')\n"
            "except OSError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR" in out.stdout, out.stderr[-2000:]
    assert "HF_HUB_OFFLINE=1" in out.stdout and "load_model('DIR')" in out.stdout


def test_bad_sources_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="source must be"):
        ku.load_model("")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        ku.load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(TypeError, match="Linear is not a transformers PreTrainedModel"):
        ku.load_model(torch.nn.Linear(2, 2), tokenizer=object())


def test_local_folder_and_dtypes(tmp_path, tiny):
    from tiny_models import save_tiny

    folder = save_tiny("gpt2", tmp_path / "gpt2")
    lm = ku.load_model(folder, device="cpu")
    assert lm.arch.family == "gpt2" and lm.dtype == torch.float32 and not lm.model.training
    lm16 = ku.load_model(folder, device="cpu", dtype="bfloat16")
    assert lm16.dtype == torch.bfloat16
    assert len(ku.predict(lm16, "Hello there", top_k=3)) == 3
    masked = ku.load_model(save_tiny("bert", tmp_path / "bert"), device="cpu")
    assert masked.arch.is_masked_lm


def test_models_without_a_language_model_head_are_refused(tmp_path):
    import transformers as T
    from tiny_models import bert_tokenizer

    tok = bert_tokenizer()
    cfg = T.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64)
    for cls in (T.BertModel, T.BertForSequenceClassification):
        model = cls(cfg)
        with pytest.raises(ValueError, match=f"{cls.__name__} has no language-model head"):
            ku.load_model(model, tokenizer=tok, device="cpu")
        # saved to a folder: before, loaded as a causal LM with a fresh random head (or crashed)
        folder = tmp_path / cls.__name__
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        with pytest.raises(ValueError, match=f"{cls.__name__}, which has no language-model head"):
            ku.load_model(str(folder), device="cpu")


def test_a_missing_folder_is_not_reported_as_a_hub_failure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for source in (str(tmp_path / "nowhere"), tmp_path / "nowhere", "./nowhere", "~/no/such/kn_folder",
                   "models/gpt2"):
        with pytest.raises(FileNotFoundError, match="model folder not found"):
            ku.load_model(source, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match=f"{empty}.*config.json is missing"):
        ku.load_model(str(empty), device="cpu")


@pytest.mark.parametrize("dtype", ["float17", "int8", torch.int64, 3])
def test_bad_dtype_is_one_clear_error(tmp_path, tiny, dtype):
    from tiny_models import save_tiny

    folder = save_tiny("gpt2", tmp_path / "gpt2")
    with pytest.raises(ValueError, match=f"dtype {re.escape(repr(dtype))} is not a floating-point"):
        ku.load_model(folder, device="cpu", dtype=dtype)
    with pytest.raises(ValueError, match="not a floating-point"):
        ku.load_model(tiny("gpt2").model, tokenizer=tiny("gpt2").tokenizer, dtype=dtype)


def test_dtype_auto_keeps_the_checkpoint_dtype(tmp_path):
    from tiny_models import tiny_model

    model, tok = tiny_model("llama")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tok.save_pretrained(tmp_path / "bf16")
    assert ku.load_model(str(tmp_path / "bf16"), device="cpu", dtype="auto").dtype == torch.bfloat16
    assert ku.load_model(str(tmp_path / "bf16"), device="cpu").dtype == torch.float32


@pytest.mark.parametrize("device_map, extra", [("cpu", {}), ("auto", {"max_memory": {"cpu": "2GiB"}})])
def test_device_map_passes_through_and_nothing_moves_the_model_afterwards(tmp_path, monkeypatch,
                                                                           device_map, extra):
    from tiny_models import save_tiny

    folder = save_tiny("llama", tmp_path / "llama")
    reference = ku.load_model(folder, device="cpu")
    seen = {}
    real_from_pretrained = models._from_pretrained

    def spy(source, dtype, hf_kwargs):
        seen["kwargs"] = dict(hf_kwargs)
        model, tok = real_from_pretrained(source, dtype, hf_kwargs)
        # from here on, load_model must not move the model (.to would undo accelerate's placement)
        monkeypatch.setattr(type(model), "to", lambda self, *a, **k: pytest.fail(f"moved: .to{a}{k}"))
        return model, tok

    monkeypatch.setattr(models, "_from_pretrained", spy)
    lm = ku.load_model(folder, device_map=device_map, **extra)
    assert seen["kwargs"] == {"device_map": device_map, **extra}
    assert lm.device.type == "cpu"
    prompt = "The capital of France is"
    ids = reference.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, reference.model(ids).logits, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        ku.load_model(folder, device="cpu", device_map=device_map)
    with pytest.raises(ValueError, match="device_map"):
        ku.load_model(reference.model, tokenizer=reference.tokenizer, device_map=device_map)


def test_max_memory_reaches_accelerate(tmp_path):
    from tiny_models import save_tiny

    folder = save_tiny("llama", tmp_path / "llama")
    # 10 KiB of CPU memory: accelerate offloads every weight to disk (meta tensors here), which it
    # only does when it received max_memory; a later .to(device) would have failed on them
    lm = ku.load_model(folder, device_map="auto", max_memory={"cpu": "10KiB"})
    assert {p.device.type for p in lm.model.parameters()} == {"meta"}


# ---------------------------------------------------------------------- a cache shared or read-only
# (issue 18: converted folders were created drwx------; a read-only cache gave a raw Errno 30)
class _StandIn:
    """Writes a tiny LLaMA (seed 0) into the folder it is given; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, folder):
        from tiny_models import tiny_model

        self.calls += 1
        model, tok = tiny_model("llama")
        model.save_pretrained(folder)
        tok.save_pretrained(folder)


def _load_cached(target, build):
    return models.load_converted(lambda inode: cache.cached_folder(target, build, damaged_inode=inode),
                                 torch.float32, {})


@pytest.fixture
def user_umask():
    def set_to(mask):
        os.umask(mask)
    old = os.umask(0o022)
    yield set_to
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_converted_folders_follow_the_umask(tmp_path, user_umask, mask):
    user_umask(mask)
    target = tmp_path / "models" / "m"
    _load_cached(target, _StandIn())
    assert target.stat().st_mode & 0o777 == 0o777 & ~mask      # was 0o700 (tempfile.mkdtemp)
    for path in target.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path.name


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: from now on every write under ``folder`` fails as on a read-only file
    system (EROFS). Simulated because the tests may run as root, whom permission bits do not stop."""
    import builtins
    import errno
    import io
    from pathlib import Path

    roots = []

    def inside(path):
        try:
            p = Path(os.fsdecode(path)).absolute()
        except TypeError:
            return False    # a file descriptor
        return any(p == r or r in p.parents for r in roots)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def guard(real, n_paths=1, writes=lambda *a, **k: True):
        def wrapped(*args, **kwargs):
            if any(inside(a) for a in args[:n_paths]) and writes(*args, **kwargs):
                refuse(args[0])
            return real(*args, **kwargs)
        return wrapped

    def open_writes(file, mode="r", *a, **k):
        return any(c in mode for c in "wax+")

    def os_open_writes(path, flags, *a, **k):
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))

    monkeypatch.setattr(builtins, "open", guard(builtins.open, writes=open_writes))
    monkeypatch.setattr(io, "open", guard(io.open, writes=open_writes))
    monkeypatch.setattr(os, "open", guard(os.open, writes=os_open_writes))
    for name in ("mkdir", "rmdir", "unlink", "remove", "chmod", "utime"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    for name in ("replace", "rename"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), n_paths=2))
    return lambda folder: roots.append(Path(folder).absolute())


def test_the_read_only_simulation_refuses_writes(tmp_path, read_only):
    read_only(tmp_path)
    with pytest.raises(OSError, match="Read-only"):
        (tmp_path / "x").write_text("x")
    with pytest.raises(OSError, match="Read-only"):
        (tmp_path / "d").mkdir()
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_cache_that_holds_the_model_serves_it(tmp_path, read_only):
    target = tmp_path / "cache" / "models" / "m"
    build = _StandIn()
    first, _, _ = _load_cached(target, build)
    os.utime(target / "config.json")   # a copied cache: mtimes moved, content intact (manifest rewrite)
    read_only(tmp_path / "cache")
    second, _, folder = _load_cached(target, build)
    assert folder == target and build.calls == 1
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_an_empty_read_only_cache_says_which_folder(tmp_path, read_only, monkeypatch):
    root = tmp_path / "cache"
    root.mkdir()
    read_only(root)
    build = _StandIn()
    with pytest.raises(cache.CacheNotWritable, match=re.escape(str(root / "models")) + ".*KN_UTILS_CACHE"):
        _load_cached(root / "models" / "m", build)
    assert build.calls == 0 and list(root.iterdir()) == []


def test_an_empty_read_only_cache_names_the_folder_for_gemma_too(tmp_path, read_only, monkeypatch):
    import importlib

    from kn_utils import registry

    if importlib.util.find_spec(registry.GEMMA_ASSEMBLER) is None:
        pytest.skip("Gemma packages not installed")
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    read_only(tmp_path)
    with pytest.raises(cache.CacheNotWritable, match=re.escape(str(tmp_path / "gguf")) + ".*cannot be written"):
        registry.gemma_gguf_path()
