"""Context managers that read and write activations at named sites (see :mod:`kn_utils.arch`).

Everything here is a forward hook or forward pre-hook registered on the model's own modules and
removed in ``finally``: no module is ever replaced, and an exception inside a ``with`` body leaves
the model exactly as it was.  Written values are computed out of place (``torch.where``), so
gradients flow through them.

    with record(lm, "neurons", layers=[3, 4]) as acts:
        lm.model(ids)
    acts[3]                       # [batch, positions, n_neurons]

    with scale_activation(lm, "neurons", 5, 0.0, units=[17], positions=-1):
        ...                       # neuron (5, 17) zeroed at the last position

    with suppress(lm, [(5, 17), (9, 3)]): ...
"""
from __future__ import annotations

import numbers
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterable, Sequence

import torch

from .checks import as_indices, as_pair

Index = int | Sequence[int] | slice | torch.Tensor | None

class HookSet:
    """Registers hooks and guarantees their removal; the base of every context manager here."""

    def __init__(self):
        self._handles = []

    def add(self, module, fn, *, pre: bool, with_kwargs: bool = False):
        if pre:
            handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        else:
            handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
        self._handles.append(handle)

    def remove(self):
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def _wrap(fn: Callable[[torch.Tensor], torch.Tensor | None], pre: bool):
    """Adapt a tensor -> tensor function to a module hook, whatever the module's output type."""
    if pre:
        def hook(module, args):
            new = fn(args[0])
            if new is None:
                return None
            return (new,) + tuple(args[1:])
    else:
        def hook(module, args, output):
            value = output[0] if isinstance(output, tuple) else output
            new = fn(value)
            if new is None:
                return None
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
    return hook


def _layers(lm, site: str, layers) -> list[int]:
    if site == "embed":
        return [0]
    return lm.arch.check_layers(layers)


@contextmanager
def modify(lm, site: str, fns: dict[int, Callable[[torch.Tensor], torch.Tensor | None]]):
    """Apply ``fns[layer](value) -> new value`` at ``site`` of each listed layer.

    The function sees the whole tensor ([batch, positions, width]); returning None keeps it.
    """
    hooks = HookSet()
    try:
        for layer, fn in fns.items():
            module, pre = lm.arch.module(site, layer)
            fn = lm.arch.site_view(site, layer, fn, hooks.add)
            hooks.add(module, _wrap(fn, pre), pre=pre)
        yield
    finally:
        hooks.remove()


@contextmanager
def grad_ready(model):
    """Eval mode (no dropout) and frozen parameters for gradients with respect to activations;
    both restored afterwards.  Frozen parameters keep autograd from saving every layer input for
    weight gradients nobody uses (about 3x faster backward passes on a CPU)."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class StopForward(Exception):
    """Raised by :func:`record` with ``stop=True`` once its last layer is read; the ``with`` ends it."""


@contextmanager
def record(lm, site: str, layers: int | Iterable[int] | None = None, *, detach: bool = True,
           stop: bool = False):
    """Yield a dict ``{layer: activation}`` filled by the forward passes run in the body.

    With ``detach=False`` the stored tensors stay in the autograd graph (call ``retain_grad``).
    A second forward pass in the same body overwrites the first.  With ``stop=True`` (baukit's
    ``Trace(stop=True)``) the forward ends as soon as the last listed layer is recorded: the layers
    above it do not run, and neither does the rest of the ``with`` body.
    """
    store: dict[int, torch.Tensor] = {}
    chosen = _layers(lm, site, layers)
    last = max(chosen, default=None)
    mine = StopForward(f"record({site!r}) stop after layer {last}")

    def keeper(layer):
        def keep(value):
            store[layer] = value.detach() if detach else value
            if stop and layer == last:
                raise mine
        return keep

    with modify(lm, site, {layer: keeper(layer) for layer in chosen}):
        try:
            yield store
        except StopForward as err:
            if err is not mine:   # only this record's own stop ends here (nested records)
                raise


def _check_index(index: Index, name: str) -> Index:
    """Integer indices (or a slice / None) only: a float or bool position is an error, not a cast."""
    if index is None or isinstance(index, slice):
        return index
    return as_indices(index, name)


def _as_index(index: Index, size: int, name: str = "index") -> torch.Tensor:
    """Boolean mask of length ``size`` from an int / list / slice / tensor / None (= all)."""
    mask = torch.zeros(size, dtype=torch.bool)
    if index is None:
        mask[:] = True
    elif isinstance(index, slice):
        mask[index] = True
    else:
        idx = torch.as_tensor(as_indices(index, name), dtype=torch.long).reshape(-1)
        if idx.numel() and (idx.max() >= size or idx.min() < -size):
            raise ValueError(f"{name} {index!r} out of range: valid values are {-size}..{size - 1} "
                             f"for a dimension of size {size}")
        mask[idx] = True
    return mask


def _selection(value: torch.Tensor, units: Index, positions: Index, rows: Index) -> torch.Tensor:
    """Broadcastable boolean mask selecting [rows, positions, units] of a [B, P, W] tensor."""
    b, p, w = value.shape[0], value.shape[-2], value.shape[-1]
    mask = (_as_index(rows, b, "rows")[:, None, None] & _as_index(positions, p, "positions")[None, :, None]
            & _as_index(units, w, "units")[None, None, :])
    return mask.to(value.device)


def _check_units(lm, site: str, layers: Iterable[int], units: Index):
    if site != "neurons" or units is None or isinstance(units, slice):
        return
    for layer in layers:
        for unit in as_indices(units, "neuron"):
            lm.arch.check_neuron(layer, unit)


def _edit(lm, site, layer, units, positions, rows, op):
    layers = _layers(lm, site, layer)
    _check_units(lm, site, layers, units)
    # types are checked here, before any hook; ranges once the activation's shape is known
    units, positions, rows = (_check_index(units, "units"), _check_index(positions, "positions"),
                              _check_index(rows, "rows"))

    def fn(value):
        return op(value, _selection(value, units, positions, rows))
    return modify(lm, site, {layer_: fn for layer_ in layers})


def set_activation(lm, site: str, layer: int | Iterable[int] | None, value, *, units: Index = None,
                   positions: Index = None, rows: Index = None):
    """Replace the selected entries by ``value`` (a number or a tensor broadcastable to the site)."""
    def op(x, mask):
        v = value if not torch.is_tensor(value) else value.to(x.device, x.dtype)
        return torch.where(mask, v, x)
    return _edit(lm, site, layer, units, positions, rows, op)


def scale_activation(lm, site: str, layer, factor: float, *, units: Index = None,
                     positions: Index = None, rows: Index = None):
    """Multiply the selected entries by ``factor``."""
    return _edit(lm, site, layer, units, positions, rows,
                 lambda x, mask: torch.where(mask, x * factor, x))


def add_activation(lm, site: str, layer, delta, *, units: Index = None, positions: Index = None,
                   rows: Index = None):
    """Add ``delta`` (number or broadcastable tensor) to the selected entries."""
    def op(x, mask):
        d = delta if not torch.is_tensor(delta) else delta.to(x.device, x.dtype)
        return torch.where(mask, x + d, x)
    return _edit(lm, site, layer, units, positions, rows, op)


def neurons_by_layer(lm, neurons) -> dict[int, list[int]]:
    """Validate ``neurons`` [(layer, neuron), ...] and group them: {layer: [neuron, ...]} (no repeats)."""
    if neurons is None or isinstance(neurons, (str, bytes)):
        raise ValueError(f"neurons must be a list of (layer, neuron) pairs, got {neurons!r}")
    grouped: dict[int, list[int]] = defaultdict(list)
    for item in neurons:
        layer, neuron = as_pair(item, "a neuron", "layer", "neuron")
        layer, neuron = lm.arch.check_neuron(layer, neuron)
        if neuron not in grouped[layer]:
            grouped[layer].append(neuron)
    if not grouped:
        raise ValueError("no neurons given: pass a non-empty list of (layer, neuron) pairs")
    return dict(grouped)


def _row_positions(positions) -> torch.Tensor:
    if not torch.is_tensor(positions):
        return torch.as_tensor(as_indices(positions, "row_positions"), dtype=torch.long).reshape(-1)
    # a dtype check only: reading the values would sync a GPU once per batch
    if positions.dtype == torch.bool or positions.dtype.is_floating_point:
        raise TypeError(f"row_positions must be an integer tensor, got dtype {positions.dtype}")
    return positions.reshape(-1)


def _per_row(name: str, tensor: torch.Tensor, batch: int) -> None:
    if tensor.shape[0] != batch:
        raise ValueError(f"{name} has {tensor.shape[0]} entries but the batch has {batch} rows: "
                         f"give one per row")


def _check_factor(factor):
    if torch.is_tensor(factor):
        if factor.dim() != 1 or factor.dtype == torch.bool:
            raise ValueError(f"a tensor factor must be 1-D, one number per batch row, got shape "
                             f"{tuple(factor.shape)} and dtype {factor.dtype}")
        return factor
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
        raise TypeError(f"factor must be a number or a 1-D tensor of per-row numbers, got {factor!r}")
    return float(factor)


@contextmanager
def scale_neurons(lm, neurons, factor, *, positions: Index = None, rows: Index = None,
                  row_positions=None):
    """Multiply the listed (layer, neuron) activations by ``factor``: the one neuron-scaling hook
    behind :func:`suppress`, :func:`enhance` and :func:`intervene`.

    ``factor``: a number, or a 1-D tensor with one factor per batch row.  Where: ``positions`` /
    ``rows`` select positions and rows shared by the batch (all by default), or ``row_positions``
    (an integer tensor [batch]) gives each row of a right-padded batch its own position.
    """
    grouped = neurons_by_layer(lm, neurons)
    factor = _check_factor(factor)
    if row_positions is not None:
        if positions is not None or rows is not None:
            raise ValueError("give either row_positions (one position per row) or positions / rows, "
                             "not both")
        row_positions = _row_positions(row_positions)
    # types are checked here, before any hook; ranges once the activation's shape is known
    positions, rows = _check_index(positions, "positions"), _check_index(rows, "rows")

    def scaler(units):
        def fn(value):
            b, p = value.shape[0], value.shape[-2]
            if row_positions is None:
                where = (_as_index(rows, b, "rows")[:, None]
                         & _as_index(positions, p, "positions")[None, :]).to(value.device)
            else:
                _per_row("row_positions", row_positions, b)
                where = torch.zeros((b, p), dtype=torch.bool, device=value.device)
                where[torch.arange(b, device=value.device), row_positions.to(value.device)] = True
            f = factor
            if torch.is_tensor(f):
                _per_row("factor", f, b)
                f = f.to(value.device, value.dtype)[:, None, None]
            idx = torch.as_tensor(units, device=value.device)
            picked = value.index_select(-1, idx)
            # out of place, so gradients flow through the untouched entries
            return value.index_copy(-1, idx, torch.where(where[..., None], picked * f, picked))
        return fn
    with modify(lm, "neurons", {layer: scaler(units) for layer, units in grouped.items()}):
        yield


def intervene(lm, neurons, factor: float, positions: torch.Tensor | None):
    """Context manager: multiply ``neurons`` by ``factor`` at one position per batch row.

    ``positions``: tensor [batch] of the position to change in each row (None: every position).
    A thin wrapper of :func:`scale_neurons` (``row_positions=``).
    """
    return scale_neurons(lm, neurons, factor, row_positions=positions)


def suppress(lm, neurons, *, positions: Index = None, rows: Index = None, row_positions=None):
    """Set the activations of ``neurons`` [(layer, neuron), ...] to zero (Dai et al.'s suppression).

    ``positions=None`` acts at every position; pass the target position (e.g. ``-1``) to act only
    there, or ``row_positions`` (tensor [batch]) for one position per row.
    """
    return scale_neurons(lm, neurons, 0.0, positions=positions, rows=rows, row_positions=row_positions)


def enhance(lm, neurons, factor: float = 2.0, *, positions: Index = None, rows: Index = None,
            row_positions=None):
    """Multiply the activations of ``neurons`` by ``factor`` (Dai et al. double them)."""
    return scale_neurons(lm, neurons, factor, positions=positions, rows=rows,
                         row_positions=row_positions)


def hook_count(model) -> int:
    """Number of forward hooks and pre-hooks on every module (tests use it to prove clean-up)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
