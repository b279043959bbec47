"""The ROME edit: :func:`rome_edit` computes k*, v* and the update, :class:`ROMEEdit` applies it."""
from __future__ import annotations

import torch

from ... import targets as tg
from ...hooks import grad_ready
from ..base import EditRequest, WeightEdit
from . import compute, stats, templates as tpl
from .hparams import ROMEHyperParams, as_hparams

ROMERequest = EditRequest   # the former name of the one request type


class ROMEEdit(WeightEdit):
    """A computed ROME update of one layer's output projection; applied on creation by :func:`rome_edit`.

    ``k_star`` / ``v_star``: the key and value of the method; ``k0`` / ``v0``: key and MLP output at
    the subject's last token of the bare prompt, before the edit (None for an edit built by hand).
    """

    def __init__(self, lm, request: EditRequest, hparams: ROMEHyperParams, u: torch.Tensor,
                 lam: torch.Tensor, k_star, v_star, v_init, info, *, k0=None, v0=None):
        super().__init__(lm, f"ROME layer {hparams.layer}: {request.prompt!r} -> {request.target_new!r}")
        self.request = request
        self.hparams = hparams
        self.layer = hparams.layer
        self.u, self.lam = u, lam
        self.k_star, self.v_star, self.v_init = k_star, v_star, v_init
        self.k0, self.v0 = k0, v0
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


def rome_edit(lm, prompt: str, subject: str, target_new: str, hparams: ROMEHyperParams | None = None,
              *, data_dir=None, progress: bool = False) -> ROMEEdit:
    """Edit ``lm`` so that ``prompt`` (which contains ``subject``) continues with ``target_new``.

    Returns the applied :class:`ROMEEdit`; ``.restore()`` or leaving a ``with`` block undoes it.
    ``hparams=None``: :meth:`ROMEHyperParams.for_model` (the paper's configuration).
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
    tg.subject_span(lm, checked, subject)          # a whole word of the prompt, before any compute
    request = EditRequest(relation=None, prompt=checked, subject=subject, target_true=None,
                          target_new=target_new)

    templates = tpl.context_templates(lm, hp.context_template_length_params, hp.seed)
    mom2 = stats.effective_mom2(lm, hp, data_dir=data_dir)   # the corpus pass shows progress; runs once
    k_star, k0 = compute.compute_keys(lm, hp.layer, templates, checked, subject)
    # Only δ needs gradients: with the weights frozen, autograd keeps no graph below the edited layer.
    with grad_ready(lm.model):
        v_star, v_init, info = compute.compute_v(lm, hp, templates, checked, subject, target_new,
                                                 progress=progress)
    module = lm.arch.mlp_out[hp.layer]
    with torch.no_grad():   # the layer's output (bias included) at k₀ and k*, with today's weights
        out = module(torch.stack([k0, k_star]).to(module.weight.dtype)).reshape(2, -1).float()
    v0, out_at_k = out[0], out[1]
    k_ref, v_ref = (k0, v0) if hp.update == "rome_code" else (k_star, out_at_k)
    u, lam = compute.rank_one_update(k_star, v_star, mom2, k_ref=k_ref, v_ref=v_ref)
    return ROMEEdit(lm, request, hp, u, lam, k_star, v_star, v_init, info, k0=k0, v0=v0).apply()
