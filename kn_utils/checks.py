"""Index validation shared by every entry point that takes layers, neurons or token positions.

One rule everywhere: Python ints and numpy / torch integer scalars are indices; bool, float, str
and anything else are a :class:`TypeError` naming the argument (``int(1.7)`` would silently pick
index 1); an index outside its range is a :class:`ValueError` that says the range.
"""
from __future__ import annotations

import numpy as np
import torch


def _is_int_scalar(value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return (torch.is_tensor(value) and value.dim() == 0 and value.dtype != torch.bool
            and not value.dtype.is_floating_point and not value.dtype.is_complex)


def as_index(value, name: str, size: int | None = None, *, negative: bool = False,
             range_text: str | None = None) -> int:
    """``value`` as a Python int, checked to lie in ``0..size-1`` (``-size..size-1`` with
    ``negative``).  ``range_text`` replaces the default description of the valid range."""
    if not _is_int_scalar(value):
        raise TypeError(f"{name} must be an integer (int or a numpy / torch integer), got "
                        f"{type(value).__name__} {value!r}")
    index = int(value)
    if size is not None:
        low = -size if negative else 0
        if not low <= index < size:
            text = range_text or (f"valid values are {low}..{size - 1}" if size > 0
                                  else "there is nothing to index")
            raise ValueError(f"{name} {index} out of range: {text}")
    return index


def as_indices(values, name: str, size: int | None = None, *, negative: bool = False,
               range_text: str | None = None) -> list[int]:
    """A scalar index or a sequence / array / tensor of them as a list of Python ints (each checked
    as by :func:`as_index`).  Float and bool arrays are rejected, not cast."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be an integer or a sequence of integers, got the string {values!r}")
    if _is_int_scalar(values):
        return [as_index(values, name, size, negative=negative, range_text=range_text)]
    if isinstance(values, (np.ndarray, torch.Tensor)):
        dtype = values.dtype
        is_int = (np.issubdtype(dtype, np.integer) if isinstance(values, np.ndarray)
                  else dtype != torch.bool and not dtype.is_floating_point and not dtype.is_complex)
        if not is_int:
            raise TypeError(f"{name} must hold integers, got an array of dtype {dtype}")
        values = values.reshape(-1).tolist()
    try:
        items = list(values)
    except TypeError:
        raise TypeError(f"{name} must be an integer or a sequence of integers, got "
                        f"{type(values).__name__} {values!r}") from None
    return [as_index(v, name, size, negative=negative, range_text=range_text) for v in items]


def as_pair(item, what: str, first: str, second: str) -> tuple:
    """``item`` unpacked as a two-element pair, or a :class:`ValueError` naming what a pair is here
    (e.g. ``as_pair(x, "a neuron", "layer", "neuron")``: "a neuron is a (layer, neuron) pair, got ...").
    The elements are returned unchecked: the caller validates them as indices, strings, ...
    (a string of length 2 unpacks too, so callers that take strings check their types)."""
    try:
        a, b = item
    except (TypeError, ValueError):
        raise ValueError(f"{what} is a ({first}, {second}) pair, got {item!r}") from None
    return a, b


class UsageError(ValueError):
    """The user's input is wrong and nothing was computed yet: ``python -m kn_utils`` prints it as one
    line (``python -m kn_utils <command>: error: ...``) and exits with status 2, like argparse."""


def positive_int(value, name: str) -> int:
    """``value`` as an int >= 1 (bool, float and str are refused: 1.5 must not become 1)."""
    if not _is_int_scalar(value) or int(value) < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def writable_folder(path, name: str = "--out"):
    """``path`` as a folder that exists (created if needed) and takes a new file, checked before any
    compute: a file in its place, a read-only or unreachable folder is a :class:`UsageError`."""
    import tempfile
    from pathlib import Path

    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{name} {str(folder)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(f"{name} {str(folder)!r} cannot be written ({err.strerror or err})") from None
    return folder


def replace_file(path, write) -> None:
    """Write ``path`` through ``write(temporary path)`` and rename the result over it once complete,
    so an interrupted run leaves the old file or the new one, never half of one."""
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
