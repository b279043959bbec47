"""ROME's context templates: the bare prompt plus short model-generated prefixes.

Generated text depends on every weight, so the cache key holds a digest of all of them
(:func:`~kn_utils.editing.rome.stats.weights_digest`): templates generated while an edit was live are
kept under the edited weights' key and never served to the unedited model.  While forward hooks are
live (``ku.suppress`` ...) templates are generated for that call only and not cached.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch

from .stats import _cache_root, live_hooks_note, model_key, weights_digest

_GEN_PREFIXES = ("The", "Therefore", "Because", "I", "You")
# (model fingerprint, weights digest, length params, seed) -> templates; the disk copy outlives the process
_TEMPLATE_CACHE: dict[tuple, list[str]] = {}


def context_templates(lm, length_params=((5, 10), (10, 10)), seed: int = 0) -> list[str]:
    """``["{}", "<generated text>. {}", ...]``: the bare prompt plus model-generated prefixes.

    For each ``[length, count]``: ``count`` texts of ``length`` new tokens, sampled (top-k 5) from the
    prefixes "The", "Therefore", "Because", "I", "You" in turn, seeded.  Cached per model and
    weights (a digest of every parameter) in memory and on disk; not cached while forward hooks are
    live on the model; kept in memory only when the cache cannot be written (both with a warning).
    Masked LMs do not generate: they get the bare prompt only.
    """
    params = tuple(tuple(int(x) for x in p) for p in length_params)
    if lm.arch.is_masked_lm or not params:
        return ["{}"]
    expected = 1 + sum(count for _, count in params)
    hooked = live_hooks_note(lm, "context templates")
    if hooked:
        warnings.warn(hooked, UserWarning, stacklevel=2)
        return ["{}"] + _generate(lm, params, seed)
    key = (model_key(lm), weights_digest(lm.model.parameters()), params, seed)
    if key in _TEMPLATE_CACHE:
        return list(_TEMPLATE_CACHE[key])
    path = _cache_root() / "context_templates" / f"{key[0]}-{hashlib.sha1(repr(key).encode()).hexdigest()[:8]}.json"
    templates = _read_templates(path, expected) if path.exists() else None
    if templates is None:
        templates = ["{}"] + _generate(lm, params, seed)
        _write_templates(path, templates)
    _TEMPLATE_CACHE[key] = templates
    return list(templates)


def _write_templates(path: Path, templates: list[str]) -> None:
    """Through a temporary file renamed over ``path``; a cache that cannot be written (read-only)
    leaves them in memory only (the caller keeps them), with a warning naming the folder."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.write_text(json.dumps(templates, indent=0), encoding="utf-8")
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as err:
        warnings.warn(f"kn_utils: cannot write context templates under {path.parent} "
                      f"({err.strerror or err}); keeping them in memory for this process only (make "
                      f"the cache folder writable, or point KN_UTILS_CACHE at a writable folder)",
                      UserWarning, stacklevel=3)


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
