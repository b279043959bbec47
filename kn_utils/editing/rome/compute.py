"""ROME's vectors: k* (the key), v* (the value, by Adam on δ) and the rank-one algebra.

The update (REFERENCE.md §4), with u = C⁻¹k* (k* when C is off):

* ``update="rome_code"`` (ROME's code, the paper's Table 1):  ΔW = u (v* − v₀)ᵀ / (uᵀk₀), k₀ / v₀ the
  key and MLP output at the subject's last token of the bare prompt: Ŵ k₀ = v*;
* ``update="formula"``:  ΔW = u (v* − W k*)ᵀ / (uᵀk*):  Ŵ k* = v*.

(W k includes the projection's bias where it has one: the right vector is what the *output* lacks.)
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ... import targets as tg
from ...engine import accepts, cache_args, keep_block_output, prefix_cache, read_logits, replay_blocks
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

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Only the rows ``keep`` from now on (their prefix KV cache too): a request that stopped
        takes no further step, so its rows need no forward."""
        self.ids, self.mask, self.sub = self.ids[keep], self.mask[keep], self.sub[keep]
        if self.positions is not None:
            self.positions = self.positions[keep]
        if self.past is not None:
            self.past.batch_select_indices(keep)

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
              progress: bool = False, suffix: bool | None = None, from_layer: bool | None = None):
    """(v*, v_init, info): the MLP output at the subject's last token that makes ``target_new`` likely.

    ``suffix`` (None: whenever :func:`suffix_supported`): run each Adam step only over the positions
    that δ changes, the rest once into a KV cache (:class:`_Batch`); ``False`` runs every position at
    every step (the plain loop the fast one is tested against).  ``from_layer`` (None: on): the
    steps after the first start at the edited layer, replaying the first step's input to it
    (:func:`kn_utils.engine.replay_blocks`); ``False`` runs every block at every step."""
    return compute_values(lm, hp, templates, [(prompt, subject, target_new)], progress=progress,
                          suffix=suffix, from_layer=from_layer)[0]


def compute_values(lm, hp, templates, requests, progress: bool = False, suffix: bool | None = None,
                   from_layer: bool | None = None, batch_size: int = 8):
    """:func:`compute_v` of each (prompt, subject, target_new) in ``requests``, up to ``batch_size``
    at a time in one batch: one δ per request, each with its own loss (NLL + KL + weight decay),
    Adam state, norm clamp and early stop, so each v* is what :func:`compute_v` gives alone (up to
    float rounding of the different batch shape).  Returns [(v*, v_init, info), ...]."""
    if hp.v_loss_layer != lm.arch.n_layers - 1:
        # With an early read-out layer the batched optimisation drifts from one-at-a-time (v* off by
        # 8-126 % in tests/test_rome_compute.py, cause not found yet): each request alone, exactly.
        return [_optimise(lm, hp, templates, [r], progress, suffix, from_layer)[0] for r in requests]
    out = []
    for first in range(0, len(requests), batch_size):
        out += _optimise(lm, hp, templates, list(requests[first:first + batch_size]), progress,
                         suffix, from_layer)
    return out


def _optimise(lm, hp, templates, requests, progress, suffix, from_layer):
    layer, n_req, dev = hp.layer, len(requests), lm.device
    rew = [[r for t in templates for r in _rows(lm, t, p, s, t_new)] for p, s, t_new in requests]
    kl_rows = [] if lm.arch.is_masked_lm else \
        [r for _, s, _ in requests for r in _rows(lm, "{}", KL_PROMPT.format(s), s, None)]
    rows = [r for rs in rew for r in rs] + kl_rows
    n_rew = sum(len(rs) for rs in rew)
    first_row = torch.as_tensor([sum(len(rs) for rs in rew[:i]) for i in range(n_req)], device=dev)
    row_request = torch.as_tensor([i for i, rs in enumerate(rew) for _ in rs]
                                  + list(range(len(kl_rows))), device=dev)
    flat = [r for rs in rew for r in rs]
    r_idx = torch.as_tensor([i for i, r in enumerate(flat) for _ in r.positions], device=dev, dtype=torch.long)
    p_idx = torch.as_tensor([p for r in flat for p in r.positions], device=dev, dtype=torch.long)
    t_idx = torch.as_tensor([t for r in flat for t in r.targets], device=dev, dtype=torch.long)
    # each request's target tokens are a contiguous run of t_idx
    counts = [sum(len(r.targets) for r in rs) for rs in rew]
    # target tokens per template: one row with them all (decoders) or one row each (masked LMs)
    n_tok = [c // len(templates) for c in counts]
    sub_abs = torch.as_tensor([r.subject_index for r in rows], device=dev)
    # the logits are read at the target positions, then at the KL rows' subject ends: only there
    read_rows = torch.cat([r_idx, torch.arange(n_rew, len(rows), device=dev)])
    read_abs = torch.cat([p_idx, sub_abs[n_rew:]])
    if suffix is None:
        suffix = suffix_supported(lm)
    elif suffix and not suffix_supported(lm):
        raise ValueError(f"suffix=True needs a causal LM whose forward takes position_ids ({lm.name})")
    # δ enters at the edited layer: the input of that block is the same at every step
    from_layer = (from_layer is None or from_layer) and layer > 0
    batch = _Batch(lm, rows, read_rows, read_abs, suffix)
    read_pos = batch.read_pos
    at_subject = torch.zeros(len(rows), batch.end - batch.start, 1, device=dev)
    at_subject[torch.arange(len(rows), device=dev), batch.sub] = 1.0

    # one leaf and one Adam per request: a request that stops early takes no further step
    deltas = [torch.zeros(lm.arch.d_model, device=dev, dtype=torch.float32, requires_grad=True)
              for _ in range(n_req)]
    opts = [torch.optim.Adam([d], lr=hp.v_lr) for d in deltas]
    state = {}

    # the closures read at_subject / row_request when called: after rows are dropped, the kept ones
    def edit_output(value):
        if "v_init" not in state:   # the bare prompt, first row of each request
            state["v_init"] = value[first_row, batch.sub[first_row]].detach().float().clone()
        delta = deltas[0] if n_req == 1 else torch.stack(deltas)[row_request][:, None]
        return value + (at_subject * delta).to(value.dtype)

    loss_hidden = {}
    project = _logits_fn(lm, hp.v_loss_layer)
    n_scored = len(r_idx)
    kl_init = None
    infos = [{"steps": 0, "nll": [], "p_target": [], "suffix": bool(suffix), "from_layer": from_layer,
              "positions_per_step": int(batch.end - batch.start), "batch": n_req, "rows_per_step": []}
             for _ in range(n_req)]
    active = list(range(n_req))   # the requests whose rows are in the batch, in order
    replay = None   # the output of block layer - 1, kept from the first step
    bar = tqdm(range(hp.v_num_grad_steps), desc="ROME v*", disable=not progress, leave=False)
    for step in bar:
        with modify(lm, "mlp_proj", {layer: edit_output}), _skip_below(lm, layer, from_layer, replay) as kept:
            if project is not None:
                with modify(lm, "hidden", {hp.v_loss_layer: lambda v: loss_hidden.__setitem__("h", v)}):
                    lm.model(**batch.forward_kwargs())
                logits = project(loss_hidden.pop("h")[read_rows, read_pos])
            else:
                logits = read_logits(lm, read_rows, read_pos, **batch.forward_kwargs())
        if replay is None and kept is not None:
            replay = kept["output"]
        scored = logits[:n_scored].float().log_softmax(-1)
        token_logp = scored[torch.arange(len(t_idx), device=dev), t_idx]
        kl_logp = None
        if kl_rows:
            kl_logp = logits[n_scored:].float().log_softmax(-1)
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
        v_init = state["v_init"]
        losses, stepping, first = [], [], 0
        for j, i in enumerate(active):   # request i: its target tokens and its KL row are the j-th
            # mean over templates of the per-target NLL / n_tok
            nll = -token_logp[first:first + counts[i]].sum() / counts[i]
            first += counts[i]
            loss = nll
            if kl_rows:
                # as ROME's code: KL(current || initial) over the next-token distribution after the subject
                kl = F.kl_div(kl_init[i:i + 1], kl_logp[j:j + 1], log_target=True, reduction="batchmean")
                loss = loss + hp.kl_factor * kl
            loss = loss + hp.v_weight_decay * (deltas[i].norm() / v_init[i].norm() ** 2)
            infos[i]["nll"].append(nll.item())
            infos[i]["p_target"].append(float(torch.exp(-nll.detach() * n_tok[i])))
            infos[i]["rows_per_step"].append(len(row_request))
            # ROME stops below the early-stop loss, and takes no step after the last loss
            if loss.item() >= hp.early_stop_loss and step < hp.v_num_grad_steps - 1:
                losses.append(loss)
                stepping.append(i)
        if not stepping:
            break
        if len(stepping) < len(active):
            # drop the stopped requests' rows (with their cache rows and replayed inputs)
            keep = torch.isin(row_request, torch.as_tensor(stepping, device=dev))
            rows_now = keep.nonzero().squeeze(1)
            new_row = keep.long().cumsum(0) - 1
            read_kept = keep[read_rows]
            read_rows, read_pos = new_row[read_rows[read_kept]], read_pos[read_kept]
            t_idx = t_idx[read_kept[:n_scored]]
            n_scored = len(t_idx)
            row_request, at_subject = row_request[rows_now], at_subject[rows_now]
            batch.keep_rows(rows_now)
            replay = _select_rows(replay, rows_now, len(keep))
        active = stepping
        grads = torch.autograd.grad(sum(losses) if len(losses) > 1 else losses[0],
                                    [deltas[i] for i in active])
        for i, grad in zip(active, grads):
            deltas[i].grad = grad
            opts[i].step()
            opts[i].zero_grad(set_to_none=True)
            infos[i]["steps"] = step + 1
            with torch.no_grad():
                max_norm = hp.clamp_norm_factor * v_init[i].norm()
                if deltas[i].norm() > max_norm:
                    deltas[i].mul_(max_norm / deltas[i].norm())
    bar.close()
    v_init = state["v_init"]
    return [(v_init[i] + deltas[i].detach(), v_init[i], infos[i]) for i in range(n_req)]


def _select_rows(output, rows, n_rows):
    """A kept block output (a tensor or a tuple of them) at batch rows ``rows`` only."""
    if output is None or torch.is_tensor(output):
        return None if output is None else output[rows]
    return tuple(o[rows] if torch.is_tensor(o) and o.dim() and o.shape[0] == n_rows else o for o in output)


@contextmanager
def _skip_below(lm, layer, enabled, replay):
    """Nothing (disabled or layer 0), keep block ``layer`` - 1's output (first step: yields the
    dict it lands in), or replay it in place of blocks 0 .. ``layer`` - 1 (later steps)."""
    if not enabled:
        yield None
    elif replay is None:
        with keep_block_output(lm, layer - 1) as kept:
            yield kept
    else:
        with replay_blocks(lm, layer, replay):
            yield None


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
