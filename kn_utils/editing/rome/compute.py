"""ROME's vectors: k* (the key), v* (the value, by Adam on δ) and the rank-one algebra.

The update (REFERENCE.md §4), with u = C⁻¹k* (k* when C is off):

* ``update="rome_code"`` (ROME's code, the paper's Table 1):  ΔW = u (v* − v₀)ᵀ / (uᵀk₀), k₀ / v₀ the
  key and MLP output at the subject's last token of the bare prompt: Ŵ k₀ = v*;
* ``update="formula"``:  ΔW = u (v* − W k*)ᵀ / (uᵀk*):  Ŵ k* = v*.

(W k includes the projection's bias where it has one: the right vector is what the *output* lacks.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ... import targets as tg
from ...engine import read_logits
from ...hooks import modify
from .stats import layer_keys

KL_PROMPT = "{} is a"


# --------------------------------------------------------------------------------------------------
# requests → token positions
# --------------------------------------------------------------------------------------------------
@dataclass
class _Row:
    ids: list[int]
    subject_index: int
    positions: list[int]     # where target tokens are read (empty for KL rows)
    targets: list[int]


def _rows(lm, template: str, prompt: str, subject: str, target: str | None) -> list[_Row]:
    """Rows for ``template.format(prompt)``; with a target, its teacher-forced queries."""
    checked = tg.check_prompt(lm, template.format(prompt))
    # The subject is looked for after the generated prefix (which holds no mask), so it is found
    # even when a mask before the subject was rewritten (RoBERTa's "<mask>").
    s_idx = tg.subject_span(lm, checked, subject, start=template.index("{}"))[1][1] - 1
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


def compute_keys(lm, layer: int, templates, prompt: str, subject: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(k*, k₀): the mean neuron-site activation at the subject's last token over the context
    templates, and the activation there in the bare prompt (one batched forward, stopped at ``layer``)."""
    templates = list(templates)
    rows = [r for t in templates for r in _rows(lm, t, prompt, subject, None)]   # one row each
    if "{}" in templates:
        bare = templates.index("{}")
    else:
        rows, bare = rows + _rows(lm, "{}", prompt, subject, None), len(rows)
    ids, mask, sub = _batch(lm, rows)
    keys = layer_keys(lm, layer, ids, mask)
    at_subject = keys[torch.arange(len(rows), device=keys.device), sub].float()
    return at_subject[:len(templates)].mean(0), at_subject[bare]


def compute_k(lm, layer: int, templates, prompt: str, subject: str) -> torch.Tensor:
    """k*: mean neuron-site activation at the subject's last token over the context templates."""
    return compute_keys(lm, layer, templates, prompt, subject)[0]


def _logits_fn(lm, v_loss_layer):
    """Logits from the full model, or from the residual stream after ``v_loss_layer`` (final norm +
    unembedding), as ROME's ``v_loss_layer`` asks."""
    if v_loss_layer == lm.arch.n_layers - 1:
        return None
    return lambda hidden: lm.arch.unembed(lm.arch.final_norm(hidden))


def compute_v(lm, hp, templates, prompt: str, subject: str, target_new: str,
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


def rank_one_update(k_star: torch.Tensor, v_star: torch.Tensor, mom2, *, k_ref: torch.Tensor,
                    v_ref: torch.Tensor):
    """(u, Λ) with Ŵ_slots = W_slots + u Λᵀ: u = C⁻¹k* (k* when ``mom2`` is None),
    Λ = (v* − v_ref) / (uᵀ k_ref), so that Ŵ maps k_ref to v* (float64 math).

    ROME's code: (k_ref, v_ref) = (k₀, v₀); the formula: (k*, W k*)."""
    k = k_star.double()
    u = k.clone() if mom2 is None else mom2.solve(k)
    lam = (v_star.double() - v_ref.double()) / torch.dot(u, k_ref.double().to(u.device))
    if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(lam).all())):
        # NaN statistics, a singular C or NaN activations: refuse rather than write NaN weights
        raise ValueError("the ROME update is not finite (NaN/inf in the key statistics C, in k* or in "
                         "v*); no weight was changed. Recompute the statistics (layer_stats(..., "
                         "recompute=True)) or check the model's weights")
    return u, lam
