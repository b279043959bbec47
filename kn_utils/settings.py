"""Settings read from the environment, and the one rule for reading them.

An empty or whitespace-only value means "not set", exactly like an absent variable: ``make`` exports a
variable it could not fill as an empty string (``KN_DATA_DIR=`` on a machine without ``../shared``),
and ``Path("")`` is the current folder, so an empty value taken at face value points somewhere nobody
meant.  The same holds for a setting passed on as an argument (``data_dir=""``): see :func:`given`.

Variables the package reads: ``KN_DATA_DIR``, ``KN_SHARED_DATA`` (kn_utils.data), ``KN_UTILS_CACHE``
(kn_utils.cache), ``HF_HUB_OFFLINE`` (kn_utils.models), ``KN_BENCH_TOKENIZER`` (benchmarks),
``KN_FIGURES_DIR`` (kn_utils.plotting); the notebooks read ``KN_MODEL``, ``KN_DEVICE`` and their sizes.
"""
from __future__ import annotations

import os

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env(name: str, default=None):
    """``$name`` with surrounding whitespace removed, or ``default`` if it is unset, empty or blank."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip()


def env_flag(name: str, default: bool = False) -> bool:
    """A yes/no setting (1/0, true/false, yes/no, on/off; any case); ``default`` if unset or empty."""
    value = env(name)
    if value is None:
        return default
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not a yes/no setting: use one of "
                     f"{'/'.join(_TRUE)} or {'/'.join(_FALSE)}, or unset it (unset {name})")


def given(value) -> bool:
    """Whether an optional setting was given: None, "" and whitespace-only strings mean "not given"."""
    if value is None:
        return False
    return not (isinstance(value, str) and not value.strip())


__all__ = ["env", "env_flag", "given"]
