"""Prompts and targets → token ids and the positions where the target is read.

* Masked LMs read the target at the one mask token ("[MASK]" in a prompt is accepted for any masked
  LM and rewritten to that tokenizer's own mask token, e.g. RoBERTa's ``<mask>``).
* Causal LMs read it at the last prompt position.  Trailing whitespace of the prompt moves to the
  target, so "The capital of France is" + "Paris" is read as the token " Paris", exactly as the model
  would produce it; no BOS or other special token ever becomes part of a target.
* Trailing whitespace of a target is dropped ("Paris " and "Paris\n" are scored as "Paris"): a
  model reads a target's trailing space as a token of its own, which no caller means to score.
* An input longer than the model's context (``lm.arch.max_positions``) is a ValueError here, where
  every prompt is tokenised, instead of an IndexError deep in the model or a silent run past it.
* Multi-token targets are teacher forced: query j sees the gold tokens 0..j-1 and is scored on token j.
  For causal LMs all queries share one input (one forward); for masked LMs the target gets one mask
  per token and earlier masks are filled in with the gold tokens.
"""
from __future__ import annotations

import unicodedata

from dataclasses import dataclass

import torch


MASK_PLACEHOLDER = "[MASK]"


@dataclass(frozen=True)
class Query:
    """One forward input, the position read, and the token id scored there."""

    input_ids: tuple[int, ...]
    position: int
    target_id: int


@dataclass(frozen=True)
class Target:
    prompt: str
    target: str
    target_ids: tuple[int, ...]
    queries: tuple[Query, ...]

    def groups(self) -> list[tuple[tuple[int, ...], list[int], list[int]]]:
        """Queries sharing one input: [(input_ids, positions, target_ids)] (causal LMs: one group)."""
        out: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}
        for q in self.queries:
            pos, tgt = out.setdefault(q.input_ids, ([], []))
            pos.append(q.position)
            tgt.append(q.target_id)
        return [(ids, pos, tgt) for ids, (pos, tgt) in out.items()]


def _encode(lm, text: str) -> list[int]:
    return list(lm.tokenizer(text, add_special_tokens=True)["input_ids"])


def _special_ids(lm) -> set[int]:
    return set(getattr(lm.tokenizer, "all_special_ids", []) or [])


def check_length(lm, n_tokens: int, text: str) -> None:
    """Raise if an input of ``n_tokens`` tokens (made from ``text``) exceeds the model's context."""
    limit = lm.arch.max_positions
    if limit is not None and n_tokens > limit:
        shown = text if len(text) <= 80 else text[:60] + "..." + text[-15:]
        raise ValueError(f"input of {n_tokens} tokens is longer than {lm.name}'s context of {limit} "
                         f"tokens (max_positions): shorten the prompt {shown!r}")


def _check_prompt_length(lm, prompt: str) -> None:
    limit = lm.arch.max_positions
    # Tokens never outnumber UTF-8 bytes (+ a few special tokens): short prompts skip the encode.
    if limit is not None and len(prompt.encode("utf-8")) + 8 > limit:
        check_length(lm, len(_encode(lm, prompt)), prompt)


def check_prompt(lm, prompt) -> str:
    """Validate a prompt; return it in the form the model reads (mask rewritten, whitespace moved)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"empty prompt: a prompt must be a non-empty string, got {prompt!r}")
    if lm.arch.is_masked_lm:
        mask = lm.tokenizer.mask_token
        if mask is None:
            raise ValueError(f"{lm.name}: masked LM without a mask token")
        if mask != MASK_PLACEHOLDER:
            prompt = prompt.replace(MASK_PLACEHOLDER, mask)
        n = _encode(lm, prompt).count(lm.tokenizer.mask_token_id)
        if n != 1:
            raise ValueError(
                f"a masked-LM prompt needs exactly one mask token ({mask!r}), found {n} in {prompt!r}")
        _check_prompt_length(lm, prompt)
        return prompt
    if MASK_PLACEHOLDER in prompt:
        raise ValueError(f"{MASK_PLACEHOLDER!r} in a prompt for the causal LM {lm.name}: a causal "
                         f"prompt ends where the target begins (cut the prompt at the mask)")
    prompt = prompt.rstrip()
    _check_prompt_length(lm, prompt)
    return prompt


def read_position(lm, input_ids) -> int:
    """Index of the position whose prediction is read: the mask (masked LM) or the last token."""
    ids = list(input_ids)
    if lm.arch.is_masked_lm:
        return ids.index(lm.tokenizer.mask_token_id)
    return len(ids) - 1


def prompt_ids(lm, prompt: str) -> list[int]:
    """Token ids of a validated prompt, special tokens included."""
    return _encode(lm, check_prompt(lm, prompt))


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prepare(lm, prompt: str, target: str) -> Target:
    """Tokenise ``target`` as the model would produce it after ``prompt`` and build teacher-forced queries.

    Trailing whitespace of ``target`` is stripped ("Paris " is "Paris"); a leading space is kept
    and, for causal LMs, added where missing (the prompt's trailing whitespace moves to it).
    ``Target.target`` is the stripped form.  A :class:`Target` already prepared for ``prompt`` is
    returned as it is, so callers can prepare once and pass the result down.
    """
    if isinstance(target, Target):
        if prompt != target.prompt and check_prompt(lm, prompt) != target.prompt:
            raise ValueError(f"the prepared target was made for the prompt {target.prompt!r}, "
                             f"not {prompt!r}")
        return target
    prompt = check_prompt(lm, prompt)
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"empty target: the target must be a non-empty string, got {target!r}")
    target = target.rstrip()
    p_ids = _encode(lm, prompt)
    if lm.arch.is_masked_lm:
        spec = _prepare_masked(lm, prompt, target, p_ids)
    else:
        spec = _prepare_causal(lm, prompt, target, p_ids)
    check_length(lm, max(len(q.input_ids) for q in spec.queries), prompt + " " + target)
    return spec


def _no_target(target, prompt):
    return ValueError(f"target {target!r} tokenises to nothing after {prompt!r}")


def _prepare_causal(lm, prompt, target, p_ids):
    special = _special_ids(lm)
    # Tokenizers that append a special token (EOS) would put it after the target too: drop it.
    n_tail = 0
    while n_tail < len(p_ids) and p_ids[len(p_ids) - 1 - n_tail] in special and len(p_ids) - n_tail > 1:
        n_tail += 1
    body = p_ids[:len(p_ids) - n_tail]
    text = target if target[:1].isspace() else " " + target
    full = _encode(lm, prompt + text)
    full = full[:len(full) - n_tail]
    if _common_prefix(body, full) == len(body):
        t_ids = full[len(body):]
    else:  # the boundary merged into one token: fall back to the target on its own
        t_ids = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    t_ids = [t for t in t_ids if t not in special]
    if not t_ids:
        raise _no_target(target, prompt)
    ids = tuple(body + t_ids[:-1])
    queries = tuple(Query(ids, len(body) - 1 + j, t) for j, t in enumerate(t_ids))
    return Target(prompt, target, tuple(t_ids), queries)


def _prepare_masked(lm, prompt, target, p_ids):
    mask_id = lm.tokenizer.mask_token_id
    m = p_ids.index(mask_id)
    full = _encode(lm, prompt.replace(lm.tokenizer.mask_token, target.strip(), 1))
    # The target's tokens are what differs between the prompt and the filled-in sentence.  Taking
    # prefix and suffix from the filled-in tokenisation keeps a space the mask token would otherwise
    # leave as a token of its own (byte-level tokenizers) attached to the target, as in real text.
    c = min(_common_prefix(p_ids, full), m)
    s = min(_common_prefix(p_ids[::-1], full[::-1]), len(p_ids) - m - 1, len(full) - c)
    prefix, suffix, t_ids = full[:c], full[len(full) - s:], full[c:len(full) - s]
    t_ids = [t for t in t_ids if t not in _special_ids(lm)]
    if not t_ids:
        raise _no_target(target, prompt)
    k = len(t_ids)
    queries = tuple(
        Query(tuple(prefix + t_ids[:j] + [mask_id] * (k - j) + suffix), c + j, t)
        for j, t in enumerate(t_ids))
    return Target(prompt, target, tuple(t_ids), queries)


def pad_batch(lm, sequences, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token sequences: (input_ids, attention_mask) on the model's device.

    Right padding keeps every real token at its own position, so causal models need no position
    fix-ups and the read position of each row is unchanged.  ``left=True`` pads on the left, so the
    rows end together (the caller then passes position ids, e.g. ``mask.cumsum(-1) - 1``).
    """
    pad = lm.tokenizer.pad_token_id
    if pad is None:
        pad = lm.tokenizer.eos_token_id or 0
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.as_tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(lm.device), mask.to(lm.device)


def subject_span(lm, prompt: str, subject: str, *, start: int | None = None
                 ) -> tuple[list[int], tuple[int, int]]:
    """(prompt token ids, [start, end) token span of ``subject``'s first whole-word occurrence in the
    prompt, see :func:`find_subject`).

    The span comes from character offsets, so a token that carries the subject's leading space
    (" Eiffel") belongs to the subject.  ``start``: look for the subject from this character on
    (ROME's generated prefixes come before it).  The prompt is read as the model reads it
    (:func:`check_prompt`).
    """
    prompt = check_prompt(lm, prompt)
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f"empty subject: give the subject string, got {subject!r}")
    subject = subject.strip()
    begin = find_subject(prompt, subject, start or 0)
    end = begin + len(subject)
    ids, offsets = _offsets(lm, prompt)
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and b > begin and a < end]
    if not inside:
        raise ValueError(f"subject {subject!r} covers no token of {prompt!r}")
    return ids, (inside[0], inside[-1] + 1)


def _wordlike(char: str) -> bool:
    # letters of scripts written without spaces (CJK, Thai, ...) do not join words
    if not (char.isalnum() or char == "_"):
        return False
    return not ("\u0e00" <= char <= "\u0eff" or "\u1000" <= char <= "\u109f" or "\u1780" <= char <= "\u17ff"
                or unicodedata.east_asian_width(char) in ("W", "F"))


def find_subject(prompt: str, subject: str, start: int = 0) -> int:
    """Where ``subject`` first occurs in ``prompt`` (from character ``start``) as a whole word: not
    preceded or followed by a letter or digit it would join ("Iran" in "Iran's", not in "Iranian").
    ValueError when it does not occur, or occurs only inside longer words (which one is named)."""
    pos = first = prompt.find(subject, start)
    while pos >= 0:
        end = pos + len(subject)
        joins_left = pos > 0 and _wordlike(prompt[pos - 1]) and _wordlike(subject[0])
        joins_right = end < len(prompt) and _wordlike(prompt[end]) and _wordlike(subject[-1])
        if not joins_left and not joins_right:
            return pos
        pos = prompt.find(subject, pos + 1)
    if first < 0:
        raise ValueError(f"subject {subject!r} not found in prompt {prompt!r}")
    left = first
    while left > 0 and _wordlike(prompt[left - 1]):
        left -= 1
    right = first + len(subject)
    while right < len(prompt) and _wordlike(prompt[right]):
        right += 1
    raise ValueError(f"subject {subject!r} occurs in prompt {prompt!r} only inside a longer word "
                     f"({prompt[left:right]!r}): give the whole word as the subject")


def _offsets(lm, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (special tokens included) and each token's character span."""
    tok = lm.tokenizer
    try:
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        ids = list(tok(text, add_special_tokens=True)["input_ids"])
    # slow tokenizer: rebuild offsets from the decoded pieces
    special = set(getattr(tok, "all_special_ids", []) or [])
    offsets, pos = [], 0
    for i in ids:
        piece = "" if i in special else tok.decode([i]).strip()
        found = text.find(piece, pos) if piece else -1
        if found < 0:
            offsets.append((0, 0))
        else:
            offsets.append((found, found + len(piece)))
            pos = found + len(piece)
    return ids, offsets
