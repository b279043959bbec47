"""ROME: rank-one model editing of one MLP output projection (Meng et al., 2022; REFERENCE.md §4).

    edit = rome_edit(lm, "The capital of Canada is", "Canada", "Rome")
    ku.predict(lm, "The capital of Canada is")     # ' Rome' first
    edit.restore()                                  # weights back, bit for bit

    with rome_edit(lm, prompt, subject, target): ...   # restored on exit, also after an exception

Split along the method's seams:

* :mod:`.hparams`   — :class:`ROMEHyperParams`, presets ("paper": C off, as the paper's code; "rome":
  ROME's published settings, C on), checks;
* :mod:`.stats`     — the key statistics C = E[kkᵀ] (:func:`layer_stats`) and their disk cache, keyed
  by a fingerprint of the model (:func:`model_key`);
* :mod:`.templates` — the context templates (bare prompt + model-generated prefixes);
* :mod:`.compute`   — k* / k₀, v* (Adam on δ: NLL of the new target + KL + weight decay, clamped),
  the rank-one algebra (``update="rome_code"`` as ROME's code, or the literal ``"formula"``);
* :mod:`.edit`      — :func:`rome_compute` (the updates of several requests, nothing applied; v* of
  several requests in one batch), :func:`apply_rome` (a list of updates as one restorable
  :class:`ROMEEdit`, a :class:`~kn_utils.editing.base.WeightEdit`) and :func:`rome_edit` (both in one call).

    updates = rome_compute(lm, [(prompt, subject, target), ...])
    with apply_rome(lm, updates[:1]): ...
"""
from .compute import KL_PROMPT, compute_k, compute_keys, compute_v, compute_values, rank_one_update
from .edit import ROMEEdit, ROMERequest, ROMEUpdate, apply_rome, rome_compute, rome_edit
from .hparams import CONFIGS, CPU_MOM2_TEXTS, ROME_MOM2_TEXTS, ROMEHyperParams, as_hparams
from .stats import SecondMoment, effective_mom2, layer_keys, layer_stats, model_key, stats_path
from .templates import context_templates

__all__ = ["CONFIGS", "CPU_MOM2_TEXTS", "KL_PROMPT", "ROME_MOM2_TEXTS", "ROMEEdit", "ROMEHyperParams",
           "ROMERequest", "ROMEUpdate", "SecondMoment", "apply_rome", "as_hparams", "compute_k", "compute_keys",
           "compute_v", "compute_values", "rome_compute",
           "context_templates", "effective_mom2", "layer_keys", "layer_stats", "model_key",
           "rank_one_update", "rome_edit", "stats_path"]
