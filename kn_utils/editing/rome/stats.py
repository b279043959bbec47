"""ROME's key statistics C = E[kkᵀ] of one layer, cached on disk under the model's fingerprint.

A cache entry is keyed by what produced it: the model (:func:`model_key`) and a digest of the
weights the layer's keys depend on (:func:`weights_digest`), so statistics computed while an edit
was live are never served to the unedited model, nor the reverse.  Forward hooks change what a
forward computes without changing a weight: while any is live on the model (``ku.suppress``, a
user's hook) the statistics are computed for that call and not cached (:func:`live_hooks_note`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ... import targets as tg
from ...cache import CACHE_ENV, cache_dir, pid_alive
from ...hooks import hook_count, record
from ...settings import env

# Config entries that say where or with what a model was loaded, not what it computes.
_CONFIG_NOT_IDENTITY = ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash")


def model_key(lm) -> str:
    """A file-name-safe key: the family, and a fingerprint of the config and of a sample of the
    weights (several tensors, strided through each).

    Not the name or folder: the same weights loaded from two places (a moved cache, a copy) share
    their statistics, and random test models, which share a name, do not.
    """
    h = hashlib.sha1(str(lm.dtype).encode())
    config = getattr(lm.model, "config", None)
    if config is not None:
        entries = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_NOT_IDENTITY}
        h.update(json.dumps(entries, sort_keys=True, default=str).encode())
    params = list(lm.model.parameters())
    for i in sorted({0, 1, 2, len(params) // 2, len(params) - 1} & set(range(len(params)))):
        flat = params[i].detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu()
        h.update(sample.numpy().tobytes())
        h.update(str(tuple(params[i].shape)).encode())
    family = re.sub(r"[^A-Za-z0-9._-]+", "_", str(lm.arch.family))[:30] or "model"
    return f"{family}-{lm.arch.n_layers}L-{h.hexdigest()[:12]}"


def weights_digest(tensors) -> str:
    """A digest of a deterministic sample of each tensor: two wrapped diagonals of its 2-D view
    [first dim, rest] (1-D tensors: every element).  Every row and every column is sampled, so a KN
    edit (one value slot: a row or a column) and a ROME update (rank one, dense) change it; reading
    max(rows, columns) elements per tensor keeps it cheap (no pass over all the weights)."""
    h = hashlib.sha1()
    samples = []
    with torch.no_grad():
        for tensor in tensors:
            t = tensor.detach()
            h.update(f"{tuple(t.shape)} {t.dtype};".encode())
            if t.numel() == 0 or t.device.type == "meta":   # offloaded weights: their shape only
                continue
            rows = t.shape[0] if t.dim() >= 2 else 1
            samples.append(t.reshape(-1)[_diagonals(rows, t.numel() // rows, t.device)].float())
    if samples:
        h.update(torch.cat([s.to("cpu") for s in samples]).numpy().tobytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=256)
def _diagonals(rows: int, cols: int, device) -> torch.Tensor:
    """Flat indices of the wrapped diagonal and anti-diagonal of a [rows, cols] matrix."""
    i = torch.arange(max(rows, cols))
    r = i % rows
    return torch.cat([r * cols + i % cols, r * cols + (cols - 1 - i) % cols]).to(device)


def layer_dependencies(lm, layer: int) -> list[torch.Tensor]:
    """The parameters the neuron-site activations of ``layer`` depend on: everything before the
    site (embeddings, blocks 0..layer up to the MLP's input projection), not the layer's output
    projection (what ROME edits), the later blocks, the final norm or an untied head."""
    arch = lm.arch
    after = {id(p) for block in arch.blocks[layer + 1:] for p in block.parameters()}
    after |= {id(p) for p in arch.mlp_out[layer].parameters()}
    embedding = {id(p) for p in arch.embed.parameters()}
    for module in (arch.final_norm, arch.unembed):
        if module is not None:
            after |= {id(p) for p in module.parameters()} - embedding
    return [p for p in lm.model.parameters() if id(p) not in after]


def live_hooks_note(lm, what: str) -> str | None:
    """None, or why ``what`` is not cached: forward hooks live on the model change its outputs
    without changing a weight, so no key can say what produced the result."""
    count = hook_count(lm.model)
    if not count:
        return None
    return (f"kn_utils: {count} forward hook(s) are live on the model (ku.suppress / ku.enhance / "
            f"ku.set_activation or a hook of your own): {what} computed now describe the hooked "
            f"model, so they are used for this call only and neither read from nor written to the "
            f"cache; call outside the hook's `with` block to use the cache")


def layer_keys(lm, layer: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Neuron-site activations (ROME's keys) of ``layer``, [batch, positions, n_neurons]; the forward
    stops right after that layer's MLP nonlinearity."""
    with torch.no_grad(), record(lm, "neurons", layer, stop=True) as keys:
        lm.model(input_ids=ids, attention_mask=mask)
    return keys[layer]


def stats_key(lm, layer: int) -> str:
    """``<model_key>/<digest of the weights layer's keys depend on>``: recorded in the file."""
    return f"{model_key(lm)}/{weights_digest(layer_dependencies(lm, layer))}"


def _stats_name(key: str, layer: int, corpus: str, n: int, sample: str, seed: int) -> Path:
    folder, digest = key.split("/")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", corpus)
    name = f"layer{layer}_{safe}_{n}" if sample == "tokens" else f"layer{layer}_{safe}_{n}texts_seed{seed}"
    return Path(folder) / f"{name}_w{digest[:12]}.pt"


def stats_path(lm, layer: int, corpus: str, n: int, sample: str = "tokens", seed: int = 0) -> Path:
    """Where the statistics of ``layer`` over ``n`` tokens (file order) or ``n`` random texts live
    for the weights ``lm`` has now (see :func:`stats_key`)."""
    return cache_dir() / "stats" / _stats_name(stats_key(lm, layer), layer, corpus, n, sample, seed)


# the file's contents, keyed by (path, mtime): every edit of an evaluation run asks again; statistics
# a read-only cache could not keep are here under (their would-be path, None)
_STATS_IN_MEMORY: dict[tuple[str, int | None], torch.Tensor] = {}


def _read_stats(path: Path, n: int, key: str) -> torch.Tensor | None:
    """The cached E[kkᵀ] at ``path``, or None (with a warning naming the file) when it is truncated,
    garbage, of the wrong shape, not finite, or recorded for another model or other weights (a file
    copied from elsewhere): the caller then recomputes and rewrites it."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        mom2 = data["mom2"]
    except Exception as err:   # truncated zip, garbage pickle, a dict without "mom2" ...
        problem = f"unreadable: {type(err).__name__}"
    else:
        if data.get("key") != key:
            warnings.warn(f"kn_utils: covariance statistics {path} were computed for another model or "
                          f"other weights (recorded key {data.get('key')!r}, this model's is {key!r}); "
                          f"recomputing them", stacklevel=3)
            return None
        if not isinstance(mom2, torch.Tensor) or not mom2.is_floating_point():
            problem = "no floating-point 'mom2' tensor"
        elif tuple(mom2.shape) != (n, n):
            problem = f"shape {tuple(mom2.shape)}, the layer has {n} neurons"
        elif not bool(torch.isfinite(mom2).all()):
            problem = "holds NaN or inf"
        else:
            return mom2.float()
    warnings.warn(f"kn_utils: covariance statistics {path} are damaged ({problem}); recomputing them",
                  stacklevel=3)
    return None


def _corpus_texts(corpus: str, data_dir) -> list[str]:
    from ...data.text import load_texts

    try:
        return load_texts(corpus, data_dir)
    except ValueError as err:
        raise ValueError(f"ROME's covariance statistics (mom2_adjustment=True) need a text corpus and "
                         f"{corpus!r} is not available ({err}). Put WikiText-2 under <data dir>/wikitext "
                         f"(KN_DATA_DIR or data_dir=), install `datasets` to fetch it from the hub, or "
                         f"use the paper's configuration (mom2_adjustment=False)") from None


def layer_stats(lm, layer: int, corpus: str = "auto", n_tokens: int = 100_000, *, n_texts: int | None = None,
                seed: int = 0, data_dir=None, max_length: int | None = None, batch_tokens: int = 4096,
                progress: bool = True, recompute: bool = False) -> torch.Tensor:
    """Uncentred second moment E[k kᵀ] [n_neurons, n_neurons] (float32, CPU) of the neuron-site
    activations of ``layer``.

    Two samples: the first ``n_tokens`` tokens of ``corpus`` in file order (paragraphs truncated to
    ``max_length``, default 256), or, with ``n_texts``, ROME's: ``n_texts`` texts drawn at random
    (seeded by ``seed``), each truncated to ``max_length`` (default: the model's context), all their
    tokens counted.  Special tokens (BOS/CLS/SEP) and padding are not text and are left out.

    Cached under ``cache_dir()/stats/<model>/layer<l>_<corpus>_<n>[texts_seed<s>]_w<digest>.pt``
    (``<model>``: a fingerprint of config and weights, :func:`model_key`; ``<digest>``: of the weights
    the layer's keys depend on, :func:`stats_key`, also recorded in the file and checked on read); a
    second call reads it, a damaged file or one recorded for other weights is recomputed.  Not
    cached while forward hooks are live on the model (with a warning); a read-only cache keeps new
    statistics in memory (with a warning).
    """
    from ...data.text import resolve_corpus

    lm.arch.check_layer(layer)
    by_texts = n_texts is not None
    count = n_texts if by_texts else n_tokens
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{'n_texts' if by_texts else 'n_tokens'} must be a positive integer, got {count!r}")
    if max_length is None:
        max_length = (lm.arch.max_positions or 2048) if by_texts else 256
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    if lm.arch.max_positions is not None:
        max_length = min(max_length, lm.arch.max_positions)
    corpus = resolve_corpus(corpus, data_dir)
    n = lm.arch.n_neurons
    hooked = live_hooks_note(lm, "covariance statistics")
    if hooked:
        warnings.warn(hooked, UserWarning, stacklevel=2)
    key = stats_key(lm, layer)
    name = _stats_name(key, layer, corpus, count, "texts" if by_texts else "tokens", seed)
    path = _cache_root() / "stats" / name
    if not hooked and not recompute:
        if path.exists():
            found = (str(path), path.stat().st_mtime_ns)   # the mtime marks a rewrite
            if found not in _STATS_IN_MEMORY:
                mom2 = _read_stats(path, n, key)
                if mom2 is not None:
                    _STATS_IN_MEMORY[found] = mom2
            if found in _STATS_IN_MEMORY:
                return _STATS_IN_MEMORY[found]
        elif (str(path), None) in _STATS_IN_MEMORY:
            return _STATS_IN_MEMORY[str(path), None]

    texts = _corpus_texts(corpus, data_dir)
    if by_texts:
        if count > len(texts):
            warnings.warn(f"kn_utils: corpus {corpus!r} holds {len(texts):,} texts, fewer than the "
                          f"{count:,} asked for: the statistics use them all", UserWarning, stacklevel=2)
        gen = torch.Generator().manual_seed(seed)
        texts = [texts[i] for i in torch.randperm(len(texts), generator=gen)[:count].tolist()]
    budget = None if by_texts else n_tokens
    tok = lm.tokenizer
    special = set(getattr(tok, "all_special_ids", []) or [])
    total = torch.zeros(n, n, dtype=torch.float64, device=lm.device)
    seen = 0
    bar = tqdm(total=len(texts) if by_texts else n_tokens, desc=f"key statistics, layer {layer}",
               unit="text" if by_texts else "tok", disable=not progress)
    batch: list[list[int]] = []

    def flush():
        nonlocal seen
        ids, mask = tg.pad_batch(lm, batch)
        keys = layer_keys(lm, layer, ids, mask)
        keep = mask.bool() & ~torch.isin(ids, torch.as_tensor(sorted(special) or [-1], device=ids.device))
        k = keys[keep].float()
        if budget is not None:
            k = k[: budget - seen]
        total.add_((k.T @ k).double())
        seen += k.shape[0]
        bar.update(len(batch) if by_texts else k.shape[0])
        batch.clear()

    try:
        for text in texts:
            if budget is not None and seen >= budget:
                break
            ids = tok(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
            if len(ids) < 2 and not by_texts:
                continue
            batch.append(list(ids))
            if sum(len(b) for b in batch) >= batch_tokens:
                flush()
        if batch and (budget is None or seen < budget):
            flush()
    finally:
        bar.close()
    if seen == 0:
        raise ValueError(f"corpus {corpus!r} gave no tokens")
    mom2 = (total / seen).float().cpu()
    if not bool(torch.isfinite(mom2).all()):
        raise ValueError(f"the key statistics of layer {layer} hold NaN or inf: the model's activations "
                         f"overflow or its weights are not finite (dtype {lm.dtype}); nothing was cached")
    if not hooked:
        _write_stats(path, {"mom2": mom2, "count": seen, "texts": len(texts) if by_texts else None,
                            "corpus": corpus, "layer": layer, "model": str(lm.name), "key": key})
    return mom2


def _cache_root() -> Path:
    """``cache_dir()``, or where it would be when it cannot be created (read-only parent): the
    statistics then live in memory (see :func:`_write_stats`)."""
    try:
        return cache_dir()
    except OSError:
        return Path(env(CACHE_ENV) or os.path.join("~", ".cache", "kn_utils")).expanduser()


def _write_stats(path: Path, payload: dict) -> None:
    """Write through a temporary file renamed over ``path`` (a reader never sees half a file); a
    place that cannot be written (read-only cache) keeps them in memory for this process, with a
    warning naming the folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in path.parent.glob(f"{path.name}.*.tmp"):   # left by a writer killed mid-write
            pid = old.name[len(path.name) + 1:-len(".tmp")]
            if pid.isdigit() and not pid_alive(int(pid)):
                old.unlink(missing_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")   # one per writer: concurrent runs
        try:
            with open(tmp, "wb") as fh:   # an OSError here, not torch's RuntimeError, when unwritable
                torch.save(payload, fh)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as err:
        _STATS_IN_MEMORY[str(path), None] = payload["mom2"]
        warnings.warn(f"kn_utils: cannot write covariance statistics under {path.parent} "
                      f"({err.strerror or err}); keeping them in memory for this process only (make "
                      f"the cache folder writable, or point KN_UTILS_CACHE at a writable folder)",
                      UserWarning, stacklevel=3)


class SecondMoment:
    """C as the update uses it (float64, blended with the identity per ``mom2_update_weight``) and
    its Cholesky factor (None when C is not positive definite: then a general solve)."""

    def __init__(self, stats: torch.Tensor, weight: float = 1.0):
        c = stats.double()
        if weight < 1.0:
            scale = torch.trace(c) / c.shape[0]
            c = weight * c + (1.0 - weight) * scale * torch.eye(c.shape[0], dtype=c.dtype)
        self.c = c
        factor, info = torch.linalg.cholesky_ex(c)
        self.factor = None if int(info) else factor

    def solve(self, k: torch.Tensor) -> torch.Tensor:
        """C⁻¹k in float64."""
        k = k.double()
        if self.factor is None:
            return torch.linalg.solve(self.c.to(k.device), k)
        return torch.cholesky_solve(k[:, None], self.factor.to(k.device))[:, 0]


# Factoring C is the O(n³) part and every edit of a run uses the same C: keep the last few, keyed by
# the statistics' contents (a digest), so a rewritten file or other statistics never hit a stale one.
_FACTORS: "OrderedDict[tuple[str, float], SecondMoment]" = OrderedDict()
_FACTORS_KEPT = 4


def second_moment(stats: torch.Tensor, weight: float = 1.0) -> SecondMoment:
    data = stats.detach().float().cpu().contiguous()
    key = (hashlib.sha1(data.numpy().tobytes()).hexdigest() + str(tuple(data.shape)), float(weight))
    if key in _FACTORS:
        _FACTORS.move_to_end(key)
        return _FACTORS[key]
    entry = _FACTORS[key] = SecondMoment(stats, weight)
    while len(_FACTORS) > _FACTORS_KEPT:
        _FACTORS.popitem(last=False)
    return entry


def effective_mom2(lm, hp, data_dir=None, progress: bool = True) -> SecondMoment | None:
    """C used by the update (None = identity), per ``mom2_adjustment``, ``mom2_sample`` and
    ``mom2_update_weight``."""
    if not hp.mom2_adjustment:
        return None
    if hp.mom2_sample == "texts":
        stats = layer_stats(lm, hp.layer, hp.mom2_dataset, n_texts=hp.mom2_n_samples, seed=hp.seed,
                            data_dir=data_dir, progress=progress)
    else:
        stats = layer_stats(lm, hp.layer, hp.mom2_dataset, hp.mom2_n_samples, data_dir=data_dir,
                            progress=progress)
    return second_moment(stats, hp.mom2_update_weight)
