"""Weight edits that can be undone bit-exactly (KN edits and ROME both build on :class:`WeightEdit`).

Edits stack: several may be live on one model at once, on the same parameters, and they can be
restored in any order.  A per-model ledger keeps, for every parameter any live edit changed, the
tensor as it was before the first of them, and the live edits in the order they were applied.
Restoring an edit takes it off the ledger, copies the originals back and re-applies the remaining
live edits in their order.  So at every moment the weights are exactly what applying the live
edits, in the order they were applied, to the unedited model gives (bit for bit: the same
operations on the same values), and once the last live edit is restored the weights are the
originals.  Each edit's change is computed once (ROME's update, KN's delta) and re-applied as is.

Changes made to the weights outside an edit while edits are live are lost when one is restored.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

# model -> {"originals": {id(param): (param, copy)}, "live": [edit, ...]} (application order)
_LEDGERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _ledger(model, create: bool = False) -> dict | None:
    ledger = _LEDGERS.get(model)
    if ledger is None and create:
        ledger = _LEDGERS[model] = {"originals": {}, "live": []}
    return ledger


def live_edits(model) -> list["WeightEdit"]:
    """The edits applied to ``model`` and not yet restored, in the order they were applied."""
    ledger = _ledger(model)
    return list(ledger["live"]) if ledger else []


class WeightEdit:
    """A restorable change of some parameters of ``lm.model``.

    Use as a plain object (``edit.apply()`` / ``edit.restore()``) or a context manager (restored on
    exit, also when the body raises).  Subclasses implement :meth:`_apply`, which must call
    :meth:`_save` on a parameter before changing it in place and must be a function of the
    parameters it reads (it is re-run when an edit applied before it is restored).
    ``applied`` is True exactly while the edit is live on the model.
    """

    def __init__(self, lm, description: str = ""):
        self.lm = lm
        self.description = description
        self._params: dict[int, torch.Tensor] = {}

    @property
    def applied(self) -> bool:
        ledger = _ledger(self.lm.model)
        return bool(ledger) and any(e is self for e in ledger["live"])

    def _save(self, param: torch.Tensor) -> None:
        originals = _ledger(self.lm.model, create=True)["originals"]
        if id(param) not in originals:  # the first live edit of this parameter: keep it as it is
            originals[id(param)] = (param, param.detach().clone())
        self._params[id(param)] = param

    def apply(self) -> "WeightEdit":
        """Change the weights (once: applying an applied edit does nothing); a failure part-way
        leaves the weights as the other live edits had them."""
        if self.applied:
            return self
        ledger = _ledger(self.lm.model, create=True)
        self._params = {}
        try:
            with torch.no_grad():
                self._apply()
        except BaseException:
            self._rebuild(ledger)
            raise
        ledger["live"].append(self)
        return self

    def _apply(self) -> None:
        raise NotImplementedError

    def originals(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, its value before the first live edit of it) for each parameter this live edit
        changed: what the weights return to once every live edit is restored.  The second tensors
        are the ledger's own copies; read them, do not change them."""
        ledger = _ledger(self.lm.model)
        if not ledger or not self.applied:
            return []
        return [ledger["originals"][key] for key in self._params if key in ledger["originals"]]

    def restore(self) -> None:
        """Undo this edit (idempotent); the other live edits stay, as if this one never happened."""
        ledger = _ledger(self.lm.model)
        if not ledger or not any(e is self for e in ledger["live"]):
            return
        ledger["live"] = [e for e in ledger["live"] if e is not self]
        self._rebuild(ledger)

    @staticmethod
    def _rebuild(ledger: dict) -> None:
        """Originals back, then the live edits again in their order; forget unedited originals."""
        with torch.no_grad():
            for param, original in ledger["originals"].values():
                param.copy_(original)
            for edit in ledger["live"]:
                edit._apply()
        touched = {key for edit in ledger["live"] for key in edit._params}
        for key in list(ledger["originals"]):
            if key not in touched:
                del ledger["originals"][key]

    def __enter__(self):
        return self.apply()

    def __exit__(self, *exc):
        self.restore()
        return False

    def __repr__(self):
        state = "applied" if self.applied else "not applied"
        return f"{type(self).__name__}({self.description!r}, {state})"


@dataclass(frozen=True)
class EditRequest:
    """What an editor is asked to do: make ``prompt`` (containing ``subject``) answer ``target_new``.

    The one request type of every editor (``ROMERequest`` and ``evaluation.EditRequest`` are this);
    ``relation``, ``target_true`` and ``prompts`` (all prompts of the fact's bag, for KN attribution)
    are known in an evaluation run and None / empty for a single edit.
    """

    relation: str | None
    prompt: str
    subject: str
    target_true: str | None
    target_new: str
    prompts: tuple[str, ...] = field(default=())
