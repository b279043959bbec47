"""ROME's settings: :class:`ROMEHyperParams`, presets named for what they reproduce, checks.

Two configurations exist for every model preset (``preset(name, config=...)``):

* ``"paper"`` — the configuration of the paper's own code (``hparams/ROME/*.yaml`` of the paper's
  repository): the covariance adjustment OFF (C = I).  Table 1 was produced with it, and it is the
  default everywhere (``for_model``, ``evaluate_edits``).
* ``"rome"`` — ROME's published configuration: C = E[kkᵀ] over ``mom2_n_samples`` = 100,000
  Wikipedia *texts*, drawn at random, each truncated to the model's context.  :meth:`for_model` on a
  CPU draws :data:`CPU_MOM2_TEXTS` texts instead and says so in a warning.

Presets are data, one JSON file per model configuration in ``kn_utils/resources/rome_presets/``
(:data:`PRESET_DIR`), named ``<model>-<config>.json``::

    {"model": "gemma-3-270m",                 # the name preset() takes
     "config": "paper",                       # "paper" | "rome"
     "match": {"family": "gemma3_text", "n_layers": 18, "d_model": 640},   # or null
     "hparams": {"layer": 3, "v_num_grad_steps": 20, ...},   # ROMEHyperParams fields (all of them)
     "layer_source": {"file": "benchmarks/layer_sweep_gemma.csv", "row": "layer=3",
                      "why": "what the sweep measured and why this layer"}}

``match`` is the (``lm.arch.family``, ``n_layers``, ``d_model``) for which :meth:`for_model` picks the
preset; null for a preset chosen only by name (``"default"``, also the fallback for other models, its
layer moved to the same relative depth).  ``layer_source`` cites the file and row that chose the
layer.  Adding a model is adding a file: :func:`write_preset` writes one in this format (checked as
:func:`load_preset` reads it), e.g. from ``benchmarks/layer_sweep.py``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from ...resources import resource_dir

CONFIGS = ("paper", "rome")
UPDATES = ("rome_code", "formula")
MOM2_SAMPLES = ("texts", "tokens")
ROME_MOM2_TEXTS = 100_000
# ROME's text count on a CPU: ~40k WikiText-2 tokens, a few minutes per layer on 2 cores
CPU_MOM2_TEXTS = 300

PRESET_DIR = resource_dir() / "rome_presets"
PRESET_KEYS = ("model", "config", "match", "hparams", "layer_source")
MATCH_KEYS = ("family", "n_layers", "d_model")
SOURCE_KEYS = ("file", "row", "why")


@dataclass
class ROMEHyperParams:
    """ROME settings.  ``layer=None`` / ``v_loss_layer=None`` are resolved per model (see ``resolve``).

    ``update``: ``"rome_code"`` (default) is the update ROME's code (and the paper's copy of it)
    applies: u = C⁻¹k*, ΔW = u (v* − v₀)ᵀ / (uᵀk₀), k₀ / v₀ the key and MLP output at the subject's
    last token of the bare prompt, so the edited layer maps k₀ to v*.  ``"formula"`` is the paper's
    formula literally: Λ = (v* − Wk*) / (uᵀk*), so the layer maps k* to v* (REFERENCE.md §4).

    ``mom2_sample``: ``"texts"`` (ROME's way) draws ``mom2_n_samples`` texts at random (seeded by
    ``seed``), each truncated to the model's context, and counts all their tokens; ``"tokens"``
    takes the first ``mom2_n_samples`` tokens of the corpus in file order (paragraphs cut at 256).
    """

    layer: int | None = None
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int | None = None          # None: the last layer (logits of the full model)
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    context_template_length_params: list = field(default_factory=lambda: [[5, 10], [10, 10]])
    mom2_adjustment: bool = False            # the paper's configuration; ROME's turns it on
    mom2_dataset: str = "auto"               # see kn_utils.data.text: wikitext / wikipedia / hub:...
    mom2_n_samples: int = ROME_MOM2_TEXTS    # texts (mom2_sample="texts") or tokens ("tokens")
    mom2_sample: str = "texts"
    # Blend of the statistics with a scaled identity: 1 = E[kkᵀ] only, 0 = identity.  ROME uses 1.
    mom2_update_weight: float = 1.0
    update: str = "rome_code"
    early_stop_loss: float = 5e-2
    seed: int = 0

    @classmethod
    def preset(cls, name: str, config: str = "paper") -> "ROMEHyperParams":
        """The settings of model preset ``name`` in configuration ``config`` ("paper" / "rome"),
        read from ``PRESET_DIR/<name>-<config>.json`` (each file says in ``layer_source`` which
        sweep or published file chose its layer, and why)."""
        if config not in CONFIGS:
            raise ValueError(f"unknown ROME configuration {config!r}; choose 'paper' (the paper's code: "
                             f"covariance off) or 'rome' (ROME's published settings: covariance on)")
        names = preset_names()
        if name not in names:
            raise ValueError(f"unknown ROME preset {name!r}; presets: {names} (files in {PRESET_DIR})")
        path = PRESET_DIR / f"{name}-{config}.json"
        if not path.is_file():
            raise ValueError(f"ROME preset {name!r} has no {config!r} configuration ({path} is missing)")
        return cls(**load_preset(path)["hparams"])

    # Fraction of depth of the default preset's layer, for models without a preset of their own.
    _DEFAULT_DEPTH = 4 / 30

    @classmethod
    def for_model(cls, lm, config: str = "paper") -> "ROMEHyperParams":
        """The preset whose file ``match``-es ``lm``'s (family, n_layers, d_model) (today GPT-2 XL,
        LLaMA-2-7B, Gemma-3-270M), else the default preset with its layer moved to the same relative
        depth and the loss read at the last layer.  ``config="rome"`` on a model off the GPU draws :data:`CPU_MOM2_TEXTS` texts for C
        instead of ROME's 100,000, with a warning saying so."""
        arch = lm.arch
        shape = {"family": arch.family, "n_layers": arch.n_layers, "d_model": arch.d_model}
        found = [r["model"] for r in all_presets() if r["match"] == shape and r["config"] == config]
        if found:
            hp = cls.preset(found[0], config)
        else:
            hp = cls.preset("default", config)
            hp.layer = min(arch.n_layers - 1, round(cls._DEFAULT_DEPTH * arch.n_layers))
        if hp.mom2_adjustment and getattr(lm.device, "type", "cpu") != "cuda":
            hp.mom2_n_samples = CPU_MOM2_TEXTS
            warnings.warn(f"kn_utils: ROME's covariance statistics from {CPU_MOM2_TEXTS:,} random texts "
                          f"on {lm.device} (ROME draws {ROME_MOM2_TEXTS:,}; set mom2_n_samples for more)",
                          UserWarning, stacklevel=2)
        return hp

    def resolve(self, lm) -> "ROMEHyperParams":
        """A copy with ``layer`` / ``v_loss_layer`` filled in and every value checked against ``lm``."""
        hp = replace(self, context_template_length_params=[list(p) for p in
                                                           self.context_template_length_params])
        if hp.layer is None:
            with warnings.catch_warnings():   # only the layer is taken from the preset
                warnings.simplefilter("ignore")
                hp.layer = ROMEHyperParams.for_model(lm).layer
        if hp.v_loss_layer is None:
            hp.v_loss_layer = lm.arch.n_layers - 1
        hp.layer = lm.arch.check_layer(hp.layer)
        hp.v_loss_layer = lm.arch.check_layer(hp.v_loss_layer, "v_loss_layer")
        if hp.v_loss_layer < hp.layer:
            raise ValueError(f"v_loss_layer {hp.v_loss_layer} is below the edited layer {hp.layer}")
        if hp.v_loss_layer < lm.arch.n_layers - 1 and (lm.arch.final_norm is None or lm.arch.unembed is None):
            # a head that is not final norm + unembedding (BERT's transform): no early read-out
            raise ValueError(f"v_loss_layer={hp.v_loss_layer} reads logits early through the final norm "
                             f"and unembedding, which {lm.name} lacks: use {lm.arch.n_layers - 1}")
        hp.check_values()
        return hp

    def check_values(self) -> None:
        """Every setting that needs no model: types, finiteness and ranges (NaN is out of every
        range), so a bad value fails before the statistics pass, not after it."""
        def number(name, low, *, low_open, high=None):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if (value <= low if low_open else value < low) or (high is not None and value > high):
                bound = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}" \
                        f"{']' if high is not None else ')'}"
                raise ValueError(f"{name} must lie in {bound}, got {value!r}")

        for name, minimum in (("v_num_grad_steps", 1), ("mom2_n_samples", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        number("v_lr", 0, low_open=True)
        number("clamp_norm_factor", 0, low_open=True)
        number("v_weight_decay", 0, low_open=False)
        number("kl_factor", 0, low_open=False)
        number("early_stop_loss", 0, low_open=False)
        number("mom2_update_weight", 0, low_open=False, high=1)
        if not isinstance(self.mom2_adjustment, bool):
            raise ValueError(f"mom2_adjustment must be True or False, got {self.mom2_adjustment!r}")
        if not isinstance(self.mom2_dataset, str) or not self.mom2_dataset:
            raise ValueError(f"mom2_dataset must be a corpus name, got {self.mom2_dataset!r}")
        if self.mom2_sample not in MOM2_SAMPLES:
            raise ValueError(f"mom2_sample must be one of {MOM2_SAMPLES}, got {self.mom2_sample!r}")
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES} ('rome_code': ROME's code, maps k0 to v*; "
                             f"'formula': maps k* to v*), got {self.update!r}")
        for pair in self.context_template_length_params:
            if len(pair) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in pair) \
                    or min(pair) < 0:
                raise ValueError(f"context_template_length_params: [[length, count], ...] of "
                                 f"integers >= 0, got {pair!r}")


def as_hparams(hparams, lm=None) -> ROMEHyperParams:
    """``hparams`` if it is a :class:`ROMEHyperParams`; None: the preset for ``lm``; else TypeError."""
    if hparams is None:
        if lm is None:
            raise ValueError("hparams=None needs the model to choose its preset")
        return ROMEHyperParams.for_model(lm)
    if not isinstance(hparams, ROMEHyperParams):
        hint = " (build one with ROMEHyperParams(**your_dict))" if isinstance(hparams, dict) else ""
        raise TypeError(f"ROME hparams must be a ROMEHyperParams or None, got "
                        f"{type(hparams).__name__}{hint}")
    return hparams


# --------------------------------------------------------------------------------------------------
# presets as data files
# --------------------------------------------------------------------------------------------------
_FIELDS = {f.name for f in dataclasses.fields(ROMEHyperParams)}


def preset_names() -> list[str]:
    """Every model preset with at least one file in :data:`PRESET_DIR`."""
    return sorted({r["model"] for r in all_presets()})


def all_presets() -> list[dict]:
    """Every preset file, read and checked (:func:`load_preset`), in name order."""
    return [load_preset(p) for p in sorted(PRESET_DIR.glob("*.json"))]


def load_preset(path) -> dict:
    """One preset file as a dict, checked: its keys, its name (``<model>-<config>.json``), ``match``,
    ``layer_source`` and every hparams value (:meth:`ROMEHyperParams.check_values`).  A bad file is
    a ValueError naming it."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"ROME preset {path}: unreadable ({err})") from err
    problem = _preset_problem(record, path.name)
    if problem:
        raise ValueError(f"ROME preset {path}: {problem}")
    return record


def _preset_problem(record, file_name: str | None = None) -> str | None:
    if not isinstance(record, dict) or sorted(record) != sorted(PRESET_KEYS):
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        return f"needs exactly the keys {list(PRESET_KEYS)}, got {got}"
    model, config, match = record["model"], record["config"], record["match"]
    if not isinstance(model, str) or not re.fullmatch(r"[\w.-]+", model):
        return f"model must be a name of letters, digits, '.', '-', '_', got {model!r}"
    if config not in CONFIGS:
        return f"config must be one of {CONFIGS}, got {config!r}"
    if file_name is not None and file_name != f"{model}-{config}.json":
        return f"the file of model {model!r}, config {config!r} must be named {model}-{config}.json"
    if match is not None and (not isinstance(match, dict) or sorted(match) != sorted(MATCH_KEYS)
                              or not isinstance(match["family"], str)
                              or any(isinstance(match[k], bool) or not isinstance(match[k], int)
                                     or match[k] < 1 for k in ("n_layers", "d_model"))):
        return f"match must be null or {{family: str, n_layers: int, d_model: int}}, got {match!r}"
    source = record["layer_source"]
    if not isinstance(source, dict) or sorted(source) != sorted(SOURCE_KEYS) \
            or not all(isinstance(v, str) and v.strip() for v in source.values()):
        return f"layer_source must be {{file, row, why}} (non-empty strings), got {source!r}"
    hparams = record["hparams"]
    if not isinstance(hparams, dict) or set(hparams) != _FIELDS:
        have = set(hparams) if isinstance(hparams, dict) else set()
        return (f"hparams must give every ROMEHyperParams field; missing {sorted(_FIELDS - have)}, "
                f"unknown {sorted(have - _FIELDS)}")
    hp = ROMEHyperParams(**hparams)
    try:
        hp.check_values()
    except ValueError as err:
        return f"hparams: {err}"
    if isinstance(hp.layer, bool) or not isinstance(hp.layer, int) or hp.layer < 0:
        return f"hparams.layer must be an integer >= 0, got {hp.layer!r}"
    return None


def write_preset(hparams: ROMEHyperParams, model: str, config: str, *, match: dict | None,
                 layer_source: dict, folder=None) -> Path:
    """Write ``<folder>/<model>-<config>.json`` (folder: :data:`PRESET_DIR`) in the preset format,
    checked as :func:`load_preset` checks it; returns the path."""
    record = {"model": model, "config": config, "match": match,
              "hparams": dataclasses.asdict(hparams), "layer_source": layer_source}
    problem = _preset_problem(record)
    if problem:
        raise ValueError(f"ROME preset {model}-{config}: {problem}")
    path = Path(folder or PRESET_DIR) / f"{model}-{config}.json"
    # [[5, 10], [10, 10]] on one line, as a person writes it: dumped apart and put in its place
    lengths = record["hparams"]["context_template_length_params"]
    record["hparams"]["context_template_length_params"] = "@lengths@"
    text = json.dumps(record, indent=2, ensure_ascii=False).replace('"@lengths@"', json.dumps(lengths))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
