"""Edit evaluation on ParaRel: reliability, generality, locality, bijective symmetry, synonymous
invariance (Niu et al., ICLR 2024, §4 and Table 1; REFERENCE.md §4).

    df = evaluate_edits(lm, editor="rome", relation="P36", n=20)   # one row per edited fact
    summarize_edits(df)                                            # Table 1 with the paper's numbers

For item i of the relation the request is (first decoder prompt of the bag, subject, new target
t* = the object of the closest earlier item whose object differs — item i − 1 as in the paper unless
that has the same object, which P101's long runs of "physics" make common; item 0 wraps to the last
evaluated item, so the first ``n`` facts are a closed set).
Each item: measure before, edit, measure, restore.  Every criterion is reported twice:

* ``*_prob``: the paper's probability comparison (new answer more probable than the old one);
* ``*_acc``: the paper code's teacher-forced token accuracy of the new answer (fraction of its
  tokens that are the argmax when the earlier ones are given); the metric of the paper's Table 1,
  so :func:`summarize_edits` shows it first.

Criteria (``_pre`` columns hold the unedited model's value, for reference):

* reliability — the edited prompt: P(t*) > P(t); accuracy of t*.
* generality  — the bag's other prompts (mean over prompts).
* locality    — the first prompt of ``n_locality`` other facts of the relation: P(own object) >
  P(t*) after the edit (``locality_prob``, ROME's neighbourhood success) and the fraction of their
  teacher-forced argmax tokens left unchanged by the edit (``locality_acc``).
* symmetry (P36, P1376) — the reverse question about t*: P36 "t* is the capital of" → S, P1376
  "The capital of t* is" → S; prob: P(S) > P(S′) with S′ the true answer for t* (the subject of the
  item t* came from); acc: token accuracy of S.
* synonym (P101) — "S is a famous" → occupation(t*) vs occupation(t) via ``kn_utils/resources/synonyms.json``;
  items whose fields have no occupation are skipped and counted (``df.attrs["n_skipped"]``).

``known`` flags items whose fact the unedited model knows (greedy decoding gives the object);
items it does not know are kept.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Callable

import pandas as pd
import torch
from tqdm.auto import tqdm

from .scoring import score_targets
from .data import BUILTIN_DIR, source_of
from .data.pararel import Bag, causal_prompts, load_bags
from .editing.base import EditRequest  # noqa: F401  (the one request type; re-exported here)
from .paper import PAPER_TABLE1  # Table 1's numbers live in kn_utils.paper; the old name stays

RELATIONS = ("P36", "P1376", "P101")
EDITORS = ("rome", "kn")
SYNONYMS_FILE = BUILTIN_DIR / "synonyms.json"

# Reverse questions: (causal prompt, masked prompt) with {} = the new target t*.
_REVERSE = {
    "P36": ("{} is the capital of", "{} is the capital of [MASK]."),
    "P1376": ("The capital of {} is", "The capital of {} is [MASK]."),
}
_SYNONYM_PROMPT = ("{} is a famous", "{} is a famous [MASK].")


@lru_cache(maxsize=1)
def synonyms() -> dict[str, str]:
    """Field of work → occupation (``kn_utils/resources/synonyms.json``)."""
    with open(SYNONYMS_FILE, encoding="utf-8") as f:
        return dict(json.load(f)["field_to_occupation"])


# --------------------------------------------------------------------------------------------------
# batched scoring
# --------------------------------------------------------------------------------------------------
def score(lm, pairs: list[tuple[str, str]], batch_size: int = 64):
    """For each (prompt, target): (log P(target), token accuracy, argmax ids) with teacher forcing,
    all queries of all pairs in batched forwards (:func:`kn_utils.scoring.score_targets`)."""
    return [(s.logp, s.accuracy, s.argmax)
            for s in score_targets(lm, pairs, batch_size=batch_size)]


# --------------------------------------------------------------------------------------------------
# editors
# --------------------------------------------------------------------------------------------------
def _rome_editor(hparams, data_dir):
    from .editing.rome import as_hparams, rome_edit

    if hparams is not None:   # a wrong type or value fails here, before the first item
        as_hparams(hparams).check_values()

    def edit(lm, req: EditRequest):
        return rome_edit(lm, req.prompt, req.subject, req.target_new, hparams, data_dir=data_dir)
    return edit


def _kn_editor(hparams):
    from .attribution import find_knowledge_neurons
    from .editing.kn import kn_edit

    if hparams is not None and not isinstance(hparams, dict):
        raise TypeError(f"KN editor hparams must be a dict of kn_edit keyword arguments (plus "
                        f"'find'), got {type(hparams).__name__}")
    options = dict(hparams or {})
    find_opts = options.pop("find", {})

    def edit(lm, req: EditRequest):
        result = find_knowledge_neurons(lm, list(req.prompts), req.target_true, **find_opts)
        if not result.neurons:
            return _NoEdit()
        return kn_edit(lm, result.neurons, req.target_true, req.target_new, **options)
    return edit


class _NoEdit:
    """What the KN editor returns when attribution finds no neuron: nothing to change or restore."""

    def restore(self):
        pass


def _editor(editor, hparams, data_dir) -> Callable:
    if callable(editor):
        return editor
    if editor == "rome":
        return _rome_editor(hparams, data_dir)
    if editor == "kn":
        return _kn_editor(hparams)
    raise ValueError(f"unknown editor {editor!r}; choose one of {EDITORS} or pass a callable "
                     f"f(lm, request) -> edit with .restore()")


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------
def _prompts(lm, bag: Bag) -> list[str]:
    """A ParaRel bag's prompts as ``lm`` reads them: the [MASK] prompts for a masked LM, else the
    prompts that end where the object starts (:func:`kn_utils.data.pararel.causal_prompts`).  The one
    copy: the reproduction's experiments import it from here."""
    if lm.arch.is_masked_lm:
        return list(bag.prompts)
    return causal_prompts(bag)


def _new_target_index(bags, i):
    """Closest earlier item (wrapping) whose object differs from item i's."""
    for step in range(1, len(bags)):
        j = (i - step) % len(bags)
        if bags[j].object != bags[i].object:
            return j
    return None


def _item_pairs(lm, rel, bags, i, j, prompts, n_locality):
    """Every (prompt, target) the item needs, under named keys."""
    bag, src = bags[i], bags[j]
    t, t_new = bag.object, src.object
    masked = lm.arch.is_masked_lm
    pairs = {}
    pairs["rel_new"] = (prompts[0], t_new)
    pairs["rel_old"] = (prompts[0], t)
    for g, p in enumerate(prompts[1:]):
        pairs[f"gen{g}_new"] = (p, t_new)
        pairs[f"gen{g}_old"] = (p, t)
    others = [k for k in range(1, len(bags)) if bags[(i + k) % len(bags)].object != t_new]
    for m, k in enumerate(others[:n_locality]):
        other = bags[(i + k) % len(bags)]
        op = _prompts(lm, other)
        if op:
            pairs[f"loc{m}_own"] = (op[0], other.object)
            pairs[f"loc{m}_new"] = (op[0], t_new)
    if rel in _REVERSE:
        rev = _REVERSE[rel][1 if masked else 0].format(t_new)
        pairs["sym_s"] = (rev, bag.subject)
        pairs["sym_alt"] = (rev, src.subject)
    if rel == "P101":
        syn = synonyms()
        sp = _SYNONYM_PROMPT[1 if masked else 0].format(bag.subject)
        pairs["syn_new"] = (sp, syn[t_new])
        pairs["syn_old"] = (sp, syn[t])
    return pairs


def _measure(lm, pairs):
    keys = list(pairs)
    return dict(zip(keys, score(lm, [pairs[k] for k in keys])))


def _criteria(rel, pre, post, n_gen, n_loc):
    """Metric columns from before/after scores {key: (logp, acc, argmax)}."""
    row = {}
    for tag, s in (("_pre", pre), ("", post)):
        row["reliability_prob" + tag] = float(s["rel_new"][0] > s["rel_old"][0])
        row["reliability_acc" + tag] = s["rel_new"][1]
        if n_gen:
            row["generality_prob" + tag] = sum(s[f"gen{g}_new"][0] > s[f"gen{g}_old"][0]
                                               for g in range(n_gen)) / n_gen
            row["generality_acc" + tag] = sum(s[f"gen{g}_new"][1] for g in range(n_gen)) / n_gen
        else:
            row["generality_prob" + tag] = row["generality_acc" + tag] = float("nan")
        if rel in _REVERSE:
            row["symmetry_prob" + tag] = float(s["sym_s"][0] > s["sym_alt"][0])
            row["symmetry_acc" + tag] = s["sym_s"][1]
        if rel == "P101":
            row["synonym_prob" + tag] = float(s["syn_new"][0] > s["syn_old"][0])
            row["synonym_acc" + tag] = s["syn_new"][1]
    locs = [m for m in range(n_loc) if f"loc{m}_own" in post]
    if locs:
        row["locality_prob"] = sum(post[f"loc{m}_own"][0] > post[f"loc{m}_new"][0] for m in locs) / len(locs)
        row["locality_prob_pre"] = sum(pre[f"loc{m}_own"][0] > pre[f"loc{m}_new"][0] for m in locs) / len(locs)
        same = [sum(a == b for a, b in zip(pre[f"loc{m}_own"][2], post[f"loc{m}_own"][2]))
                / len(pre[f"loc{m}_own"][2]) for m in locs]
        row["locality_acc"] = sum(same) / len(same)
    else:
        row["locality_prob"] = row["locality_prob_pre"] = row["locality_acc"] = float("nan")
    return row


def _item_request(lm, rel, bags, i, syn):
    """(the edit request of item i, index of the fact t* comes from, prompts), or (None, why it is
    skipped, None)."""
    bag = bags[i]
    j = _new_target_index(bags, i)
    prompts = _prompts(lm, bag)
    if j is None or not prompts:
        return None, "no different object" if j is None else "no usable prompt", None
    t_new = bags[j].object
    if rel == "P101" and (bag.object not in syn or t_new not in syn):
        return None, "field without occupation", None
    return EditRequest(rel, prompts[0], bag.subject, bag.object, t_new, tuple(prompts)), j, prompts


def skip_reason(lm, relation: str, bags, i: int) -> str | None:
    """Why :func:`evaluate_edits` skips item ``i`` of ``bags`` (the relation's first facts, as it
    loads them), or None when the item is edited: "no different object", "no usable prompt",
    "field without occupation" (P101: the synonymy criterion needs the occupation of both fields)."""
    syn = synonyms() if relation == "P101" else {}
    request, why, _ = _item_request(lm, relation, bags, i, syn)
    return None if request is not None else why


def _rome_updates(lm, rel, bags, items, syn, hparams, data_dir) -> dict:
    """{item: its ROME update}, every item's computed on the unedited weights by one rome_compute
    call (as rome_edit computes each: evaluate_edits restores after every item)."""
    from .editing.rome import rome_compute

    requests = {i: _item_request(lm, rel, bags, i, syn)[0] for i in items}
    requests = {i: r for i, r in requests.items() if r is not None}
    if not requests:
        return {}
    # the tuple form, as rome_edit passes it: the same checks and the same prompt
    updates = rome_compute(lm, [(r.prompt, r.subject, r.target_new) for r in requests.values()],
                           hparams, data_dir=data_dir)
    return dict(zip(requests, updates))


def _apply_rome(lm, update):
    from .editing.rome import apply_rome

    return apply_rome(lm, update)


def evaluate_edits(lm, editor="rome", relation: str = "P36", n: int | None = None, data_dir=None,
                   hparams=None, progress: bool = True, n_locality: int = 5,
                   items: list[int] | None = None, batch_rome: bool = False) -> pd.DataFrame:
    """Edit each of the first ``n`` facts of ``relation`` in turn and measure the criteria.

    ``editor``: "rome" (``hparams`` = :class:`~kn_utils.editing.rome.ROMEHyperParams`), "kn" (Dai et
    al.'s update on neurons from :func:`kn_utils.attribution.find_knowledge_neurons`; ``hparams`` =
    kn_edit keyword arguments, plus ``"find": {...}`` for the neuron search) or a callable
    ``f(lm, request: EditRequest) -> edit with .restore()``.  Returns one row per item.
    ``items``: only these indices of the first ``n`` (the same rows as in the full run).
    ``batch_rome`` (``editor="rome"`` only): compute every item's update first, with one
    :func:`~kn_utils.editing.rome.rome_compute` call (the v* of several requests in one batch, each
    alone up to float rounding), then apply, measure and restore each in turn: the rows of the
    item-by-item path, faster.
    """
    rel = relation.split("(")[0] if isinstance(relation, str) else relation
    if rel not in RELATIONS:
        raise ValueError(f"unsupported relation {relation!r}: evaluate_edits supports {RELATIONS}")
    edit_fn = _editor(editor, hparams, data_dir)
    if batch_rome and editor != "rome":
        raise ValueError(f"batch_rome=True is for editor='rome' only, got editor={editor!r}")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    if not isinstance(n_locality, int) or isinstance(n_locality, bool) or n_locality < 0:
        raise ValueError(f"n_locality must be an integer >= 0, got {n_locality!r}")
    # Targets come from neighbouring items, so a few items are needed even for n = 1.
    bags = load_bags(rel, data_dir=data_dir, n=None if n is None else max(n, 2))
    if len(bags) < 2:
        raise ValueError(f"{rel}: at least two facts are needed (new targets come from other facts)")
    every = range(min(len(bags), n) if n is not None else len(bags))
    items = every if items is None else [i for i in every if i in set(items)]
    syn = synonyms() if rel == "P101" else {}
    rows, skipped = [], []
    name = editor if isinstance(editor, str) else getattr(editor, "__name__", "custom")
    updates = _rome_updates(lm, rel, bags, items, syn, hparams, data_dir) if batch_rome else None
    for i in tqdm(items, desc=f"editing {rel} ({name})", disable=not progress):
        bag = bags[i]
        request, j, prompts = _item_request(lm, rel, bags, i, syn)
        if request is None:
            skipped.append((i, j))
            continue
        t_new = request.target_new
        pairs = _item_pairs(lm, rel, bags, i, j, prompts, n_locality)
        pre = _measure(lm, pairs)
        edit = edit_fn(lm, request) if updates is None else _apply_rome(lm, updates[i])
        if not callable(getattr(edit, "restore", None)):
            raise TypeError(f"the editor {name!r} returned {type(edit).__name__} for item {i}, not an "
                            f"edit with .restore(): it must return the applied edit (weights it "
                            f"changed without one cannot be restored here)")
        try:
            post = _measure(lm, pairs)
        finally:
            edit.restore()
        row = {"relation": rel, "editor": name, "item": i, "subject": bag.subject, "prompt": prompts[0],
               "target_true": bag.object, "target_new": t_new,
               "known": pre["rel_old"][1] == 1.0,
               "p_true_pre": float(torch.tensor(pre["rel_old"][0]).exp()),
               "p_new_pre": float(torch.tensor(pre["rel_new"][0]).exp()),
               "p_true_post": float(torch.tensor(post["rel_old"][0]).exp()),
               "p_new_post": float(torch.tensor(post["rel_new"][0]).exp())}
        row.update(_criteria(rel, pre, post, len(prompts) - 1, n_locality))
        for attr in ("delta_norm", "layer"):
            if hasattr(edit, attr):
                row[attr] = getattr(edit, attr)
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["n_skipped"] = len(skipped)
    df.attrs["skipped"] = skipped
    df.attrs["relation"] = rel
    df.attrs["data_source"] = source_of(bags)  # "builtin:..." when the facts are not ParaRel's
    return df


# --------------------------------------------------------------------------------------------------
# Table 1
# --------------------------------------------------------------------------------------------------
def _frames(df_or_dict):
    if isinstance(df_or_dict, pd.DataFrame):
        return [df_or_dict]
    if isinstance(df_or_dict, dict):
        frames = list(df_or_dict.values())
        if all(isinstance(f, pd.DataFrame) for f in frames):
            return frames
    raise ValueError("summarize_edits takes a DataFrame from evaluate_edits or a dict of them")


# Table 1's metric first: the paper code's teacher-forced token accuracy of the new answer
# (``test_prediction_acc``, REFERENCE.md §4); the probability comparison second.
_TABLE_METRICS = ("reliability", "generality", "locality", "criterion")


def summarize_edits(df_or_dict, print_table: bool = True) -> pd.DataFrame:
    """Table 1: per (editor, relation) the mean of every criterion in %, accuracy (the paper's
    metric) before the probability comparison of each, with the paper's ROME numbers (GPT-2 XL and
    LLaMA-2-7B) beside ROME's rows only (a KN-editor row holds NaN there: the paper has no KN
    numbers to compare with); ``known_only`` rows restrict to facts the model knew."""
    out = []
    for df in _frames(df_or_dict):
        if df.empty:
            continue
        for (editor, rel), part in df.groupby(["editor", "relation"], sort=False):
            for subset, rows in (("all", part), ("known_only", part[part["known"]])):
                if subset == "known_only" and (rows.empty or len(rows) == len(part)):
                    continue
                crit = PAPER_TABLE1[rel][0]
                rec = {"editor": editor, "relation": rel, "subset": subset, "n": len(rows),
                       "n_skipped": df.attrs.get("n_skipped", 0), "known": 100 * part["known"].mean(),
                       "data_source": df.attrs.get("data_source")}
                for metric in _TABLE_METRICS:
                    name = crit if metric == "criterion" else metric
                    for kind in ("acc", "prob"):
                        col = f"{name}_{kind}"
                        rec[f"{metric}_{kind}"] = 100 * rows[col].mean() if col in rows else float("nan")
                for kind in ("acc", "prob"):
                    col = f"{crit}_{kind}_pre"
                    rec[f"criterion_{kind}_pre"] = 100 * rows[col].mean() if col in rows else float("nan")
                rec["criterion"] = crit
                for model, (r, c, n) in PAPER_TABLE1[rel][1].items():
                    rome_row = editor == "rome"
                    rec[f"paper_{model}_reliability"] = r if rome_row else float("nan")
                    rec[f"paper_{model}_criterion"] = c if rome_row else float("nan")
                out.append(rec)
    table = pd.DataFrame(out)
    if print_table and not table.empty:
        with pd.option_context("display.width", 200, "display.max_columns", 40,
                               "display.float_format", "{:.2f}".format):
            print(table.to_string(index=False))
    return table
