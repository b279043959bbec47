"""Cost of each embedded model: load, one IG map, one causal trace, one ROME edit (same prompts).

    python benchmarks/models.py                               # both embedded models on the CPU
    python benchmarks/models.py --models gemma-3-270m --device cuda

Load: ``load_model(name)`` from the converted cache, timed after the imports (the first use also
assembles / dequantises the GGUF once; that is not repeated here).  IG: all layers x 20 steps for
the first target token.  Trace: hidden states, every (token, layer) cell, 10 noise samples, s3.
ROME: the model's preset (its layer), with ``--steps`` Adam steps, context prefixes ``[[5, 3]]``
and covariance statistics of ``--stats-tokens`` tokens, collected once (timed on their own) and
then read from the disk cache, as in an evaluation run.  ``--full-logits`` also times the ROME
edit with the vocabulary projection run at every position (what it did before ``read_logits``),
in the same process.  Writes ``benchmarks/models.csv``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

import kn_utils as ku
from kn_utils.editing import rome
from kn_utils.editing.rome import ROMEHyperParams, layer_stats, rome_edit
from common import best_time, sync

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
TARGET, NEW = "Paris", "Rome"


def full_read_logits(lm, rows, positions, **forward):
    """The old way: project every position onto the vocabulary, then pick the read ones."""
    logits = lm.model(**forward).logits
    dev = logits.device
    return logits[torch.as_tensor(rows, device=dev), torch.as_tensor(positions, device=dev)]


def measure(name, args) -> dict:
    dev = args.device
    t_load, lm = best_time(lambda: ku.load_model(name, device=dev), dev)
    top = ku.predict(lm, PROMPT, 1)[0]
    t_ig, ig = best_time(lambda: ku.integrated_gradients(lm, PROMPT, TARGET, steps=20), dev)
    t_trace, trace = best_time(
        lambda: ku.causal_trace(lm, PROMPT, SUBJECT, kind="hidden", samples=10, noise="s3"), dev)

    hp = ROMEHyperParams.for_model(lm)
    hp.v_num_grad_steps = args.steps
    hp.context_template_length_params = [[5, 3]]
    hp.mom2_adjustment, hp.mom2_sample = True, "tokens"   # as timed before: C from the first tokens
    hp.mom2_n_samples = args.stats_tokens
    hp = hp.resolve(lm)
    rome.context_templates(lm, hp.context_template_length_params)   # generated once, cached
    sync(dev)
    start = time.perf_counter()
    layer_stats(lm, hp.layer, hp.mom2_dataset, hp.mom2_n_samples, recompute=True, progress=False)
    sync(dev)
    t_stats = time.perf_counter() - start

    def one_edit():
        edit = rome_edit(lm, PROMPT, SUBJECT, NEW, hp)
        after = ku.predict(lm, PROMPT, 1)[0]
        edit.restore()
        return after
    t_rome, after = best_time(one_edit, dev)
    row = {"model": name, "device": str(lm.device), "layers": lm.arch.n_layers,
           "neurons": lm.arch.n_neurons, "vocab": lm.arch.unembed.weight.shape[0],
           "load_s": round(t_load, 2), "top1": f"{top[0]!r} {top[1]:.2f}",
           "ig_s": round(t_ig, 2), "trace_s": round(t_trace, 2),
           "trace_cells": int(trace.scores.numel()), "rome_layer": hp.layer,
           "stats_tokens": hp.mom2_n_samples, "stats_s": round(t_stats, 1),
           "rome_steps": hp.v_num_grad_steps, "rome_s": round(t_rome, 2),
           "after_edit": f"{after[0]!r} {after[1]:.2f}"}
    if args.full_logits:
        fast = rome.compute.read_logits
        rome.compute.read_logits = full_read_logits
        try:
            row["rome_full_logits_s"] = round(best_time(one_edit, dev)[0], 2)
        finally:
            rome.compute.read_logits = fast
    assert ig.shape == (lm.arch.n_layers, lm.arch.n_neurons)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["default", "gemma-3-270m"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="ROME Adam steps")
    parser.add_argument("--stats-tokens", type=int, default=3000, help="ROME covariance tokens")
    parser.add_argument("--full-logits", action="store_true",
                        help="also time the ROME edit with logits at every position")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".csv")))
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}")
    rows = []
    for name in args.models:
        rows.append(measure(name, args))
        print(pd.DataFrame(rows).to_string(index=False), flush=True)
        pd.DataFrame(rows).to_csv(args.out, index=False)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
