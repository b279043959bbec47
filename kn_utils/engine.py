"""The batched-forward engine that integrated gradients and causal tracing share.

Both methods evaluate many variants of one prompt that differ from a *carrier* run only from some
layer on (IG: a layer's neurons scaled; tracing: states restored from layer l).  Below that layer
such a row equals the carrier, so one forward runs the carrier alone through the lower blocks and
widens the batch where rows start to differ (:class:`Widening`, :func:`batch_widener`).  Causal LMs
also skip the positions before the first change: they run once and enter as a KV cache
(:func:`prefix_cache`, :func:`widen_cache`), and the vocabulary projection runs only at the read
position (:func:`narrow_logits`, :func:`read_logits`).  :func:`forward` puts these together; the
methods only say which rows join where and what their hooks write.

    plan = Widening(carrier=1, copies=[0, 3, 0, 2])   # 3 rows join at block 1, 2 at block 3
    logits = forward(lm, ids, read, widening=plan, site="neurons", writers=fns)  # [1 + 5, vocab]

The plain loops these are checked against are in :mod:`kn_utils.reference`.
"""
from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .hooks import HookSet, modify

__all__ = ["Widening", "forward", "accepts", "batch_widener", "widen_rows", "narrow_logits", "read_logits",
           "prefix_cache", "widen_cache", "layered_cache", "cache_kwarg", "returned_cache",
           "cache_args", "default_rows", "row_bytes", "use_prefix_cache", "joins_after_block",
           "keep_block_output", "replay_blocks"]


# ----------------------------------------------------------------------------- KV caches

@functools.lru_cache(maxsize=None)
def _forward_params(model_class) -> frozenset:
    return frozenset(inspect.signature(model_class.forward).parameters)


def accepts(model, name: str) -> bool:
    """Whether ``model``'s forward takes the keyword ``name``."""
    return name in _forward_params(type(model))


def cache_kwarg(model) -> str:
    """Name of the forward argument taking a KV cache: transformers 5.x renamed ``past_key_values``
    to ``cache`` (the old name still works there, with a warning)."""
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"


def returned_cache(output):
    """The KV cache a forward with ``use_cache=True`` returned (under either name), or None."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def cache_args(lm, past, attention_mask=None) -> dict:
    """Forward keyword arguments continuing from ``past`` (None: no cache kept or built)."""
    if past is None:
        return {"use_cache": False} if attention_mask is None else \
            {"use_cache": False, "attention_mask": attention_mask}
    return {cache_kwarg(lm.model): past, "use_cache": True, "attention_mask": attention_mask}


@torch.no_grad()
def prefix_cache(lm, input_ids: torch.Tensor, **forward):
    """KV cache of ``input_ids`` [rows, positions] (with whatever hooks are active); ``forward``:
    further forward arguments (``attention_mask``, ``position_ids`` of left-padded rows)."""
    hooks = HookSet()
    try:
        # only the cache is kept: the vocabulary projection runs at the last position, not at
        # every prefix position (Gemma's is larger than the rest of its forward)
        narrow_logits(hooks, lm, -1)
        cache = returned_cache(lm.model(input_ids=input_ids, use_cache=True, **forward))
    finally:
        hooks.remove()
    if cache is None:
        raise ValueError(f"{lm.name} returned no KV cache: pass prefix_cache=False / cache=False")
    return cache


def layered_cache(cache, n_layers: int) -> bool:
    """The cache holds one layer per block whose rows can be selected (transformers' Cache API), so
    each block's cache can have that block's number of rows."""
    layers = getattr(cache, "layers", None)
    return layers is not None and len(layers) == n_layers and all(
        hasattr(layer, "batch_select_indices") and hasattr(layer, "batch_repeat_interleave")
        for layer in layers)


def _carrier_index(rows: int, carrier: int, device=None) -> torch.Tensor:
    """Row r of a widened batch is a copy of carrier row r % carrier."""
    return torch.arange(rows, device=device) % carrier


def _widen(cache, n: int, carrier: int, device) -> None:
    """One cache (or cache layer) of ``carrier`` rows to ``n`` rows, row r a copy of r % carrier."""
    if carrier == 1:  # one carrier row: a plain repeat, no index to build
        cache.batch_repeat_interleave(n)
    else:
        cache.batch_select_indices(_carrier_index(n, carrier, device))


def widen_cache(cache, rows: list[int], carrier: int, device=None):
    """Widen (in place) a cache of ``carrier`` rows to ``rows[l]`` rows in layer l; returns it."""
    if layered_cache(cache, len(rows)):
        for layer, n in zip(cache.layers, rows):
            if n != carrier:
                _widen(layer, n, carrier, device)
    elif len(set(rows)) == 1:
        if rows[0] != carrier:
            _widen(cache, rows[0], carrier, device)
    else:
        raise ValueError("this model's KV cache cannot hold a different number of rows per layer: "
                         "pass prefix_cache=False / cache=False")
    return cache


# ----------------------------------------------------------------------------- widening the batch

def widen_rows(value: torch.Tensor, carrier: int, copies: int) -> torch.Tensor:
    """``value`` with ``copies`` x its first ``carrier`` rows appended."""
    if not copies:
        return value
    return torch.cat([value, value[:carrier].repeat(copies, *[1] * (value.dim() - 1))])


def batch_widener(carrier: int, copies: int, index: torch.Tensor | None = None):
    """A block pre-hook (``with_kwargs=True``) that appends ``copies`` x the first ``carrier`` rows
    of the hidden state to it, for rows that join a batched forward at that block.

    Other block inputs whose batch is ``carrier`` > 1 (masks) are re-indexed with ``index`` (row r
    of the widened batch reads carrier row ``index[r]``); batch-1 inputs broadcast as they are.
    """
    def widen_other(value, hidden):
        if torch.is_tensor(value) and value is not hidden and carrier > 1 and value.dim() >= 2 \
                and value.shape[0] == carrier:
            return value.index_select(0, index.to(value.device))
        if isinstance(value, tuple):
            return tuple(widen_other(v, hidden) for v in value)
        return value

    def widen(module, args, kwargs):
        positional = bool(args) and torch.is_tensor(args[0])
        hidden = args[0] if positional else kwargs.get("hidden_states")
        if not torch.is_tensor(hidden):
            return None
        new = widen_rows(hidden, carrier, copies)
        if carrier > 1:
            args = tuple(widen_other(a, hidden) for a in args)
            kwargs = {k: widen_other(v, hidden) for k, v in kwargs.items()}
        if positional:
            args = (new,) + tuple(args[1:])
        else:
            kwargs = dict(kwargs, hidden_states=new)
        return args, kwargs
    return widen


def _output_widener(carrier: int, copies: int):
    """A block forward hook: the same widening applied to the block's output."""
    def widen(module, args, output):
        value = output[0] if isinstance(output, tuple) else output
        new = widen_rows(value, carrier, copies)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
    return widen


def joins_after_block(lm, site: str) -> bool:
    """Whether ``site`` is the block output ("hidden"): a row that changes block l's output runs
    block l itself as the carrier does, so it joins after the block instead of before it."""
    module, pre = lm.arch.module(site, 0)
    return not pre and module is lm.arch.blocks[0]


@dataclass
class Widening:
    """Which rows join a forward where.

    ``carrier`` rows enter block 0; at block l, ``copies[l]`` copies of them join (before the block,
    or after it with ``after``).  The g-th copy to join (in layer order) is rows
    ``carrier * (1 + g) .. carrier * (2 + g)``: see :meth:`group`.
    """

    carrier: int
    copies: list[int]
    after: bool = False

    def __post_init__(self):
        self.copies = [int(c) for c in self.copies]
        total, self.rows_at = 1, []  # rows at block l's site (after its joins)
        for c in self.copies:
            total += c
            self.rows_at.append(self.carrier * total)
        # rows entering block l (what its attention and its layer of the KV cache see)
        self.rows_in = ([self.carrier] + self.rows_at[:-1]) if self.after else list(self.rows_at)

    def group(self, g: int) -> slice:
        return slice(self.carrier * (1 + g), self.carrier * (2 + g))

    def hook(self, hooks: HookSet, lm) -> None:
        """Register the widening hooks (before any site hook, so that those see the new rows)."""
        for layer, block in enumerate(lm.arch.blocks):
            before = 0 if self.after else self.copies[layer]
            n_in = self.rows_in[layer]
            if before or (self.carrier > 1 and n_in > self.carrier):
                index = _carrier_index(n_in, self.carrier, lm.device) if self.carrier > 1 else None
                hooks.add(block, batch_widener(self.carrier, before, index), pre=True, with_kwargs=True)
            if self.after and self.copies[layer]:
                hooks.add(block, _output_widener(self.carrier, self.copies[layer]), pre=False)


# ----------------------------------------------------------------------------- logits where read

def narrow_logits(hooks: HookSet, lm, positions, rows=None) -> bool:
    """Make the unembedding see only the read hidden states, so the vocabulary projection (Gemma:
    262,144 x 640, more than the rest of a forward) runs once per read position.

    ``rows=None``: every row at the one position ``positions`` -> logits [batch, 1, vocab];
    otherwise the pairs (``rows[i]``, ``positions[i]``) -> logits [1, n_pairs, vocab].
    False (nothing hooked) for a model without an unembedding.
    """
    if lm.arch.unembed is None:
        return False
    if rows is None:
        position = int(positions)

        def pre(module, args):
            hidden = args[0]
            end = position + 1 if position != -1 else None
            return (hidden[:, position:end],) + tuple(args[1:])
    else:
        rows, positions = torch.as_tensor(rows), torch.as_tensor(positions)

        def pre(module, args):
            hidden = args[0]
            picked = hidden[rows.to(hidden.device), positions.to(hidden.device)]
            return (picked[None],) + tuple(args[1:])
    hooks.add(lm.arch.unembed, pre, pre=True)
    return True


def gather_logits(hooks: HookSet, lm, rows, positions) -> bool:
    """:func:`narrow_logits` at the pairs (``rows[i]``, ``positions[i]``)."""
    return narrow_logits(hooks, lm, positions, rows)


def read_logits(lm, rows, positions, **forward) -> torch.Tensor:
    """``lm.model(**forward)``'s logits at the read positions only: [n_pairs, vocab] at the pairs
    (``rows[i]``, ``positions[i]``), or with ``rows=None`` [batch, vocab] at the one position
    ``positions`` of every row.  Gradients flow as through the full logits."""
    hooks = HookSet()
    try:
        narrowed = narrow_logits(hooks, lm, positions, rows)
        logits = lm.model(**forward).logits
    finally:
        hooks.remove()
    if rows is None:
        return logits[:, 0] if narrowed else logits[:, int(positions)]
    if narrowed:
        return logits[0]
    rows = torch.as_tensor(rows, device=logits.device)
    return logits[rows, torch.as_tensor(positions, device=logits.device)]


def forward(lm, input_ids: torch.Tensor, read: int, *, past=None, attention_mask=None,
            widening: Widening | None = None, site: str | None = None, writers=None) -> torch.Tensor:
    """One batched forward: logits [rows, vocab] at position ``read`` of ``input_ids``.

    ``past``: a KV cache of the positions before ``input_ids`` (already widened to the rows of each
    layer, :func:`widen_cache`).  ``widening``: rows joining at their own layer (the carrier rows
    come first in the output).  ``writers``: ``{layer: fn}`` applied at ``site`` (as
    :func:`kn_utils.hooks.modify`), after the widening so that they see every row.
    """
    hooks = HookSet()
    try:
        if widening is not None:
            widening.hook(hooks, lm)
        with modify(lm, site, writers or {}):
            return read_logits(lm, None, read, input_ids=input_ids,
                               **cache_args(lm, past, attention_mask))
    finally:
        hooks.remove()


# ----------------------------------------------------------------------------- starting at a block

@contextmanager
def keep_block_output(lm, layer: int):
    """Yield a dict whose ``"output"`` becomes what block ``layer`` returned in the body's forward
    (detached, as the block returned it: a tensor or a tuple), for :func:`replay_blocks`."""
    kept = {}

    def keep(module, args, output):
        kept["output"] = output.detach() if torch.is_tensor(output) else \
            tuple(o.detach() if torch.is_tensor(o) else o for o in output)
    hooks = HookSet()
    try:
        hooks.add(lm.arch.blocks[layer], keep, pre=False)
        yield kept
    finally:
        hooks.remove()


@contextmanager
def replay_blocks(lm, below: int, output):
    """Forwards in the body skip blocks 0 .. ``below`` - 1: each returns ``output``, what block
    ``below`` - 1 returned in an earlier forward of the same inputs (:func:`keep_block_output`).

    Exact whenever nothing below block ``below`` differs from that forward: the model still
    embeds, builds its masks and position embeddings and hands them to the blocks from ``below``
    on; the skipped blocks' input is dropped and their KV-cache layers are left as they are.
    The blocks' ``forward`` is shadowed on the instance (hooks on them still run), and restored.
    """
    blocks = lm.arch.blocks[:below]
    shadowed = [block.__dict__.get("forward") for block in blocks]   # an instance's own, if any
    try:
        for block in blocks:
            block.forward = lambda *args, **kwargs: output
        yield
    finally:
        for block, own in zip(blocks, shadowed):
            block.__dict__.pop("forward", None)
            if own is not None:
                block.forward = own


# ----------------------------------------------------------------------------- batch sizes

def row_bytes(lm, tokens: int, *, saved: bool) -> int:
    """Activation bytes one batch row of ``tokens`` positions costs: ``saved`` (a backward follows)
    keeps about 8 d_model + 3 n_neurons floats per token and layer; without it only one layer's
    transients (and its attention scores) live at a time."""
    arch = lm.arch
    per_token = 8 * arch.d_model + 3 * arch.n_neurons
    if saved:
        return arch.n_layers * per_token * 4 * max(1, tokens)
    return tokens * (per_token + 4 * tokens) * 4


def default_rows(lm, per_row: int, cpu_budget: int, *, minimum: int = 1,
                 maximum: int | None = None) -> int:
    """Rows per forward whose activations (``per_row`` bytes each) fit the work memory
    (:meth:`LanguageModel.work_memory`: ``cpu_budget`` on a CPU)."""
    rows = lm.work_memory(cpu_budget) // max(per_row, 1)
    if maximum is not None:
        rows = min(rows, maximum)
    return int(max(minimum, rows))


def use_prefix_cache(lm, requested: bool | None) -> bool:
    """Whether a causal LM's shared prefix goes through the KV cache (``requested``; None: default).

    Measured on an H200 with a GPT-2 XL-size model (benchmarks/RESULTS.md): in fp32 the cache saves
    arithmetic, the limit there and on a CPU; in 16-bit the arithmetic is cheap and one forward of
    all rows beats one forward per first token.
    """
    if requested is None:
        requested = not (lm.device.type == "cuda" and lm.dtype in (torch.float16, torch.bfloat16))
    return bool(requested and not lm.arch.is_masked_lm)
