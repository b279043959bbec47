"""load_model on the real embedded model: predictions, sizes, the GGUF cache, offline errors."""
import os
import subprocess
import sys

import pytest
import torch

import kn_utils as ku
from kn_utils import models


def test_default_model_knows_capitals(default_lm):
    assert default_lm.arch.n_layers == 30
    assert default_lm.arch.n_neurons == 1536
    assert not default_lm.arch.is_masked_lm
    assert ku.predict(default_lm, "The capital of France is", top_k=5)[0][0] == " Paris"
    assert ku.predict(default_lm, "The capital of Canada is", top_k=5)[0][0] == " Ottawa"


def test_predict_probabilities_are_sorted_and_consistent(default_lm):
    top = ku.predict(default_lm, "The capital of France is", top_k=5)
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    # target_probability of the top-1 token equals its predicted probability
    assert ku.target_probability(default_lm, "The capital of France is", "Paris") == pytest.approx(probs[0], rel=1e-5)


def test_gguf_is_converted_once_then_loaded_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    calls = []
    real = models.convert_gguf

    def spy(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(models, "convert_gguf", spy)
    first = ku.load_model("default", device="cpu")
    cached = models._gguf_cache_path(models.default_gguf_path())
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
    with pytest.raises(ValueError, match="tokenizer="):
        ku.load_model(torch.nn.Linear(2, 2))


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
