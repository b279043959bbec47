"""The ROME edit, in two steps as ROME's ``execute_rome`` / ``apply_rome_to_model``:
:func:`rome_compute` returns the updates (k*, v*, u, Λ per request; nothing applied) and
:func:`apply_rome` applies a list of them as one restorable :class:`ROMEEdit`.  :func:`rome_edit`
is the one-call path (compute one request, apply it)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ... import targets as tg
from ...hooks import grad_ready
from ..base import EditRequest, WeightEdit
from . import compute, stats, templates as tpl
from .hparams import ROMEHyperParams, as_hparams

ROMERequest = EditRequest   # the former name of the one request type


@dataclass
class ROMEUpdate:
    """One request's rank-one update of layer ``hparams.layer``: W_slots += u Λᵀ (float64).

    ``k_star`` / ``v_star``: the key and value of the method; ``k0`` / ``v0``: key and MLP output at
    the subject's last token of the bare prompt, before the edit (None for an update built by hand).
    """

    request: EditRequest
    hparams: ROMEHyperParams
    u: torch.Tensor
    lam: torch.Tensor
    k_star: torch.Tensor | None = None
    v_star: torch.Tensor | None = None
    v_init: torch.Tensor | None = None
    info: dict = field(default_factory=dict)
    k0: torch.Tensor | None = None
    v0: torch.Tensor | None = None

    @property
    def layer(self) -> int:
        return self.hparams.layer

    @property
    def delta_norm(self) -> float:
        return float(torch.linalg.vector_norm(self.u) * torch.linalg.vector_norm(self.lam))

    def update_matrix(self) -> torch.Tensor:
        """The rank-one change of the value slots, [n_neurons, d_model] (float64)."""
        return torch.outer(self.u, self.lam)


class ROMEEdit(WeightEdit):
    """ROME updates of output projections, applied in their order as one restorable edit.

    Built by :func:`rome_edit` (one update, applied) or :func:`apply_rome` (any number).  With one
    update its fields (``request``, ``u``, ``lam``, ``k_star``, ``v_star``, ...) are the edit's own.
    """

    def __init__(self, lm, request: EditRequest, hparams: ROMEHyperParams, u: torch.Tensor,
                 lam: torch.Tensor, k_star, v_star, v_init, info, *, k0=None, v0=None):
        self._init(lm, [ROMEUpdate(request, hparams, u, lam, k_star, v_star, v_init, info, k0, v0)])

    @classmethod
    def from_updates(cls, lm, updates) -> "ROMEEdit":
        """An (unapplied) edit of ``updates`` (:class:`ROMEUpdate`, applied in this order)."""
        updates = list(updates)
        if not updates or not all(isinstance(u, ROMEUpdate) for u in updates):
            raise ValueError(f"apply_rome needs a non-empty list of ROMEUpdate (from rome_compute), "
                             f"got {updates!r:.200}")
        edit = cls.__new__(cls)
        edit._init(lm, updates)
        return edit

    def _init(self, lm, updates):
        first = updates[0]
        what = f"{first.request.prompt!r} -> {first.request.target_new!r}" if len(updates) == 1 \
            else f"{len(updates)} requests"
        layers = sorted({u.layer for u in updates})
        super().__init__(lm, f"ROME layer {', '.join(map(str, layers))}: {what}")
        self.updates = updates
        self.layer = first.layer if len(layers) == 1 else layers
        for name in ("request", "hparams", "u", "lam", "k_star", "v_star", "v_init", "k0", "v0", "info"):
            setattr(self, name, getattr(first, name) if len(updates) == 1 else None)
        if len(updates) == 1:
            self.delta_norm = first.delta_norm
        else:   # the Frobenius norm of each layer's summed change, over the layers
            self.delta_norm = float(sum(torch.linalg.matrix_norm(sum(u.update_matrix() for u in updates
                                                                      if u.layer == layer)) ** 2
                                        for layer in layers) ** 0.5)

    def update_matrix(self) -> torch.Tensor:
        """The rank-one change of the value slots, [n_neurons, d_model] (float64); one update only."""
        if len(self.updates) != 1:
            raise ValueError("update_matrix() is one update's: read .updates[i].update_matrix()")
        return self.updates[0].update_matrix()

    def _apply(self):
        for update in self.updates:   # one at a time, in order: one update adds as rome_edit does
            module = self.lm.arch.mlp_out[update.layer]
            self._save(module.weight)
            slots = self.lm.arch.value_slots(update.layer)
            slots.add_(update.update_matrix().to(slots.device, slots.dtype))


def _request(lm, request) -> EditRequest:
    """``request`` (an EditRequest, a dict or a (prompt, subject, target_new) tuple) checked, with
    the prompt as the tokenizer sees it; raises ValueError naming the problem."""
    if isinstance(request, EditRequest):
        prompt, subject, target_new = request.prompt, request.subject, request.target_new
    elif isinstance(request, dict):
        missing = {"prompt", "subject", "target_new"} - set(request)
        if missing:
            raise ValueError(f"a ROME request dict needs prompt, subject and target_new; missing "
                             f"{sorted(missing)} in {request!r}")
        prompt, subject, target_new = request["prompt"], request["subject"], request["target_new"]
    elif isinstance(request, (tuple, list)) and len(request) == 3:
        prompt, subject, target_new = request
    else:
        raise ValueError(f"a ROME request is an EditRequest, a dict or a (prompt, subject, target_new) "
                         f"tuple, got {request!r}")
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
    checked = tg.check_prompt(lm, prompt)          # masks / trailing whitespace, raises on bad prompts
    if subject not in checked:
        raise ValueError(f"subject {subject!r} not in prompt {checked!r} (after whitespace trimming)")
    tg.prepare(lm, checked, target_new)            # raises if the target tokenises to nothing
    tg.subject_span(lm, checked, subject)          # a whole word of the prompt, before any compute
    if isinstance(request, EditRequest):
        return request if request.prompt == checked else EditRequest(
            request.relation, checked, subject, request.target_true, target_new, request.prompts)
    return EditRequest(relation=None, prompt=checked, subject=subject, target_true=None,
                       target_new=target_new)


def rome_compute(lm, requests, hparams: ROMEHyperParams | None = None, *, data_dir=None,
                 progress: bool = False) -> list[ROMEUpdate]:
    """The ROME update of each request, all computed on the weights as they are now; nothing applied.

    ``requests``: :class:`EditRequest`s, dicts (prompt, subject, target_new) or (prompt, subject,
    target_new) tuples; every one is checked before any computation.  :func:`apply_rome` applies
    the updates.  (ROME's own loop computes each request on the model with the earlier requests
    applied; here they are independent, as in an evaluation that restores after each edit.)
    """
    if isinstance(requests, (EditRequest, dict)) or (
            isinstance(requests, tuple) and len(requests) == 3 and all(isinstance(x, str) for x in requests)):
        requests = [requests]
    checked = [_request(lm, r) for r in requests]
    if not checked:
        raise ValueError("rome_compute needs at least one request")
    hp = as_hparams(hparams, lm).resolve(lm)
    templates = tpl.context_templates(lm, hp.context_template_length_params, hp.seed)
    mom2 = stats.effective_mom2(lm, hp, data_dir=data_dir)   # the corpus pass shows progress; runs once
    keys = [compute.compute_keys(lm, hp.layer, templates, r.prompt, r.subject) for r in checked]
    # Only δ needs gradients: with the weights frozen, autograd keeps no graph below the edited layer.
    with grad_ready(lm.model):
        triples = [(r.prompt, r.subject, r.target_new) for r in checked]
        values = [compute.compute_v(lm, hp, templates, *triples[0], progress=progress)] \
            if len(triples) == 1 else compute.compute_values(lm, hp, templates, triples, progress=progress)
    module = lm.arch.mlp_out[hp.layer]
    updates = []
    for request, (k_star, k0), (v_star, v_init, info) in zip(checked, keys, values):
        with torch.no_grad():   # the layer's output (bias included) at k₀ and k*, with today's weights
            out = module(torch.stack([k0, k_star]).to(module.weight.dtype)).reshape(2, -1).float()
        v0, out_at_k = out[0], out[1]
        k_ref, v_ref = (k0, v0) if hp.update == "rome_code" else (k_star, out_at_k)
        u, lam = compute.rank_one_update(k_star, v_star, mom2, k_ref=k_ref, v_ref=v_ref)
        updates.append(ROMEUpdate(request, hp, u, lam, k_star, v_star, v_init, info, k0, v0))
    return updates


def apply_rome(lm, updates) -> ROMEEdit:
    """Apply ``updates`` (from :func:`rome_compute`), in order, as one edit; ``.restore()`` or the
    end of a ``with`` block undoes them all, bit for bit."""
    if isinstance(updates, ROMEUpdate):
        updates = [updates]
    return ROMEEdit.from_updates(lm, updates).apply()


def rome_edit(lm, prompt: str, subject: str, target_new: str, hparams: ROMEHyperParams | None = None,
              *, data_dir=None, progress: bool = False) -> ROMEEdit:
    """Edit ``lm`` so that ``prompt`` (which contains ``subject``) continues with ``target_new``.

    Returns the applied :class:`ROMEEdit`; ``.restore()`` or leaving a ``with`` block undoes it.
    ``hparams=None``: :meth:`ROMEHyperParams.for_model` (the paper's configuration).
    """
    request = _request(lm, (prompt, subject, target_new))
    return apply_rome(lm, rome_compute(lm, [request], hparams, data_dir=data_dir, progress=progress))
