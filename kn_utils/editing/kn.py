"""Knowledge-neuron interventions (Dai et al.): suppress / enhance, fact update, erasure.

    df = measure_intervention(lm, prompts, ["these", "this", "the"], [(9, 1094)], mode="suppress")
    intervention_summary(df)          # per token: pre_mean, post_mean, rel_change, t, p, n
    with kn_edit(lm, neurons, "Paris", "Rome"): ...      # value slots moved; restored on exit
    edit = kn_erase(lm, neurons); ...; edit.restore()

Activations are changed through forward pre-hooks (removed in ``finally``); weights through
:class:`~kn_utils.editing.base.WeightEdit`, which restores them bit-exactly.
"""
from __future__ import annotations

import math

import pandas as pd
import torch
from scipy import stats

from ..hooks import intervene, neurons_by_layer
from ..scoring import read_queries
from ..targets import MASK_PLACEHOLDER, Query, prepare, prompt_ids, read_position
from .base import WeightEdit

__all__ = ["measure_intervention", "intervention_summary", "intervene", "kn_edit", "kn_erase",
           "KNEdit", "first_token_id"]


def first_token_id(lm, target: str, prompt: str | None = None) -> int:
    """Id of the first token of ``target`` as the model produces it after ``prompt``.

    Without a prompt, after a neutral context ("Answer:" / a lone mask) so that causal BPE models get
    the leading-space form (" Paris"), exactly as :func:`kn_utils.targets.prepare` tokenises targets.
    """
    if prompt is None:
        prompt = f"{MASK_PLACEHOLDER} ." if lm.arch.is_masked_lm else "Answer:"
    return prepare(lm, prompt, target).target_ids[0]


def _positions_spec(positions):
    if positions in ("target", -1, None):
        return positions
    raise ValueError(f"positions must be 'target' (the read position), -1 (each prompt's last "
                     f"token) or None (every position), got {positions!r}")


def measure_intervention(lm, prompts, tokens, neurons, *, mode: str = "suppress", factor: float = 2.0,
                         positions="target", batch_size: int = 32,
                         progress: bool = False) -> pd.DataFrame:
    """Probability of each candidate token before and after suppressing / enhancing ``neurons``.

    ``prompts``: list of prompts (masked LM: with one mask; causal: the text before the candidate).
    ``tokens``: candidate strings; each is scored by its first token as the next token / mask
    filler (leading-space-correct, via :func:`kn_utils.targets.prepare`).  ``mode="suppress"`` sets
    the activations to 0, ``"enhance"`` multiplies them by ``factor``.  ``positions``: ``"target"``
    (the read position, Dai et al.), ``-1`` (each prompt's last real token) or None (all).
    Returns a DataFrame with one row per (prompt, token): prompt, token, token_id, pre, post.
    """
    if isinstance(prompts, str) or isinstance(tokens, str):
        raise ValueError("prompts and tokens must be lists of strings (not a single string)")
    prompts, tokens = list(prompts), list(tokens)
    if not prompts:
        raise ValueError("no prompts: pass a non-empty list")
    if not tokens:
        raise ValueError("no tokens: pass a non-empty list of candidate strings")
    if mode not in ("suppress", "enhance"):
        raise ValueError(f"unknown mode={mode!r}; choose 'suppress' or 'enhance'")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    positions = _positions_spec(positions)
    neurons_by_layer(lm, neurons)
    scale = 0.0 if mode == "suppress" else float(factor)
    scale_at = {"target": "read", -1: "last", None: "all"}[positions]

    # one query per (prompt, candidate): the candidate's first token at the prompt's read position
    queries = []
    for p in prompts:
        ids = tuple(prompt_ids(lm, p))
        read = read_position(lm, ids)
        queries += [Query(ids, read, first_token_id(lm, t, p)) for t in tokens]
    pre, _ = read_queries(lm, queries, batch_size=batch_size, progress=progress)
    post, _ = read_queries(lm, queries, neurons=neurons, factor=scale, scale_at=scale_at,
                           batch_size=batch_size, progress=progress)
    pre, post = pre.exp().tolist(), post.exp().tolist()
    rows = [(prompt, token, queries[k].target_id, pre[k], post[k])
            for k, (prompt, token) in enumerate((p, t) for p in prompts for t in tokens)]
    return pd.DataFrame(rows, columns=["prompt", "token", "token_id", "pre", "post"])


def intervention_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per token: pre_mean, post_mean, rel_change, t, p, n (tokens in order of first appearance).

    rel_change = (post_mean − pre_mean) / min(post_mean, pre_mean) (the paper's Fig 3); t and p
    from a two-sample t-test of the pre against the post probabilities (scipy ``ttest_ind``).
    """
    missing = {"token", "pre", "post"} - set(df.columns)
    if missing:
        raise ValueError(f"intervention_summary needs columns token, pre, post; missing {sorted(missing)}")
    out = []
    for token, group in df.groupby("token", sort=False):
        pre, post = group["pre"].to_numpy(float), group["post"].to_numpy(float)
        pre_mean, post_mean = pre.mean(), post.mean()
        denom = min(pre_mean, post_mean)
        rel = (post_mean - pre_mean) / denom if denom > 0 else float("nan")
        if len(pre) > 1:
            test = stats.ttest_ind(pre, post)
            t, p = float(test.statistic), float(test.pvalue)
        else:
            t = p = float("nan")
        out.append((token, pre_mean, post_mean, rel, t, p, len(pre)))
    return pd.DataFrame(out, columns=["token", "pre_mean", "post_mean", "rel_change", "t", "p", "n"])


class KNEdit(WeightEdit):
    """Dai et al.'s edit of knowledge-neuron value slots (rows of ``lm.arch.value_slots(layer)``).

    slot_i ← slot_i − λ1·e(t_old) + λ2·e(t_new); with ``erase`` the slots are set to zero.
    """

    def __init__(self, lm, neurons, *, target_old: str | None = None, target_new: str | None = None,
                 lambda1: float = 1.0, lambda2: float = 8.0, erase: bool = False,
                 prompt: str | None = None):
        self.by_layer = neurons_by_layer(lm, neurons)
        self.neurons = sorted((layer, n) for layer, units in self.by_layer.items() for n in units)
        self.erase = erase
        for name, value in (("lambda1", lambda1), ("lambda2", lambda2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        self.lambda1, self.lambda2 = float(lambda1), float(lambda2)
        self.target_old, self.target_new = target_old, target_new
        desc = (f"erase {len(self.neurons)} neurons" if erase else
                f"{target_old!r} -> {target_new!r} on {len(self.neurons)} neurons")
        super().__init__(lm, desc)
        self._delta = None
        if not erase:
            emb = lm.arch.embed.weight
            if emb.shape[1] != lm.arch.d_model:
                raise ValueError(f"input embeddings have width {emb.shape[1]} but value slots "
                                 f"{lm.arch.d_model}: the KN edit needs them equal")
            old = first_token_id(lm, target_old, prompt)
            new = first_token_id(lm, target_new, prompt)
            self.token_ids = (old, new)
            with torch.no_grad():
                e_old, e_new = emb[old].detach().clone(), emb[new].detach().clone()
                self._delta = (self.lambda2 * e_new.double() - self.lambda1 * e_old.double())

    def _apply(self) -> None:
        for layer, units in self.by_layer.items():
            param = self.lm.arch.mlp_out[layer].weight
            self._save(param)
            slots = self.lm.arch.value_slots(layer)  # a view of ``param``
            idx = torch.as_tensor(units, device=slots.device)
            if self.erase:
                slots[idx] = 0
            else:
                delta = self._delta.to(slots.device)
                slots[idx] = (slots[idx].double() + delta).to(slots.dtype)


def kn_edit(lm, neurons, target_old: str, target_new: str, *, lambda1: float = 1.0,
            lambda2: float = 8.0, prompt: str | None = None) -> KNEdit:
    """Dai et al.'s fact update, applied on creation: each neuron's value slot
    ← slot − λ1·e(target_old) + λ2·e(target_new), e = input embedding of the target's first token
    (as produced after ``prompt``, or leading-space-correct without one).  ``.restore()`` undoes it
    exactly; also usable as ``with kn_edit(...):``.
    """
    for name, value in (("target_old", target_old), ("target_new", target_new)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"empty {name}: must be a non-empty string, got {value!r}")
    return KNEdit(lm, neurons, target_old=target_old, target_new=target_new, lambda1=lambda1,
                  lambda2=lambda2, prompt=prompt).apply()


def kn_erase(lm, neurons) -> KNEdit:
    """Zero the value slots of ``neurons`` (Dai et al.'s knowledge erasure); ``.restore()`` undoes it."""
    return KNEdit(lm, neurons, erase=True).apply()
