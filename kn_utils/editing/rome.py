"""ROME: rank-one model editing of one MLP output projection (Meng et al., 2022; REFERENCE.md §4).

    edit = rome_edit(lm, "The capital of Canada is", "Canada", "Rome")
    ku.predict(lm, "The capital of Canada is")     # ' Rome' first
    edit.restore()                                  # weights back, bit for bit

    with rome_edit(lm, prompt, subject, target): ...   # restored on exit, also after an exception

The edit of layer l's output projection W (seen as value slots [n_neurons, d_model]):

* k*  = the neuron-site activation (the projection's input) at the subject's last token, averaged
        over the prompt prefixed by model-generated texts (``context_template_length_params``) and
        over the bare prompt;
* v*  = v_init + δ, δ optimised with Adam so that adding δ to the MLP output at the subject's last
        token makes the model produce the new target (NLL, teacher forced, on every prefixed prompt)
        while keeping the distribution after "{subject} is a" (KL) and ‖δ‖ small (weight decay);
        ‖δ‖ is clamped to ``clamp_norm_factor``·‖v_init‖;
* C   = E[k kᵀ] over text tokens (:func:`layer_stats`, cached on disk) or I without
        ``mom2_adjustment``;
* Ŵ   = W + Λ (C⁻¹k*)ᵀ,  Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*)   so that Ŵ k* = v* exactly.

(W k* includes the projection's bias where it has one: Λ is what the *output* lacks.)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import targets as tg
from ..hooks import grad_ready, modify, read_logits
from ..models import cache_dir, pid_alive
from .base import WeightEdit

KL_PROMPT = "{} is a"
_GEN_PREFIXES = ("The", "Therefore", "Because", "I", "You")


# --------------------------------------------------------------------------------------------------
# hyper-parameters
# --------------------------------------------------------------------------------------------------
# (family, layers, width) of the models with published ROME settings -> preset name
_PUBLISHED_SHAPES = {("gpt2", 48, 1600): "gpt2-xl", ("llama", 32, 4096): "llama-2-7b"}
# (family, layers, width) of the embedded models with a swept preset of their own
_SWEPT_SHAPES = {("gemma3_text", 18, 640): "gemma-3-270m"}


@dataclass
class ROMEHyperParams:
    """ROME settings.  ``layer=None`` / ``v_loss_layer=None`` are resolved per model (see ``resolve``)."""

    layer: int | None = None
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int | None = None          # None: the last layer (logits of the full model)
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    context_template_length_params: list = field(default_factory=lambda: [[5, 10], [10, 10]])
    mom2_adjustment: bool = True
    mom2_dataset: str = "auto"               # see kn_utils.data.text: wikitext / wikipedia / hub:...
    mom2_n_samples: int = 100_000            # tokens
    # Blend of the statistics with a scaled identity: 1 = E[kkᵀ] only, 0 = identity.  ROME uses 1.
    mom2_update_weight: float = 1.0
    early_stop_loss: float = 5e-2
    seed: int = 0

    @classmethod
    def preset(cls, name: str) -> "ROMEHyperParams":
        """``"gpt2-xl"`` (ROME's published settings), ``"llama-2-7b"`` or ``"default"`` (SmolLM2-135M).

        ``"default"`` (SmolLM2-135M-Instruct, 30 layers): layer 4, chosen by the layer sweep
        ``benchmarks/layer_sweep.py --layers 2 4 8 14 20`` (P36, 4 requests each, 12 Adam steps, 3
        context prefixes, covariance from 3,000 WikiText tokens; CSV in ``benchmarks/layer_sweep.csv``):
        teacher-forced efficacy 1.00 / 1.00 / 0.88 / 0.88 / 0.63 and paraphrase accuracy
        0.34 / 0.34 / 0.16 / 0.23 / 0.20 at layers 2 / 4 / 8 / 14 / 20; layer 4 ties layer 2 on both
        and keeps more neighbours intact (locality accuracy 0.88 vs 0.75).  Early MLPs, as for GPT-2 XL
        (layer 17 of 48) and LLaMA-2-7B (layer 5 of 32).  The sweep is small (n = 4): rerun it with
        ``--preset gpu`` on a GPU for a firmer choice.

        ``"gemma-3-270m"`` (Gemma-3-270M base, 18 layers): layer 3, by the same sweep and settings
        (``benchmarks/layer_sweep.py --model gemma-3-270m --layers 1 3 6 10 14 --n 3``, P36, 12 Adam
        steps, 3 prefixes, covariance from 3,000 tokens; CSV in ``benchmarks/layer_sweep_gemma.csv``;
        stopped before layer 14 to bound CPU time): teacher-forced efficacy 0.67 / 1.00 / 1.00 / 1.00,
        paraphrase accuracy 0.38 / 0.62 / 0.62 / 0.62 and locality accuracy 1.00 / 1.00 / 0.67 / 0.00
        at layers 1 / 3 / 6 / 10.  Layer 3 is the earliest layer with full efficacy and the best
        paraphrase score, and the only one of those that leaves every neighbour intact.  n = 3: a
        small sweep, like SmolLM2's.
        """
        presets = {
            "gpt2-xl": cls(layer=17, v_num_grad_steps=20, v_lr=0.5, v_loss_layer=47, v_weight_decay=0.5,
                           clamp_norm_factor=4.0, kl_factor=0.0625, mom2_adjustment=True,
                           mom2_dataset="wikipedia", mom2_n_samples=100_000),
            # As EasyEdit's LLaMA configuration (no covariance statistics).
            "llama-2-7b": cls(layer=5, v_num_grad_steps=25, v_lr=0.5, v_loss_layer=31,
                              v_weight_decay=1e-3, clamp_norm_factor=4.0, kl_factor=0.0625,
                              mom2_adjustment=False, mom2_dataset="wikipedia", mom2_n_samples=100_000),
            "default": cls(layer=4, v_num_grad_steps=20, v_lr=0.5, v_loss_layer=None, v_weight_decay=0.5,
                           clamp_norm_factor=4.0, kl_factor=0.0625, mom2_adjustment=True,
                           mom2_dataset="auto", mom2_n_samples=20_000),
            "gemma-3-270m": cls(layer=3, v_num_grad_steps=20, v_lr=0.5, v_loss_layer=None,
                                v_weight_decay=0.5, clamp_norm_factor=4.0, kl_factor=0.0625,
                                mom2_adjustment=True, mom2_dataset="auto", mom2_n_samples=20_000),
        }
        if name not in presets:
            raise ValueError(f"unknown ROME preset {name!r}; presets: {sorted(presets)}")
        return presets[name]

    # Fraction of depth of the default preset's layer, for models without a preset of their own.
    _DEFAULT_DEPTH = 4 / 30

    @classmethod
    def for_model(cls, lm) -> "ROMEHyperParams":
        """The preset for ``lm``'s family and size (GPT-2 XL, LLaMA-2-7B, Gemma-3-270M), else the
        default preset with its layer moved to the same relative depth and the loss read at the last
        layer."""
        arch = lm.arch
        shape = (arch.family, arch.n_layers, arch.d_model)
        published = _PUBLISHED_SHAPES.get(shape) or _SWEPT_SHAPES.get(shape)
        if published:
            return cls.preset(published)
        hp = cls.preset("default")
        hp.layer = min(arch.n_layers - 1, round(cls._DEFAULT_DEPTH * arch.n_layers))
        return hp

    def resolve(self, lm) -> "ROMEHyperParams":
        """A copy with ``layer`` / ``v_loss_layer`` filled in and every value checked against ``lm``."""
        hp = replace(self, context_template_length_params=[list(p) for p in
                                                           self.context_template_length_params])
        if hp.layer is None:
            hp.layer = ROMEHyperParams.for_model(lm).layer
        if hp.v_loss_layer is None:
            hp.v_loss_layer = lm.arch.n_layers - 1
        hp.layer = lm.arch.check_layer(hp.layer)
        hp.v_loss_layer = lm.arch.check_layer(hp.v_loss_layer, "v_loss_layer")
        if hp.v_loss_layer < hp.layer:
            raise ValueError(f"v_loss_layer {hp.v_loss_layer} is below the edited layer {hp.layer}")
        if hp.v_loss_layer < lm.arch.n_layers - 1 and (lm.arch.final_norm is None or lm.arch.unembed is None):
            # a head that is not final norm + unembedding (BERT's transform): no early read-out
            raise ValueError(f"v_loss_layer={hp.v_loss_layer} reads logits early through the final norm "
                             f"and unembedding, which {lm.name} lacks: use {lm.arch.n_layers - 1}")
        hp.check_values()
        return hp

    def check_values(self) -> None:
        """Every setting that needs no model: types, finiteness and ranges (NaN is out of every
        range), so a bad value fails before the statistics pass, not after it."""
        def number(name, low, *, low_open, high=None):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if (value <= low if low_open else value < low) or (high is not None and value > high):
                bound = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}" \
                        f"{']' if high is not None else ')'}"
                raise ValueError(f"{name} must lie in {bound}, got {value!r}")

        for name, minimum in (("v_num_grad_steps", 1), ("mom2_n_samples", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        number("v_lr", 0, low_open=True)
        number("clamp_norm_factor", 0, low_open=True)
        number("v_weight_decay", 0, low_open=False)
        number("kl_factor", 0, low_open=False)
        number("early_stop_loss", 0, low_open=False)
        number("mom2_update_weight", 0, low_open=False, high=1)
        if not isinstance(self.mom2_adjustment, bool):
            raise ValueError(f"mom2_adjustment must be True or False, got {self.mom2_adjustment!r}")
        if not isinstance(self.mom2_dataset, str) or not self.mom2_dataset:
            raise ValueError(f"mom2_dataset must be a corpus name, got {self.mom2_dataset!r}")
        for pair in self.context_template_length_params:
            if len(pair) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in pair) \
                    or min(pair) < 0:
                raise ValueError(f"context_template_length_params: [[length, count], ...] of "
                                 f"integers >= 0, got {pair!r}")


# --------------------------------------------------------------------------------------------------
# model identity for caches
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# covariance (second-moment) statistics
# --------------------------------------------------------------------------------------------------
STATS_COMPUTED = {"count": 0}   # how many times statistics were computed (not read from disk)


class _Stop(Exception):
    """Raised by a hook once the edited layer's keys are read: later layers need not run."""


def _layer_keys(lm, layer: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Neuron-site activations (ROME's keys) of ``layer``, [batch, positions, n_neurons]; the forward
    stops right after that layer's MLP nonlinearity."""
    box = {}

    def grab(value):
        box["keys"] = value.detach()
        raise _Stop

    with torch.no_grad(), modify(lm, "neurons", {layer: grab}):
        try:
            lm.model(input_ids=ids, attention_mask=mask)
        except _Stop:
            pass
    return box["keys"]


def stats_path(lm, layer: int, corpus: str, n_tokens: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", corpus)
    return cache_dir() / "stats" / model_key(lm) / f"layer{layer}_{safe}_{n_tokens}.pt"


_STATS_IN_MEMORY: dict[tuple[str, int], torch.Tensor] = {}


def _read_stats(path: Path, n: int) -> torch.Tensor | None:
    """The cached E[kkᵀ] at ``path``, or None (with a warning naming the file) when it is truncated,
    garbage, of the wrong shape or not finite: the caller then recomputes and rewrites it."""
    try:
        mom2 = torch.load(path, map_location="cpu", weights_only=True)["mom2"]
    except Exception as err:   # truncated zip, garbage pickle, a dict without "mom2" ...
        problem = f"unreadable: {type(err).__name__}"
    else:
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


def layer_stats(lm, layer: int, corpus: str = "auto", n_tokens: int = 100_000, *, data_dir=None,
                max_length: int = 256, batch_tokens: int = 4096, progress: bool = True,
                recompute: bool = False) -> torch.Tensor:
    """Uncentred second moment E[k kᵀ] [n_neurons, n_neurons] (float32, CPU) of the neuron-site
    activations of ``layer`` over the first ``n_tokens`` tokens of ``corpus``.

    Cached under ``cache_dir()/stats/<model>/layer<l>_<corpus>_<n>.pt`` (``<model>``: a fingerprint
    of config and weights, :func:`model_key`); a second call reads it, a damaged file is recomputed.
    Paragraphs are tokenised one by one (truncated to ``max_length`` or the model's context, whichever
    is shorter), in file order.
    """
    from ..data.text import load_texts, resolve_corpus

    lm.arch.check_layer(layer)
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    if lm.arch.max_positions is not None:
        max_length = min(max_length, lm.arch.max_positions)
    corpus = resolve_corpus(corpus, data_dir)
    path = stats_path(lm, layer, corpus, n_tokens)
    n = lm.arch.n_neurons
    if path.exists() and not recompute:
        # every edit of an evaluation run asks again: read the file once (its mtime marks a rewrite)
        key = (str(path), path.stat().st_mtime_ns)
        if key not in _STATS_IN_MEMORY:
            mom2 = _read_stats(path, n)
            if mom2 is not None:
                _STATS_IN_MEMORY[key] = mom2
        if key in _STATS_IN_MEMORY:
            return _STATS_IN_MEMORY[key]

    texts = load_texts(corpus, data_dir)
    tok = lm.tokenizer
    special = set(getattr(tok, "all_special_ids", []) or [])
    total = torch.zeros(n, n, dtype=torch.float64, device=lm.device)
    seen = 0
    bar = tqdm(total=n_tokens, desc=f"key statistics, layer {layer}", unit="tok", disable=not progress)
    batch: list[list[int]] = []

    def flush():
        nonlocal seen
        ids, mask = tg.pad_batch(lm, batch)
        keys = _layer_keys(lm, layer, ids, mask)
        # Special tokens (BOS/CLS/SEP) are not text; padding is not either.
        keep = mask.bool() & ~torch.isin(ids, torch.as_tensor(sorted(special) or [-1], device=ids.device))
        k = keys[keep].float()[: n_tokens - seen]
        total.add_((k.T @ k).double())
        seen += k.shape[0]
        bar.update(k.shape[0])
        batch.clear()

    try:
        for text in texts:
            if seen >= n_tokens:
                break
            ids = tok(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
            if len(ids) < 2:
                continue
            batch.append(list(ids))
            if sum(len(b) for b in batch) >= batch_tokens:
                flush()
        if batch and seen < n_tokens:
            flush()
    finally:
        bar.close()
    if seen == 0:
        raise ValueError(f"corpus {corpus!r} gave no tokens")
    mom2 = (total / seen).float().cpu()
    STATS_COMPUTED["count"] += 1
    if not bool(torch.isfinite(mom2).all()):
        raise ValueError(f"the key statistics of layer {layer} hold NaN or inf: the model's activations "
                         f"overflow or its weights are not finite (dtype {lm.dtype}); nothing was cached")
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(f"{path.name}.*.tmp"):   # left by a writer killed mid-write
        pid = old.name[len(path.name) + 1:-len(".tmp")]
        if pid.isdigit() and not pid_alive(int(pid)):
            old.unlink(missing_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")   # one per writer: concurrent runs
    torch.save({"mom2": mom2, "count": seen, "corpus": corpus, "layer": layer, "model": str(lm.name)}, tmp)
    tmp.replace(path)
    return mom2


# --------------------------------------------------------------------------------------------------
# context templates
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# requests → token positions
# --------------------------------------------------------------------------------------------------
def _subject_last_index(lm, text: str, subject_end: int) -> int:
    """Index (in ``tokenizer(text, add_special_tokens=True)``) of the token holding char subject_end-1."""
    tok = lm.tokenizer
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        best = None
        for i, (start, end) in enumerate(enc["offset_mapping"]):
            if end > start and start < subject_end:
                best = i
            if start >= subject_end and end > start:
                break
        if best is not None:
            return best
    # Slow tokenizers: leading special tokens plus the tokens of the text up to the subject's end.
    special = set(getattr(tok, "all_special_ids", []) or [])
    full = tok(text, add_special_tokens=True)["input_ids"]
    lead = next((i for i, t in enumerate(full) if t not in special), 0)
    return lead + len(tok(text[:subject_end], add_special_tokens=False)["input_ids"]) - 1


@dataclass
class _Row:
    ids: list[int]
    subject_index: int
    positions: list[int]     # where target tokens are read (empty for KL rows)
    targets: list[int]


def _rows(lm, template: str, prompt: str, subject: str, target: str | None) -> list[_Row]:
    """Rows for ``template.format(prompt)``; with a target, its teacher-forced queries."""
    checked = tg.check_prompt(lm, template.format(prompt))
    # The generated prefix holds no mask, so the subject is found after it even when a mask before
    # the subject was rewritten (RoBERTa's "<mask>").
    start = checked.find(subject, template.index("{}"))
    if start < 0:
        raise ValueError(f"subject {subject!r} not in prompt {checked!r}")
    s_idx = _subject_last_index(lm, checked, start + len(subject))
    if target is None:
        return [_Row(tg.prompt_ids(lm, checked), s_idx, [], [])]
    spec = tg.prepare(lm, checked, target)
    shift = 0
    if lm.arch.is_masked_lm:
        # Multi-token targets get one mask per token: a subject after the mask moves right.
        m = tg.prompt_ids(lm, checked).index(lm.tokenizer.mask_token_id)
        shift = len(spec.target_ids) - 1 if s_idx > m else 0
    return [_Row(list(ids), s_idx + shift, pos, tgt) for ids, pos, tgt in spec.groups()]


# --------------------------------------------------------------------------------------------------
# k*, v*
# --------------------------------------------------------------------------------------------------
def _batch(lm, rows):
    ids, mask = tg.pad_batch(lm, [r.ids for r in rows])
    sub = torch.as_tensor([r.subject_index for r in rows], device=ids.device)
    return ids, mask, sub


def compute_k(lm, layer: int, templates, prompt: str, subject: str) -> torch.Tensor:
    """k*: mean neuron-site activation at the subject's last token over the context templates."""
    rows = [r for t in templates for r in _rows(lm, t, prompt, subject, None)]
    ids, mask, sub = _batch(lm, rows)
    keys = _layer_keys(lm, layer, ids, mask)
    return keys[torch.arange(len(rows), device=keys.device), sub].float().mean(0)


def _logits_fn(lm, v_loss_layer):
    """Logits from the full model, or from the residual stream after ``v_loss_layer`` (final norm +
    unembedding), as ROME's ``v_loss_layer`` asks."""
    if v_loss_layer == lm.arch.n_layers - 1:
        return None
    return lambda hidden: lm.arch.unembed(lm.arch.final_norm(hidden))


def compute_v(lm, hp: ROMEHyperParams, templates, prompt: str, subject: str, target_new: str,
              progress: bool = False):
    """(v*, v_init, info): the MLP output at the subject's last token that makes ``target_new`` likely."""
    layer = hp.layer
    rew = [r for t in templates for r in _rows(lm, t, prompt, subject, target_new)]
    kl_rows = _rows(lm, "{}", KL_PROMPT.format(subject), subject, None) if not lm.arch.is_masked_lm else []
    rows = rew + kl_rows
    ids, mask, sub = _batch(lm, rows)
    n_rew = len(rew)
    dev = ids.device
    r_idx = torch.as_tensor([i for i, r in enumerate(rew) for _ in r.positions], device=dev)
    p_idx = torch.as_tensor([p for r in rew for p in r.positions], device=dev)
    t_idx = torch.as_tensor([t for r in rew for t in r.targets], device=dev)
    # target tokens per template: one row with them all (decoders) or one row each (masked LMs)
    n_tok = len(t_idx) // len(templates)
    at_subject = torch.zeros(len(rows), ids.shape[1], 1, device=dev)
    at_subject[torch.arange(len(rows), device=dev), sub] = 1.0

    delta = torch.zeros(lm.arch.d_model, device=dev, dtype=torch.float32, requires_grad=True)
    state = {}

    def edit_output(value):
        if "v_init" not in state:
            state["v_init"] = value[0, sub[0]].detach().float().clone()  # bare prompt, first row
        return value + (at_subject * delta).to(value.dtype)

    loss_hidden = {}
    project = _logits_fn(lm, hp.v_loss_layer)
    # the output of the projection whose weights the edit changes (before Gemma's post-MLP norm)
    fns = {"mlp_proj": {layer: edit_output}}
    # the logits are read at the target positions, then at the KL rows' subject ends: only there
    read_rows = torch.cat([r_idx, torch.arange(n_rew, len(rows), device=dev)])
    read_pos = torch.cat([p_idx, sub[n_rew:]])
    n_scored = len(r_idx)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_init = None
    info = {"steps": 0, "nll": [], "p_target": []}
    bar = tqdm(range(hp.v_num_grad_steps), desc="ROME v*", disable=not progress, leave=False)
    for step in bar:
        with modify(lm, "mlp_proj", fns["mlp_proj"]):
            if project is not None:
                with modify(lm, "hidden", {hp.v_loss_layer: lambda v: loss_hidden.__setitem__("h", v)}):
                    lm.model(input_ids=ids, attention_mask=mask)
                logits = project(loss_hidden.pop("h")[read_rows, read_pos])
            else:
                logits = read_logits(lm, read_rows, read_pos, input_ids=ids, attention_mask=mask)
        scored = logits[:n_scored].float().log_softmax(-1)
        token_logp = scored[torch.arange(len(t_idx), device=dev), t_idx]
        nll = -token_logp.sum() / len(t_idx)  # mean over templates of the per-target NLL / n_tok
        loss = nll
        if kl_rows:
            kl_at = logits[n_scored:]
            kl_logp = kl_at.float().log_softmax(-1)
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            # as ROME's code: KL(current || initial) over the next-token distribution after the subject
            kl = F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
            loss = loss + hp.kl_factor * kl
        v_init = state["v_init"]
        wd = hp.v_weight_decay * (delta.norm() / v_init.norm() ** 2)
        loss = loss + wd
        info["nll"].append(nll.item())
        info["p_target"].append(float(torch.exp(-nll.detach() * n_tok)))
        if loss.item() < hp.early_stop_loss:
            break
        if step == hp.v_num_grad_steps - 1:
            break  # ROME takes no step after the last loss
        (grad,) = torch.autograd.grad(loss, [delta])
        delta.grad = grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        info["steps"] = step + 1
        with torch.no_grad():
            max_norm = hp.clamp_norm_factor * v_init.norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    bar.close()
    v_init = state["v_init"]
    return (v_init + delta.detach()), v_init, info


def rank_one_update(k_star: torch.Tensor, v_star: torch.Tensor, out_at_k: torch.Tensor,
                    mom2: torch.Tensor | None):
    """(u, Λ) with Ŵ_slots = W_slots + u Λᵀ: u = C⁻¹k*, Λ = (v* − W k*) / (uᵀ k*)  (float64 math)."""
    k = k_star.double()
    u = k.clone() if mom2 is None else _solve_mom2(mom2, k)
    lam = (v_star.double() - out_at_k.double()) / torch.dot(u, k)
    if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(lam).all())):
        # NaN statistics, a singular C or NaN activations: refuse rather than write NaN weights
        raise ValueError("the ROME update is not finite (NaN/inf in the key statistics C, in k* or in "
                         "v*); no weight was changed. Recompute the statistics (layer_stats(..., "
                         "recompute=True)) or check the model's weights")
    return u, lam


# C and its Cholesky factor (None: not positive definite), per statistics tensor and blend weight:
# every edit of an evaluation run solves with the same C, and factoring it is the O(n³) part.
_MOM2_FACTORS: dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}


def _solve_mom2(c: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """C⁻¹k in float64, through C's cached Cholesky factor when :func:`effective_mom2` made C."""
    entry = next((e for e in _MOM2_FACTORS.values() if e[1] is c), None)
    factor = entry[2] if entry is not None else None
    if factor is None:
        return torch.linalg.solve(c.double().to(k.device), k)
    return torch.cholesky_solve(k[:, None], factor.to(k.device))[:, 0]


def effective_mom2(lm, hp: ROMEHyperParams, data_dir=None, progress: bool = True):
    """C used by the update (None = identity), per ``mom2_adjustment`` and ``mom2_update_weight``."""
    if not hp.mom2_adjustment:
        return None
    stats = layer_stats(lm, hp.layer, hp.mom2_dataset, hp.mom2_n_samples, data_dir=data_dir,
                        progress=progress)
    key = (id(stats), float(hp.mom2_update_weight))
    entry = _MOM2_FACTORS.get(key)
    if entry is None or entry[0] is not stats:   # the entry holds `stats`, so its id is not reused
        c = stats.double()
        w = hp.mom2_update_weight
        if w < 1.0:
            scale = torch.trace(c) / c.shape[0]
            c = w * c + (1.0 - w) * scale * torch.eye(c.shape[0], dtype=c.dtype)
        factor, info = torch.linalg.cholesky_ex(c)
        entry = _MOM2_FACTORS[key] = (stats, c, None if int(info) else factor)
    return entry[1]


# --------------------------------------------------------------------------------------------------
# the edit
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ROMERequest:
    prompt: str
    subject: str
    target_new: str


class ROMEEdit(WeightEdit):
    """A computed ROME update of one layer's output projection; applied on creation by :func:`rome_edit`."""

    def __init__(self, lm, request: ROMERequest, hparams: ROMEHyperParams, u: torch.Tensor,
                 lam: torch.Tensor, k_star, v_star, v_init, info):
        super().__init__(lm, f"ROME layer {hparams.layer}: {request.prompt!r} -> {request.target_new!r}")
        self.request = request
        self.hparams = hparams
        self.layer = hparams.layer
        self.u, self.lam = u, lam
        self.k_star, self.v_star, self.v_init = k_star, v_star, v_init
        self.info = info
        self.delta_norm = float(torch.linalg.vector_norm(u) * torch.linalg.vector_norm(lam))

    def update_matrix(self) -> torch.Tensor:
        """The rank-one change of the value slots, [n_neurons, d_model] (float64)."""
        return torch.outer(self.u, self.lam)

    def _apply(self):
        module = self.lm.arch.mlp_out[self.layer]
        self._save(module.weight)
        slots = self.lm.arch.value_slots(self.layer)
        slots.add_(self.update_matrix().to(slots.device, slots.dtype))


def as_hparams(hparams, lm=None) -> ROMEHyperParams:
    """``hparams`` if it is a :class:`ROMEHyperParams`; None: the preset for ``lm``; else TypeError."""
    if hparams is None:
        if lm is None:
            raise ValueError("hparams=None needs the model to choose its preset")
        return ROMEHyperParams.for_model(lm)
    if not isinstance(hparams, ROMEHyperParams):
        hint = " (build one with ROMEHyperParams(**your_dict))" if isinstance(hparams, dict) else ""
        raise TypeError(f"ROME hparams must be a ROMEHyperParams or None, got "
                        f"{type(hparams).__name__}{hint}")
    return hparams


def rome_edit(lm, prompt: str, subject: str, target_new: str, hparams: ROMEHyperParams | None = None,
              *, data_dir=None, progress: bool = False) -> ROMEEdit:
    """Edit ``lm`` so that ``prompt`` (which contains ``subject``) continues with ``target_new``.

    Returns the applied :class:`ROMEEdit`; ``.restore()`` or leaving a ``with`` block undoes it.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"empty prompt: {prompt!r}")
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f"empty subject: {subject!r}")
    if not isinstance(target_new, str) or not target_new.strip():
        raise ValueError(f"empty target: the new target must be a non-empty string, got {target_new!r}")
    if subject not in prompt:
        raise ValueError(f"subject {subject!r} not in prompt {prompt!r}")
    if "{" in prompt or "}" in prompt:
        raise ValueError(f"braces are not allowed in a ROME prompt: {prompt!r}")
    hp = as_hparams(hparams, lm).resolve(lm)
    checked = tg.check_prompt(lm, prompt)          # masks / trailing whitespace, raises on bad prompts
    if subject not in checked:
        raise ValueError(f"subject {subject!r} not in prompt {checked!r} (after whitespace trimming)")
    tg.prepare(lm, checked, target_new)            # raises if the target tokenises to nothing
    request = ROMERequest(checked, subject, target_new)

    templates = context_templates(lm, hp.context_template_length_params, hp.seed)
    mom2 = effective_mom2(lm, hp, data_dir=data_dir)   # the corpus pass shows progress; it runs once
    k_star = compute_k(lm, hp.layer, templates, checked, subject)
    # Only δ needs gradients: with the weights frozen, autograd keeps no graph below the edited layer.
    with grad_ready(lm.model):
        v_star, v_init, info = compute_v(lm, hp, templates, checked, subject, target_new,
                                         progress=progress)
    module = lm.arch.mlp_out[hp.layer]
    with torch.no_grad():
        out_at_k = module(k_star.to(module.weight.dtype)[None]).reshape(-1).float()
    u, lam = rank_one_update(k_star, v_star, out_at_k, mom2)
    return ROMEEdit(lm, request, hp, u, lam, k_star, v_star, v_init, info).apply()
