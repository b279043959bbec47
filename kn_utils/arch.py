"""Where each architecture keeps its parts.

This is the ONE place in kn_utils that knows module names. Everything else asks an
:class:`Architecture` for "the MLP output projection of layer 7" and hooks that module.

Families are recognised by module structure: the blocks are the ``ModuleList`` whose length is the
config's layer count, and inside a block the parts are found by a short table of known relative
names, with a structural fallback for the MLP output projection (the linear map from the MLP's
hidden width back to the model width). An unknown layout raises :class:`UnsupportedArchitecture`
listing what was found, so adding a family means adding a name to a table here.

Sites (what a hook can read or write), all per layer:

* ``"neurons"``  the *input* of the MLP output projection, [batch, pos, n_neurons]. This is the
  knowledge-neuron site (after the nonlinearity; for gated MLPs act(gate) * up).
* ``"mlp"``      the MLP's contribution to the residual stream: what the block adds to it.  For most
  families the output of the MLP output projection; for families with a norm *after* the MLP
  (Gemma 2/3: ``post_feedforward_layernorm``) the output of that norm.
* ``"attn"``     the attention's contribution to the residual stream: the attention output projection,
  or the norm after it where there is one (Gemma 2/3: ``post_attention_layernorm``, which in those
  families is applied to the attention output; in LLaMA the same name is the *pre*-MLP norm).
  So for every causal family, hidden[l] = hidden[l-1] + attn[l] + mlp[l] (tests/test_arch.py).
* ``"mlp_proj"`` the output of the MLP output projection itself, before any post-norm: the value whose
  weights ROME edits (equal to ``"mlp"`` except in post-norm families).
* ``"hidden"``   the block output (residual stream after the block).
* ``"embed"``    the input-embedding output (layer index ignored; one site), including any scaling
  the embedding module does (Gemma multiplies by sqrt(d_model) inside its embedding module).
* ``"pre_act"``  compatibility site of the paper's original code: the output of the MLP *input*
  projection before the nonlinearity (``c_fc`` / ``gate_proj``). Only for comparison with that code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .checks import as_index

SITES = ("neurons", "mlp", "attn", "hidden", "embed", "pre_act", "mlp_proj")
# Sites inside the MLP: their values may come flattened to [batch*positions, width] (OPT).
_MLP_SITES = ("neurons", "mlp", "mlp_proj", "pre_act")

# Relative names inside one block, most specific first.  Checked in order; first hit wins.
_MLP_OUT_NAMES = (
    "mlp.down_proj",        # LLaMA, Mistral, Qwen2, Gemma, Phi-3, SmolLM2
    "mlp.c_proj",           # GPT-2
    "mlp.fc_out",           # GPT-J
    "mlp.dense_4h_to_h",    # GPT-NeoX / Pythia
    "mlp.fc2",              # Phi-1/2
    "fc2",                  # OPT
    "output.dense",         # BERT, RoBERTa (input = intermediate output after GELU)
)
_MLP_IN_NAMES = (  # pre-activation compatibility site
    "mlp.gate_proj", "mlp.gate_up_proj", "mlp.c_fc", "mlp.fc_in", "mlp.dense_h_to_4h", "mlp.fc1",
    "fc1", "intermediate.dense",
)
_ATTN_OUT_NAMES = (
    "self_attn.o_proj",      # LLaMA family, Phi-3
    "attn.c_proj",           # GPT-2
    "attn.out_proj",         # GPT-J
    "attention.dense",       # GPT-NeoX
    "self_attn.out_proj",    # OPT
    "self_attn.dense",       # Phi-1/2
    "attention.output.dense",  # BERT, RoBERTa
)
# Post-norm blocks normalise each sublayer's output before the residual add.  Recognised by the
# norm after the MLP (whose name no pre-norm family uses); then the norm after attention is
# ``post_attention_layernorm`` -- a name LLaMA-style blocks use for their *pre*-MLP norm, so it
# only counts together with the marker.   (marker = norm after MLP, norm after attention)
_POST_NORM_NAMES = (
    ("post_feedforward_layernorm", "post_attention_layernorm"),   # Gemma 2, Gemma 3, OLMo 2
)
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "decoder.final_layer_norm", "final_layernorm")


# Encoder families that are masked LMs when a checkpoint's config does not name its head class.
_MASKED_LM_TYPES = ("bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta", "deberta-v2")


def config_is_masked_lm(config) -> bool:
    """Whether a checkpoint with this config should be loaded as a masked LM (else a causal LM)."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith("ForMaskedLM") for a in archs)
    return getattr(config, "model_type", None) in _MASKED_LM_TYPES


# Class-name endings of checkpoints that carry a language-model head (what load_model can score with).
_LM_HEAD_SUFFIXES = ("ForCausalLM", "ForMaskedLM", "LMHeadModel", "ForConditionalGeneration")


def config_lm_head_problem(config) -> str | None:
    """Why a checkpoint with this config has no language-model head (None: it has one, or its
    config does not say). A ``BertModel`` or a sequence classifier would otherwise be loaded with a
    freshly initialised head and predict noise."""
    archs = getattr(config, "architectures", None) or []
    if not archs or any(a.endswith(_LM_HEAD_SUFFIXES) for a in archs):
        return None
    return (f"the checkpoint is a {', '.join(archs)}, which has no language-model head "
            f"(kn_utils needs a ...{' / ...'.join(_LM_HEAD_SUFFIXES)} checkpoint)")


_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def _max_positions(model: nn.Module) -> int | None:
    """The longest input the model accepts, or None when its config sets no limit."""
    config = model.config
    limits = [getattr(config, key) for key in _POSITION_KEYS
              if isinstance(getattr(config, key, None), int) and getattr(config, key) > 0]
    if not limits:
        return None
    limit = min(limits)
    # RoBERTa-style learned positions start after the padding index: ids padding_idx+1 onwards.
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding) \
                and module.padding_idx is not None:
            limit = min(limit, module.num_embeddings - module.padding_idx - 1)
    return limit


class UnsupportedArchitecture(ValueError):
    """The model's module layout is not one kn_utils knows how to read."""


def _get(root: nn.Module, dotted: str) -> nn.Module | None:
    try:
        return root.get_submodule(dotted)
    except AttributeError:
        return None


def _in_out_features(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    # GPT-2's Conv1D stores weight as [in, out]
    if type(module).__name__ == "Conv1D" and hasattr(module, "weight"):
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    return None


def _layer_count(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


@dataclass
class Architecture:
    """Module handles of one loaded model.  Build with :func:`describe`."""

    family: str
    blocks: list[nn.Module]
    mlp_out: list[nn.Module]          # output projection per layer; its input is the neuron site
    mlp_in: list[nn.Module | None]    # input projection per layer (pre-activation compat site)
    attn_out: list[nn.Module]         # attention output projection per layer
    embed: nn.Module
    final_norm: nn.Module | None
    unembed: nn.Module | None
    is_masked_lm: bool
    n_neurons: int
    d_model: int
    names: dict[str, list[str]] = field(default_factory=dict, repr=False)
    max_positions: int | None = None  # longest input (tokens) the model accepts; None: no limit
    # What each block adds to the residual stream ("mlp" / "attn" sites); empty: the projections.
    mlp_add: list[nn.Module] = field(default_factory=list, repr=False)
    attn_add: list[nn.Module] = field(default_factory=list, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def module(self, site: str, layer: int) -> tuple[nn.Module, bool]:
        """(module to hook, True if the value is that module's *input*) for a site."""
        if site not in SITES:
            raise ValueError(f"unknown site {site!r}; choose one of {SITES}")
        if site == "embed":
            return self.embed, False
        layer = self.check_layer(layer)
        if site == "neurons":
            return self.mlp_out[layer], True
        if site == "mlp":
            return (self.mlp_add or self.mlp_out)[layer], False
        if site == "mlp_proj":
            return self.mlp_out[layer], False
        if site == "attn":
            return (self.attn_add or self.attn_out)[layer], False
        if site == "hidden":
            return self.blocks[layer], False
        module = self.mlp_in[layer]
        if module is None:
            raise ValueError(f"{self.family}: no MLP input projection found for the 'pre_act' site")
        return module, False

    def site_view(self, site: str, layer: int, fn, add_hook):
        """``fn`` adapted to see the value at ``site`` as [batch, positions, width].

        Some MLPs (OPT) run on [batch*positions, width]; for the MLP sites a pre-hook on the block
        (registered through ``add_hook(module, hook, pre=True, with_kwargs=True)``, so the caller
        owns its removal) keeps the block's input shape, which tells how to fold the rows back.
        """
        if site not in _MLP_SITES:
            return fn
        shape = {}

        def keep_shape(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if torch.is_tensor(hidden):
                shape["bp"] = hidden.shape[:-1]

        add_hook(self.blocks[layer], keep_shape, pre=True, with_kwargs=True)

        def folded(value):
            if value.dim() != 2 or "bp" not in shape:
                return fn(value)
            new = fn(value.view(*shape["bp"], value.shape[-1]))
            return None if new is None else new.reshape(value.shape)
        return folded

    def check_layer(self, layer: int, name: str = "layer") -> int:
        """``layer`` as an int in 0..n_layers-1 (TypeError for bool / float / str, ValueError out of range)."""
        return as_index(layer, name, self.n_layers,
                        range_text=f"the model has layers 0..{self.n_layers - 1}")

    def check_layers(self, layers, name: str = "layers") -> list[int]:
        """One layer or an iterable of layers as a list of checked ints (None: every layer)."""
        if layers is None:
            return list(range(self.n_layers))
        if isinstance(layers, (str, bytes)):
            raise TypeError(f"{name} must be an integer layer index or a list of them, got {layers!r}")
        try:
            items = list(layers)
        except TypeError:  # a scalar (0-d tensors refuse iteration too)
            items = [layers]
        return [self.check_layer(layer) for layer in items]

    def check_neuron(self, layer: int, neuron: int) -> tuple[int, int]:
        """(layer, neuron) as checked ints."""
        layer = self.check_layer(layer)
        return layer, as_index(neuron, "neuron", self.n_neurons,
                               range_text=f"layer {layer} has neurons 0..{self.n_neurons - 1}")

    def value_slots(self, layer: int) -> torch.Tensor:
        """Weight of the output projection as a view [n_neurons, d_model]: row i is neuron i's value slot."""
        module = self.mlp_out[layer]
        w = module.weight
        return w if type(module).__name__ == "Conv1D" else w.T


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    n = _layer_count(model.config)
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 0]
    matching = [(name, m) for name, m in candidates if n is None or len(m) == n]
    # Encoder-decoder and vision towers also have ModuleLists; the text stack is the shallowest match.
    matching.sort(key=lambda item: item[0].count("."))
    for name, blocks in matching:
        if any(_get(blocks[0], rel) is not None for rel in _MLP_OUT_NAMES) or _structural_mlp_out(blocks[0]):
            return name, blocks
    found = ", ".join(f"{name} ({type(m[0]).__name__} x{len(m)})" for name, m in candidates) or "none"
    raise UnsupportedArchitecture(
        f"cannot find the transformer blocks of {type(model).__name__}: expected a ModuleList of "
        f"{n} blocks containing an MLP output projection; ModuleLists found: {found}")


def _structural_mlp_out(block: nn.Module) -> str | None:
    """Name of the one linear map from a wider hidden size back to the model width, if unique."""
    shapes = {name: _in_out_features(m) for name, m in block.named_modules()}
    shapes = {k: v for k, v in shapes.items() if v is not None}
    if not shapes:
        return None
    d = max((v[1] for v in shapes.values()), key=lambda w: sum(1 for v in shapes.values() if v[1] == w))
    wide = [k for k, (i, o) in shapes.items() if o == d and i > d]
    return wide[0] if len(wide) == 1 else None


def _first(block: nn.Module, names: tuple[str, ...]) -> tuple[str | None, nn.Module | None]:
    for rel in names:
        module = _get(block, rel)
        if module is not None:
            return rel, module
    return None, None


def describe(model: nn.Module) -> Architecture:
    """Find blocks, neuron sites, attention outputs, embeddings, final norm and head of ``model``."""
    if not hasattr(model, "config"):
        raise UnsupportedArchitecture(f"{type(model).__name__} has no .config: not a transformers model")
    blocks_name, blocks = _find_blocks(model)
    mlp_out, mlp_in, attn_out, names = [], [], [], {"mlp_out": [], "attn_out": []}
    mlp_add, attn_add = [], []
    for i, block in enumerate(blocks):
        rel, module = _first(block, _MLP_OUT_NAMES)
        if module is None:
            rel = _structural_mlp_out(block)
            module = _get(block, rel) if rel else None
        arel, amodule = _first(block, _ATTN_OUT_NAMES)
        if module is None or amodule is None:
            children = ", ".join(n for n, _ in block.named_modules() if n) or "none"
            raise UnsupportedArchitecture(
                f"{type(model).__name__}: block {i} ({type(block).__name__}) has no recognisable "
                f"{'MLP output projection' if module is None else 'attention output projection'}; "
                f"its modules are: {children}")
        mlp_out.append(module)
        mlp_in.append(_first(block, _MLP_IN_NAMES)[1])
        attn_out.append(amodule)
        names["mlp_out"].append(f"{blocks_name}.{i}.{rel}")
        names["attn_out"].append(f"{blocks_name}.{i}.{arel}")
        for after_mlp, after_attn in _POST_NORM_NAMES:
            if _get(block, after_mlp) is not None and _get(block, after_attn) is not None:
                mlp_add.append(_get(block, after_mlp))
                attn_add.append(_get(block, after_attn))
                names.setdefault("mlp_add", []).append(f"{blocks_name}.{i}.{after_mlp}")
                names.setdefault("attn_add", []).append(f"{blocks_name}.{i}.{after_attn}")
                break
    if len(mlp_add) not in (0, len(blocks)):
        raise UnsupportedArchitecture(
            f"{type(model).__name__}: only {len(mlp_add)} of {len(blocks)} blocks have post-norms")

    shapes = _in_out_features(mlp_out[0])
    if shapes is None:
        raise UnsupportedArchitecture(
            f"{type(model).__name__}: MLP output projection {names['mlp_out'][0]} is a "
            f"{type(mlp_out[0]).__name__}, not a linear layer")
    n_neurons, d_model = shapes

    # The final norm lives beside the blocks in the base model (model.norm, transformer.ln_f ...).
    parent = model.get_submodule(blocks_name.rsplit(".", 1)[0]) if "." in blocks_name else model
    final_norm = _first(parent, _FINAL_NORM_NAMES)[1]
    is_masked_lm = type(model).__name__.endswith("ForMaskedLM")
    family = getattr(model.config, "model_type", type(model).__name__)
    return Architecture(
        family=family, blocks=list(blocks), mlp_out=mlp_out, mlp_in=mlp_in, attn_out=attn_out,
        embed=model.get_input_embeddings(), final_norm=final_norm,
        unembed=model.get_output_embeddings(), is_masked_lm=is_masked_lm,
        n_neurons=n_neurons, d_model=d_model, names=names, mlp_add=mlp_add, attn_add=attn_add,
        max_positions=_max_positions(model))
