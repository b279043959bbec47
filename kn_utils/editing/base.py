"""Weight edits that can be undone bit-exactly (KN edits and ROME both build on :class:`WeightEdit`)."""
from __future__ import annotations

import torch


class WeightEdit:
    """Keeps a copy of every tensor it changes and copies them back on :meth:`restore`.

    Use as a plain object (``edit.restore()``) or a context manager (restored on exit, also when the
    body raises).  Subclasses call :meth:`_save` on a parameter before changing it in place.
    """

    def __init__(self, lm, description: str = ""):
        self.lm = lm
        self.description = description
        self._originals: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.applied = False

    def _save(self, param: torch.Tensor) -> None:
        if not any(p is param for p, _ in self._originals):
            self._originals.append((param, param.detach().clone()))

    def apply(self) -> "WeightEdit":
        """Change the weights (once: applying an applied edit does nothing); a failure part-way
        restores what was already changed."""
        if self.applied:
            return self
        try:
            with torch.no_grad():
                self._apply()
        except BaseException:
            self.restore()
            raise
        self.applied = True
        return self

    def _apply(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        """Put every changed tensor back exactly as it was (idempotent)."""
        with torch.no_grad():
            for param, original in self._originals:
                param.copy_(original)
        self._originals.clear()
        self.applied = False

    def __enter__(self):
        return self.apply()

    def __exit__(self, *exc):
        self.restore()
        return False

    def __repr__(self):
        state = "applied" if self.applied else "not applied"
        return f"{type(self).__name__}({self.description!r}, {state})"
