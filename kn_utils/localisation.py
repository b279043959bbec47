"""Knowledge neurons of a BLiMP paradigm, one prompt set per group (the paper's §3, Table 8): the
library function behind ``python -m kn_utils localise`` and the notebook's localisation tables.

    from kn_utils.localisation import localise_paradigm
    loc = localise_paradigm(lm, "dna_1", n=20)     # .groups, .prompts (DataFrames), .summary, .results

For each group of the paradigm's pairs (singular / plural targets, or anaphor gender), the first ``n``
pairs whose good word is one token are attributed with integrated gradients and refined into KNs
(:func:`kn_utils.attribution.find_knowledge_neurons`); BLiMP accuracy is measured before and after
suppressing each group's KNs.  Nothing is written: files and figures are the caller's (the CLI's).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from tqdm.auto import tqdm

from .attribution import KNResult, attribution_maps, find_knowledge_neurons
from .blimp_tasks import blimp_accuracy
from .data import blimp


def neuron_label(neuron) -> str:
    """"L10.N2096" for (10, 2096); the paper writes w^(10)_2096."""
    layer, unit = neuron
    return f"L{int(layer)}.N{int(unit)}"


@dataclass
class ParadigmLocalisation:
    """What :func:`localise_paradigm` found for one paradigm.

    ``groups``: one row per group (n_prompts, |KN| at the starting tau, final tau, R²₁, neurons);
    ``prompts``: one row per prompt (top neuron and score, coarse-neuron count, the summed score of
    its group's KNs); both carry ``attrs["data_source"]``.  ``summary``: the same per group with BLiMP
    accuracy before / after suppression, JSON-ready.  ``maps``: group -> attribution maps
    (n_prompts, n_layers, n_neurons); ``results``: group -> :class:`~kn_utils.attribution.KNResult`.
    Unpacks as ``summary, groups, prompts, maps`` (the command's old tuple).
    """

    summary: dict
    groups: pd.DataFrame
    prompts: pd.DataFrame
    maps: dict = field(default_factory=dict)
    results: dict[object, KNResult] = field(default_factory=dict)

    def __iter__(self):
        return iter((self.summary, self.groups, self.prompts, self.maps))


def localise_paradigm(lm, uid, *, n: int, eval_n: int | None = None, steps: int = 20,
                      threshold: float = 0.2, tau: float = 0.7, adaptive: bool = True, data_dir=None,
                      tau_mode: str = "strict", pairs: pd.DataFrame | None = None,
                      accuracy: bool = True, progress: bool = True) -> ParadigmLocalisation:
    """KN search per group of one BLiMP paradigm (``uid``: a UID or short name such as ``"dna_1"``).

    ``n``: prompts per group (>= 2: R²₁ and tau need several); ``eval_n``: pairs for BLiMP accuracy
    (default ``n`` times the number of groups searched); ``steps``, ``threshold``, ``tau``,
    ``adaptive``, ``tau_mode``: as in :func:`~kn_utils.attribution.find_knowledge_neurons`.
    ``pairs``: the paradigm's :func:`~kn_utils.data.blimp.minimal_pairs` table when the caller already
    has it (a notebook that loaded it for other cells); by default it is loaded from ``data_dir``.
    ``accuracy=False`` skips the BLiMP accuracy runs (the summary then has no accuracy fields).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n (prompts per group, --n) must be an integer >= 2 (R²₁ and tau need several "
                         f"prompts), got {n!r}")
    if eval_n is not None and (isinstance(eval_n, bool) or not isinstance(eval_n, int) or eval_n < 1):
        raise ValueError(f"eval_n (pairs for BLiMP accuracy, --eval-n) must be an integer >= 1 or None, "
                         f"got {eval_n!r}")
    uid = blimp.resolve_uid(uid, data_dir)
    if pairs is None:
        pairs = blimp.minimal_pairs(lm, uid, data_dir)
    groups = [g for g in pd.unique(pairs["group"].dropna())] or [None]
    group_rows, prompt_rows, maps, results = [], [], {}, {}
    for group in tqdm(groups, desc=f"{uid} groups", disable=not progress):
        sel = pairs if group is None else pairs[pairs["group"] == group]
        sub = sel[sel["n_good_tokens"] == 1].head(n)
        if len(sub) < 2:
            continue
        prompts, targets = list(sub["prompt"]), list(sub["good"])
        maps[group] = attribution_maps(lm, prompts, targets, steps=steps, progress=progress)
        res = find_knowledge_neurons(lm, prompts, targets, maps=maps[group], threshold=threshold,
                                     tau=tau, adaptive=adaptive, tau_mode=tau_mode, progress=False)
        results[group] = res
        group_rows.append({"paradigm": uid, "group": group, "n_prompts": len(sub),
                           "kn_count_tau_start": res.n_initial, "tau": res.tau, "r2": res.r2,
                           "n_neurons": len(res.neurons), "converged": res.converged,
                           "neurons": " ".join(neuron_label(x) for x in res.neurons), "message": res.message})
        kn_index = torch.tensor([[layer, unit] for layer, unit in res.neurons], dtype=torch.long)
        for i, (prompt, target) in enumerate(zip(prompts, targets)):
            m = maps[group][i]
            flat = int(m.argmax())
            kn_sum = float(m[kn_index[:, 0], kn_index[:, 1]].sum()) if len(kn_index) else 0.0
            prompt_rows.append({"paradigm": uid, "group": group, "prompt": prompt, "target": target,
                                "max_score": float(m.max()),
                                "top_neuron": neuron_label((flat // m.shape[1], flat % m.shape[1])),
                                "n_coarse": len(res.coarse[i]), "kn_score_sum": kn_sum})
    if not results:
        raise ValueError(f"{uid}: no group has two or more single-token pairs for {lm.name}")
    ev = pairs.head(eval_n or n * len(results))
    summary = {"model": lm.name, "paradigm": uid, "source": pairs.attrs["source"],
               "data_source": pairs.attrs["data_source"],
               "pairs_available": len(pairs), "skipped": pairs.attrs["n_skipped"], "steps": steps,
               "threshold": threshold, "tau_start": tau, "groups": {}}
    if tau_mode != "strict":  # the default leaves the JSON as it was
        summary["tau_mode"] = tau_mode
    before = blimp_accuracy(lm, ev) if accuracy else None
    for group, res in results.items():
        info = summary["groups"][str(group)] = {
            "n_prompts": res.n_prompts, "neurons": [list(x) for x in res.neurons], "tau": res.tau,
            "kn_count_tau_start": res.n_initial, "r2": res.r2, "converged": res.converged,
            "message": res.message}
        if accuracy:
            after = blimp_accuracy(lm, ev, neurons=res.neurons) if res.neurons else before
            info.update(accuracy_before=before, accuracy_after_suppression=after, eval_pairs=len(ev))
    group_table, prompt_table = pd.DataFrame(group_rows), pd.DataFrame(prompt_rows)
    for table in (group_table, prompt_table):
        table.attrs["data_source"] = pairs.attrs["data_source"]
    return ParadigmLocalisation(summary, group_table, prompt_table, maps, results)


__all__ = ["ParadigmLocalisation", "localise_paradigm", "neuron_label"]
