"""ROME's CounterFact metrics (Meng et al. 2022, §3): efficacy, paraphrase, neighbourhood, score.

On EasyEdit's reduced CounterFact (one rephrase and one neighbourhood prompt per record,
:func:`kn_utils.data.counterfact.load_counterfact`), per record, after the edit:

* efficacy      — the edited prompt: P(new) > P(true);
* paraphrase    — the rephrased prompt: P(new) > P(true);
* neighborhood  — the neighbour's prompt: P(its true answer) > P(new) (the edit left it alone);
* score         — harmonic mean of the three success rates (ROME's "S").

Probabilities are compared as ROME's code does: the mean log-probability per target token, teacher
forced (so a long answer is not penalised for its length).  ``*_pre`` columns: the unedited model.
"""
from __future__ import annotations

import pandas as pd
from tqdm.auto import tqdm

from . import targets as tg
from .data import source_of
from .data.counterfact import check_records, load_counterfact
from .evaluation import EditRequest, _editor, score

COLUMNS = ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
           "locality_ground_truth")
METRICS = ("efficacy", "paraphrase", "neighborhood")


def _mean_logp(lm, pairs):
    # ROME's test_batch_prediction divides the summed NLL by the target's token count
    out = score(lm, pairs)
    return [lp / len(tg.prepare(lm, p, t).target_ids) for (lp, _, _), (p, t) in zip(out, pairs)]


def _success(lm, rec):
    pairs = [(rec["prompt"], rec["target_new"]), (rec["prompt"], rec["ground_truth"]),
             (rec["rephrase_prompt"], rec["target_new"]), (rec["rephrase_prompt"], rec["ground_truth"]),
             (rec["locality_prompt"], rec["locality_ground_truth"]), (rec["locality_prompt"], rec["target_new"])]
    lp = _mean_logp(lm, pairs)
    return {"efficacy": float(lp[0] > lp[1]), "paraphrase": float(lp[2] > lp[3]),
            "neighborhood": float(lp[4] > lp[5])}


def harmonic_mean(values) -> float:
    values = [float(v) for v in values]
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def evaluate_counterfact(lm, editor="rome", n: int | None = 50, data_dir=None, hparams=None,
                         records: pd.DataFrame | None = None, progress: bool = True) -> pd.DataFrame:
    """Edit each of the first ``n`` CounterFact records in turn (``editor`` as in
    :func:`kn_utils.evaluation.evaluate_edits`), measure efficacy / paraphrase / neighbourhood before
    and after, restore.  ``records``: an already loaded table (columns :data:`COLUMNS`).
    One row per record; ``df.attrs["data_source"]`` names the file."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be None (every record) or a positive integer, got {n!r}")
    if records is None:
        records = load_counterfact(data_dir, n=n)
    missing = set(COLUMNS) - set(records.columns)
    if missing:
        raise ValueError(f"CounterFact records lack columns {sorted(missing)} (need {list(COLUMNS)})")
    # before any edit: a null target would be edited towards the text "nan" and counted
    check_records(records.head(n).to_dict("records") if n else records.to_dict("records"), COLUMNS,
                  records.attrs.get("source", "CounterFact records"))
    edit_fn = _editor(editor, hparams, data_dir)
    name = editor if isinstance(editor, str) else getattr(editor, "__name__", "custom")
    rows = []
    for i, rec in tqdm(list(records.head(n).iterrows()) if n else list(records.iterrows()),
                       desc=f"CounterFact ({name})", disable=not progress):
        rec = {k: str(rec[k]).strip() if k not in ("prompt", "rephrase_prompt", "locality_prompt")
               else str(rec[k]) for k in COLUMNS}
        pre = _success(lm, rec)
        req = EditRequest("counterfact", rec["prompt"], rec["subject"], rec["ground_truth"],
                          rec["target_new"], (rec["prompt"], rec["rephrase_prompt"]))
        edit = edit_fn(lm, req)
        try:
            post = _success(lm, rec)
        finally:
            edit.restore()
        row = {"editor": name, "record": i, "subject": rec["subject"], "target_new": rec["target_new"],
               "ground_truth": rec["ground_truth"], **post}
        row.update({f"{k}_pre": v for k, v in pre.items()})
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["data_source"] = source_of(records)
    return df


def summarize_counterfact(df: pd.DataFrame) -> dict:
    """Success rates in % and ROME's score (harmonic mean of the three)."""
    out = {m: 100 * float(df[m].mean()) for m in METRICS}
    out["score"] = harmonic_mean([out[m] for m in METRICS])
    return out


__all__ = ["evaluate_counterfact", "summarize_counterfact", "harmonic_mean", "METRICS"]
