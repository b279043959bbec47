"""One teacher-forced scorer: log-probabilities of (prompt, target) pairs in batched forwards.

    scores = score_targets(lm, [("The capital of France is", "Paris"), ...])
    scores[0].logp, scores[0].accuracy, scores[0].argmax
    score_targets(lm, pairs, neurons=[(5, 17)], factor=0.0)   # with those neurons suppressed

Every caller that reads a model's prediction goes through :func:`read_queries`: ``predict``,
``target_log_probs``, the edit evaluation (:mod:`kn_utils.evaluation`), BLiMP accuracy
(:func:`kn_utils.blimp_tasks.pair_scores`) and Dai et al.'s intervention measurements
(:func:`kn_utils.editing.kn.measure_intervention`).

How a batch is built:

* a query is (input ids, read position, scored token id) (:class:`kn_utils.targets.Query`);
  queries on the same input share one forward (a causal multi-token target is one input), and
  several tokens scored at one read position share its logits;
* inputs are sorted by length and right padded, so every real token keeps its position;
* the vocabulary projection runs only at the read positions (:func:`kn_utils.engine.read_logits`).

With ``neurons``, their activations are multiplied by ``factor`` at the read position of each row
(``scale_at="read"``, Dai et al.'s intervention), at each row's last real token (``"last"``) or
everywhere (``"all"``).  At the read position, a teacher-forced multi-token target must not see
the neurons scaled at its *other* tokens' positions, so each read position then gets its own row.
"""
from __future__ import annotations

import math
import numbers
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .checks import as_pair
from .engine import read_logits
from .hooks import neurons_by_layer, scale_neurons
from .targets import Query, Target, pad_batch, prepare, prompt_ids, read_position

SCALE_AT = ("read", "last", "all")


@dataclass(frozen=True)
class Score:
    """One target's teacher-forced result: per-token log-probabilities and argmax tokens."""

    target_ids: tuple[int, ...]
    log_probs: tuple[float, ...]
    argmax: tuple[int, ...]

    @property
    def logp(self) -> float:
        """log P(target | prompt): the sum over the target's tokens."""
        return float(sum(self.log_probs))

    @property
    def probability(self) -> float:
        return math.exp(self.logp)

    @property
    def accuracy(self) -> float:
        """Fraction of the target's tokens that are the argmax given the earlier ones (the paper
        code's ``test_prediction_acc``)."""
        return sum(a == t for a, t in zip(self.argmax, self.target_ids)) / len(self.target_ids)


def check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _scaling(lm, neurons, factor, scale_at):
    if scale_at not in SCALE_AT:
        raise ValueError(f"scale_at must be one of {SCALE_AT}, got {scale_at!r}")
    if neurons is None:
        return None
    neurons_by_layer(lm, neurons)   # bad neurons fail before the first forward
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor):
        raise ValueError(f"factor must be a finite number, got {factor!r}")
    return scale_at


def _batch_logits(lm, ids, mask, rows, positions) -> torch.Tensor:
    """float32 logits [n_reads, vocab] of a padded batch at the pairs (rows[i], positions[i])."""
    return read_logits(lm, rows, positions, input_ids=ids, attention_mask=mask).float()


def logits_at(lm, sequences, positions, *, batch_size: int = 32) -> torch.Tensor:
    """Logits [n, vocab] of each sequence at its read position (batched, right padded, no grad)."""
    check_batch_size(batch_size)
    out = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            seqs = sequences[start:start + batch_size]
            ids, mask = pad_batch(lm, seqs)
            out.append(_batch_logits(lm, ids, mask, list(range(len(seqs))),
                                     list(positions[start:start + batch_size])))
    return torch.cat(out)


def read_queries(lm, queries: Sequence[Query], *, neurons=None, factor: float = 0.0,
                 scale_at: str = "read", batch_size: int = 32,
                 progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query: (log-probability of its token [n] float64, argmax token at its read
    position [n] long), both on the CPU, in batched forwards without gradients.

    ``neurons`` / ``factor`` / ``scale_at``: see the module docstring.
    """
    check_batch_size(batch_size)
    mode = _scaling(lm, neurons, factor, scale_at)
    per_read = mode == "read"
    # forward input -> {read position: [query index]}
    inputs: dict[tuple, dict[int, list[int]]] = {}
    for i, q in enumerate(queries):
        key = (tuple(q.input_ids), q.position if per_read else -1)
        inputs.setdefault(key, {}).setdefault(q.position, []).append(i)
    order = sorted(inputs, key=lambda k: len(k[0]))  # similar lengths together: less padding
    logp = torch.zeros(len(queries), dtype=torch.float64)
    argmax = torch.zeros(len(queries), dtype=torch.long)
    token = torch.tensor([q.target_id for q in queries], dtype=torch.long)
    with torch.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc="scoring", disable=not progress,
                          leave=False):
            batch = order[start:start + batch_size]
            ids, mask = pad_batch(lm, [list(k[0]) for k in batch])
            rows, positions, owners = [], [], []
            for b, key in enumerate(batch):
                for pos, members in inputs[key].items():
                    rows.append(b)
                    positions.append(pos)
                    owners.append(members)
            if mode is None:
                scaled = nullcontext()
            elif mode == "read":
                scaled = scale_neurons(lm, neurons, factor,
                                       row_positions=torch.tensor([k[1] for k in batch]))
            elif mode == "last":
                scaled = scale_neurons(lm, neurons, factor, row_positions=mask.sum(1) - 1)
            else:
                scaled = scale_neurons(lm, neurons, factor)
            with scaled:
                lsm = _batch_logits(lm, ids, mask, rows, positions).log_softmax(-1)
            top = lsm.argmax(-1).cpu()
            # which read each query uses, then one gather for all of them
            read_of = torch.tensor([r for r, members in enumerate(owners) for _ in members])
            members = torch.tensor([i for m in owners for i in m])
            picked = lsm[read_of.to(lsm.device), token[members].to(lsm.device)]
            logp[members] = picked.double().cpu()
            argmax[members] = top[read_of]
    return logp, argmax


def _as_targets(lm, items) -> list[Target]:
    """(prompt, target) pairs or prepared :class:`~kn_utils.targets.Target` objects."""
    single_pair = isinstance(items, tuple) and len(items) == 2 and all(isinstance(x, str) for x in items)
    if isinstance(items, (str, Target)) or single_pair:
        raise ValueError("pass a list of (prompt, target) pairs or prepared targets, not a single one")
    out = []
    for item in items:
        if isinstance(item, Target):
            out.append(item)
            continue
        prompt, target = as_pair(item, "an item", "prompt", "target")
        out.append(prepare(lm, prompt, target))
    return out


def score_targets(lm, items: Iterable, *, neurons=None, factor: float = 0.0, scale_at: str = "read",
                  batch_size: int = 32, progress: bool = False) -> list[Score]:
    """Teacher-forced :class:`Score` of each (prompt, target) pair or prepared target."""
    specs = _as_targets(lm, items)
    queries = [q for spec in specs for q in spec.queries]
    logp, argmax = read_queries(lm, queries, neurons=neurons, factor=factor, scale_at=scale_at,
                                batch_size=batch_size, progress=progress)
    out, j = [], 0
    for spec in specs:
        k = len(spec.queries)
        out.append(Score(spec.target_ids, tuple(logp[j:j + k].tolist()), tuple(argmax[j:j + k].tolist())))
        j += k
    return out


# --------------------------------------------------------------------------------------------------
# single prompts
# --------------------------------------------------------------------------------------------------
def predict(lm, prompt: str, top_k: int = 5) -> list[tuple[str, float]]:
    """Top-k next tokens (masked LM: tokens for the mask) with probabilities, best first.

    ``top_k``: 1 .. the vocabulary size."""
    import numpy as np

    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    ids = prompt_ids(lm, prompt)
    probs = logits_at(lm, [ids], [read_position(lm, ids)])[0].softmax(-1)
    if top_k > probs.shape[-1]:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary of {probs.shape[-1]} tokens")
    top = probs.topk(int(top_k))
    return [(lm.tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]


def target_log_probs(lm, prompt: str, target) -> torch.Tensor:
    """Log-probability of each target token, teacher forced: tensor [n_target_tokens] (float32)."""
    spec = prepare(lm, prompt, target)
    return torch.tensor(score_targets(lm, [spec])[0].log_probs, dtype=torch.float32)


def target_probability(lm, prompt: str, target) -> float:
    """P(target | prompt); multi-token targets: the product over their teacher-forced tokens."""
    return float(target_log_probs(lm, prompt, target).sum().exp())


__all__ = ["SCALE_AT", "Score", "logits_at", "predict", "read_queries", "score_targets", "target_log_probs",
           "target_probability"]
