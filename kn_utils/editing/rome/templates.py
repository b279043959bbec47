"""ROME's context templates: the bare prompt plus short model-generated prefixes."""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch

from ...cache import cache_dir
from .stats import model_key

_GEN_PREFIXES = ("The", "Therefore", "Because", "I", "You")
# (model fingerprint, length params, seed) -> templates; the disk copy outlives the process
_TEMPLATE_CACHE: dict[tuple, list[str]] = {}


def context_templates(lm, length_params=((5, 10), (10, 10)), seed: int = 0) -> list[str]:
    """``["{}", "<generated text>. {}", ...]``: the bare prompt plus model-generated prefixes.

    For each ``[length, count]``: ``count`` texts of ``length`` new tokens, sampled (top-k 5) from the
    prefixes "The", "Therefore", "Because", "I", "You" in turn, seeded.  Cached per model in memory
    and on disk.  Masked LMs do not generate: they get the bare prompt only.
    """
    params = tuple(tuple(int(x) for x in p) for p in length_params)
    if lm.arch.is_masked_lm or not params:
        return ["{}"]
    key = (model_key(lm), params, seed)
    if key in _TEMPLATE_CACHE:
        return list(_TEMPLATE_CACHE[key])
    path = cache_dir() / "context_templates" / f"{key[0]}-{hashlib.sha1(repr(key).encode()).hexdigest()[:8]}.json"
    templates = _read_templates(path, 1 + sum(count for _, count in params)) if path.exists() else None
    if templates is None:
        templates = ["{}"] + _generate(lm, params, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(templates, indent=0))
        tmp.replace(path)
    _TEMPLATE_CACHE[key] = templates
    return list(templates)


def _read_templates(path: Path, expected: int) -> list[str] | None:
    """Cached templates, or None (with a warning naming the file) when it is not what was written."""
    try:
        templates = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        problem = f"not valid JSON: {type(err).__name__}"
    else:
        if not isinstance(templates, list) or len(templates) != expected or templates[:1] != ["{}"] \
                or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
            problem = f"not a list of {expected} templates each holding one '{{}}'"
        else:
            return templates
    warnings.warn(f"kn_utils: context templates {path} are damaged ({problem}); generating them again",
                  stacklevel=3)
    return None


def _generate(lm, params, seed):
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for length, count in params:
            for i in range(count):
                prefix = _GEN_PREFIXES[i % len(_GEN_PREFIXES)]
                ids = torch.as_tensor([tok(prefix, add_special_tokens=True)["input_ids"]], device=lm.device)
                with torch.no_grad():
                    gen = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                            do_sample=True, top_k=5, max_new_tokens=length,
                                            min_new_tokens=length, pad_token_id=pad)
                text = tok.decode(gen[0], skip_special_tokens=True)
                text = re.sub(r"\s+", " ", text.replace("{", " ").replace("}", " ")).strip()
                out.append(text + ". {}")
    return out
