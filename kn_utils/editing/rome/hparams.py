"""ROME's settings: :class:`ROMEHyperParams`, presets named for what they reproduce, checks.

Two configurations exist for every model preset (``preset(name, config=...)``):

* ``"paper"`` — the configuration of the paper's own code (``hparams/ROME/*.yaml`` of the paper's
  repository): the covariance adjustment OFF (C = I).  Table 1 was produced with it, and it is the
  default everywhere (``for_model``, ``evaluate_edits``).
* ``"rome"`` — ROME's published configuration: C = E[kkᵀ] over ``mom2_n_samples`` = 100,000
  Wikipedia *texts*, drawn at random, each truncated to the model's context.  :meth:`for_model` on a
  CPU draws :data:`CPU_MOM2_TEXTS` texts instead and says so in a warning.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace

CONFIGS = ("paper", "rome")
UPDATES = ("rome_code", "formula")
MOM2_SAMPLES = ("texts", "tokens")
ROME_MOM2_TEXTS = 100_000
# ROME's text count on a CPU: ~40k WikiText-2 tokens, a few minutes per layer on 2 cores
CPU_MOM2_TEXTS = 300

# (family, layers, width) of the models with published ROME settings -> preset name
_PUBLISHED_SHAPES = {("gpt2", 48, 1600): "gpt2-xl", ("llama", 32, 4096): "llama-2-7b"}
# (family, layers, width) of the embedded models with a swept preset of their own
_SWEPT_SHAPES = {("gemma3_text", 18, 640): "gemma-3-270m"}


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
        """The settings of model preset ``name`` in configuration ``config`` ("paper" / "rome").

        ``"gpt2-xl"`` and ``"llama-2-7b"``: the paper's ``hparams/ROME/*.yaml`` (layer 17 / 5, ...);
        their ``"rome"`` configuration turns the covariance on over 100,000 Wikipedia texts, as
        ROME's published GPT-2 XL settings do.

        ``"default"`` (SmolLM2-135M-Instruct, 30 layers): layer 4, chosen by the layer sweep
        ``benchmarks/layer_sweep.py --layers 2 4 8 14 20`` (P36, 4 requests each, 12 Adam steps, 3
        context prefixes, covariance from 3,000 WikiText tokens; CSV in ``benchmarks/layer_sweep.csv``):
        teacher-forced efficacy 1.00 / 1.00 / 0.88 / 0.88 / 0.63 and paraphrase accuracy
        0.34 / 0.34 / 0.16 / 0.23 / 0.20 at layers 2 / 4 / 8 / 14 / 20; layer 4 ties layer 2 on both
        and keeps more neighbours intact (locality accuracy 0.88 vs 0.75).  Early MLPs, as for GPT-2 XL
        (layer 17 of 48) and LLaMA-2-7B (layer 5 of 32).  The sweep is small (n = 4): rerun it with
        ``--preset gpu`` on a GPU for a firmer choice.

        ``"gemma-3-270m"`` (Gemma-3-270M base, 18 layers): layer 3, by the same sweep and settings
        (``benchmarks/layer_sweep.py --model gemma-3-270m --layers 1 3 6 10 14 --n 3``, P36, 12 Adam
        steps, 3 prefixes, covariance from 3,000 tokens; CSV in ``benchmarks/layer_sweep_gemma.csv``;
        stopped before layer 14 to bound CPU time): teacher-forced efficacy 0.67 / 1.00 / 1.00 / 1.00,
        paraphrase accuracy 0.38 / 0.62 / 0.62 / 0.62 and locality accuracy 1.00 / 1.00 / 0.67 / 0.00
        at layers 1 / 3 / 6 / 10.  Layer 3 is the earliest layer with full efficacy and the best
        paraphrase score, and the only one of those that leaves every neighbour intact.  n = 3: a
        small sweep, like SmolLM2's.

        Both embedded presets: covariance OFF in ``"paper"`` (as the paper ran ROME), ON in
        ``"rome"`` over texts of the local corpus ("auto": WikiText-2, else the Wikipedia sample);
        the layers were swept with the covariance on (from tokens), and kept for both.
        """
        models = {
            "gpt2-xl": dict(layer=17, v_num_grad_steps=20, v_loss_layer=47, v_weight_decay=0.5,
                            mom2_dataset="wikipedia"),
            "llama-2-7b": dict(layer=5, v_num_grad_steps=25, v_loss_layer=31, v_weight_decay=1e-3,
                               mom2_dataset="wikipedia"),
            "default": dict(layer=4, v_num_grad_steps=20, v_loss_layer=None, v_weight_decay=0.5,
                            mom2_dataset="auto"),
            "gemma-3-270m": dict(layer=3, v_num_grad_steps=20, v_loss_layer=None, v_weight_decay=0.5,
                                 mom2_dataset="auto"),
        }
        if name not in models:
            raise ValueError(f"unknown ROME preset {name!r}; presets: {sorted(models)}")
        if config not in CONFIGS:
            raise ValueError(f"unknown ROME configuration {config!r}; choose 'paper' (the paper's code: "
                             f"covariance off) or 'rome' (ROME's published settings: covariance on)")
        return cls(v_lr=0.5, clamp_norm_factor=4.0, kl_factor=0.0625,
                   context_template_length_params=[[5, 10], [10, 10]],
                   mom2_adjustment=config == "rome", mom2_n_samples=ROME_MOM2_TEXTS,
                   mom2_sample="texts", update="rome_code", **models[name])

    # Fraction of depth of the default preset's layer, for models without a preset of their own.
    _DEFAULT_DEPTH = 4 / 30

    @classmethod
    def for_model(cls, lm, config: str = "paper") -> "ROMEHyperParams":
        """The preset for ``lm``'s family and size (GPT-2 XL, LLaMA-2-7B, Gemma-3-270M), else the
        default preset with its layer moved to the same relative depth and the loss read at the last
        layer.  ``config="rome"`` on a model off the GPU draws :data:`CPU_MOM2_TEXTS` texts for C
        instead of ROME's 100,000, with a warning saying so."""
        arch = lm.arch
        shape = (arch.family, arch.n_layers, arch.d_model)
        published = _PUBLISHED_SHAPES.get(shape) or _SWEPT_SHAPES.get(shape)
        if published:
            hp = cls.preset(published, config)
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
