"""ROME's vectors: k* (the key), v* (the value, by Adam on δ) and the rank-one algebra.

The update (REFERENCE.md §4), with u = C⁻¹k* (k* when C is off):

* ``update="rome_code"`` (ROME's code, the paper's Table 1):  ΔW = u (v* − v₀)ᵀ / (uᵀk₀), k₀ / v₀ the
  key and MLP output at the subject's last token of the bare prompt: Ŵ k₀ = v*;
* ``update="formula"``:  ΔW = u (v* − W k*)ᵀ / (uᵀk*):  Ŵ k* = v*.

(W k includes the projection's bias where it has one: the right vector is what the *output* lacks.)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ... import targets as tg
from ...engine import accepts, cache_args, prefix_cache, read_logits
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


class _Batch:
    """The rows of v*'s optimisation laid out for the forwards of the Adam steps.

    ``suffix=False``: right-padded rows, every position run at every step.  ``suffix=True`` (causal
    LMs): δ is added at each row's subject end, so nothing before the earliest subject end changes
    between steps; rows are left-padded (explicit position ids keep every token's position), the
    positions before that point run once into a KV cache, and each step runs only the rest.
    ``sub`` / ``read_pos`` are indices into the positions a step runs.
    """

    def __init__(self, lm, rows, read_rows, read_pos, suffix: bool):
        self.lm, self.suffix = lm, suffix
        dev = lm.device
        if not suffix:
            self.ids, self.mask = tg.pad_batch(lm, [r.ids for r in rows])
            self.sub = torch.as_tensor([r.subject_index for r in rows], device=dev)
            self.read_pos, self.past, self.start, self.positions = read_pos, None, 0, None
            self.end = self.ids.shape[1]
            return
        self.ids, self.mask = tg.pad_batch(lm, [r.ids for r in rows], left=True)
        width = self.ids.shape[1]
        pads = [width - len(r.ids) for r in rows]
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        shift = torch.as_tensor(pads, device=dev)
        self.start = int(min(r.subject_index + n for r, n in zip(rows, pads)))
        self.sub = torch.as_tensor([r.subject_index for r in rows], device=dev) + shift - self.start
        self.read_pos = read_pos + shift[read_rows] - self.start
        # rows end together; the last tokens (the target's last) are inputs no read position sees
        self.end = int(max(int((read_pos + shift[read_rows]).max()), int((self.sub + self.start).max())) + 1)
        self.past = None
        if self.start > 0:
            self.past = prefix_cache(lm, self.ids[:, :self.start], attention_mask=self.mask[:, :self.start],
                                     position_ids=self.positions[:, :self.start])

    def forward_kwargs(self) -> dict:
        if not self.suffix:
            return {"input_ids": self.ids, "attention_mask": self.mask}
        mask = self.mask[:, :self.end]
        kwargs = {"input_ids": self.ids[:, self.start:self.end], "attention_mask": mask,
                  "position_ids": self.positions[:, self.start:self.end]}
        if self.past is not None:   # a forward appends to the cache it is given: each step a copy
            kwargs.update(cache_args(self.lm, copy.deepcopy(self.past), mask))
        else:
            kwargs["use_cache"] = False
        return kwargs


def suffix_supported(lm) -> bool:
    """Whether v*'s steps can run only the positions from the first subject end on (a causal LM
    whose forward takes position ids, so that left padding keeps every token's position)."""
    return not lm.arch.is_masked_lm and accepts(lm.model, "position_ids")


def compute_v(lm, hp, templates, prompt: str, subject: str, target_new: str,
              progress: bool = False, suffix: bool | None = None):
    """(v*, v_init, info): the MLP output at the subject's last token that makes ``target_new`` likely.

    ``suffix`` (None: whenever :func:`suffix_supported`): run each Adam step only over the positions
    that δ changes, the rest once into a KV cache (:class:`_Batch`); ``False`` runs every position at
    every step (the plain loop the fast one is tested against)."""
    layer = hp.layer
    rew = [r for t in templates for r in _rows(lm, t, prompt, subject, target_new)]
    kl_rows = _rows(lm, "{}", KL_PROMPT.format(subject), subject, None) if not lm.arch.is_masked_lm else []
    rows = rew + kl_rows
    n_rew = len(rew)
    dev = lm.device
    r_idx = torch.as_tensor([i for i, r in enumerate(rew) for _ in r.positions], device=dev, dtype=torch.long)
    p_idx = torch.as_tensor([p for r in rew for p in r.positions], device=dev, dtype=torch.long)
    t_idx = torch.as_tensor([t for r in rew for t in r.targets], device=dev, dtype=torch.long)
    # target tokens per template: one row with them all (decoders) or one row each (masked LMs)
    n_tok = len(t_idx) // len(templates)
    sub_abs = torch.as_tensor([r.subject_index for r in rows], device=dev)
    # the logits are read at the target positions, then at the KL rows' subject ends: only there
    read_rows = torch.cat([r_idx, torch.arange(n_rew, len(rows), device=dev)])
    read_abs = torch.cat([p_idx, sub_abs[n_rew:]])
    if suffix is None:
        suffix = suffix_supported(lm)
    elif suffix and not suffix_supported(lm):
        raise ValueError(f"suffix=True needs a causal LM whose forward takes position_ids ({lm.name})")
    batch = _Batch(lm, rows, read_rows, read_abs, suffix)
    sub, read_pos = batch.sub, batch.read_pos
    at_subject = torch.zeros(len(rows), batch.end - batch.start, 1, device=dev)
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
    n_scored = len(r_idx)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_init = None
    info = {"steps": 0, "nll": [], "p_target": [], "suffix": bool(suffix),
            "positions_per_step": int(batch.end - batch.start)}
    bar = tqdm(range(hp.v_num_grad_steps), desc="ROME v*", disable=not progress, leave=False)
    for step in bar:
        with modify(lm, "mlp_proj", fns["mlp_proj"]):
            if project is not None:
                with modify(lm, "hidden", {hp.v_loss_layer: lambda v: loss_hidden.__setitem__("h", v)}):
                    lm.model(**batch.forward_kwargs())
                logits = project(loss_hidden.pop("h")[read_rows, read_pos])
            else:
                logits = read_logits(lm, read_rows, read_pos, **batch.forward_kwargs())
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
