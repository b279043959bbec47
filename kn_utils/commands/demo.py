"""Top-5 next tokens for factual prompts, then the effect of suppressing the most active neurons."""
from __future__ import annotations

import torch

import kn_utils as ku
from kn_utils.cli import inputs_checked, positive_int
from kn_utils.data import data_root
from kn_utils.data.counterfact import load_known_facts

HELP = "predictions of the model for factual prompts, and one neuron-suppression effect"

FACTS = [
    ("The capital of France is", "Paris"),
    ("The capital of Canada is", "Ottawa"),
    ("The capital of Germany is", "Berlin"),
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("The official language of Japan is", "Japanese"),
]


def add_arguments(parser):
    parser.add_argument("--top-k", type=positive_int, default=5)
    parser.add_argument("--neurons", type=positive_int, default=20,
                        help="how many of the most active neurons (upper half of the layers) to zero")


def top_active_neurons(lm, prompt: str, count: int) -> list[tuple[int, int]]:
    """The ``count`` largest |activation| neurons at the read position, over the upper half of layers."""
    ids = torch.tensor([ku.targets.prompt_ids(lm, prompt)], device=lm.device)
    layers = range(lm.arch.n_layers // 2, lm.arch.n_layers)
    with torch.no_grad(), ku.record(lm, "neurons", layers) as acts:
        lm.model(input_ids=ids)
    pos = ku.targets.read_position(lm, ids[0].tolist())
    stacked = torch.stack([acts[layer][0, pos].abs() for layer in layers])  # [layers, neurons]
    flat = stacked.flatten().topk(count).indices
    n = lm.arch.n_neurons
    return [(layers[int(i) // n], int(i) % n) for i in flat]


def run(args) -> int:
    # before the model: a KN_DATA_DIR that is not a folder fails here, in a second, not in a notebook
    root = data_root()
    # through the loaders as the notebooks use them: with no data folder this is the built-in list
    facts = load_known_facts(n=3)
    lm = ku.load_model(args.model, device=args.device)
    inputs_checked()
    print(lm)
    print(f"data sets: {root}" if root is not None else
          "data sets: none found (KN_DATA_DIR unset, no ../shared/data): the notebooks use the built-in "
          "mini sets under kn_utils/resources/builtin/ and say so")
    print(f"\nTop-{args.top_k} next tokens")
    for prompt, _ in FACTS:
        shown = ", ".join(f"{tok!r} {p:.3f}" for tok, p in ku.predict(lm, prompt, args.top_k))
        print(f"  {prompt!r:50} -> {shown}")

    print(f"\nROME's known facts from {facts.attrs['data_source']}")
    for fact in facts.itertuples():
        p = ku.target_probability(lm, fact.prompt, fact.target)
        print(f"  {fact.prompt!r:50} -> P({fact.target!r}) {p:.3f}")

    prompt, answer = FACTS[0]
    neurons = top_active_neurons(lm, prompt, args.neurons)
    before = ku.target_probability(lm, prompt, answer)
    with ku.suppress(lm, neurons, positions=-1):
        after = ku.target_probability(lm, prompt, answer)
        top_after = ku.predict(lm, prompt, 3)
    print(f"\nSuppressing the {len(neurons)} most active neurons of layers "
          f"{lm.arch.n_layers // 2}-{lm.arch.n_layers - 1} at the last position of {prompt!r}:")
    print(f"  neurons (layer, index): {neurons[:8]}{' ...' if len(neurons) > 8 else ''}")
    print(f"  P({answer!r}) before {before:.4f}  after {after:.4f}  "
          f"({(after - before) / before:+.1%})")
    print(f"  top-3 after: {[(t, round(p, 3)) for t, p in top_after]}")
    return 0
