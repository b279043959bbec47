"""Causal tracing: ROME's one-forward-per-cell loop against kn_utils' batched path.

The loop is ``kn_utils.reference.reference_trace``, the one the tests compare with.

Same prompt, same noise, every (token, layer) cell; the best of ``--repeat`` runs of each path (1 on
the CPU, 2 on CUDA); prints both times, the ratio and the largest score difference for each kind.
Exit status 1 if the paths disagree (max |diff| > 1e-5 in float32, 1e-3 in 16-bit).

    python benchmarks/tracing.py                          # default model on the CPU
    python benchmarks/tracing.py --device cuda --preset gpu   # random GPT-2 XL-size model, no downloads
"""
from __future__ import annotations

import argparse
import sys

import torch

import kn_utils as ku
from kn_utils.reference import reference_trace
from kn_utils.tracing import causal_trace, subject_span
from common import bench_tokenizer, best_time, random_lm

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--model", default="default", help="cpu preset: model to load")
    parser.add_argument("--kinds", default="hidden,mlp,attn")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--prefix-cache", choices=("auto", "on", "off"), default="auto",
                        help="fast path with / without the corrupted-prefix KV cache (auto: the "
                             "library's default for this device and dtype)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs of each path per kind, best time reported (default 2 on CUDA, "
                             "else 1: a GPU's first run of a new shape pays for kernel selection)")
    parser.add_argument("--tokenizer", default=None,
                        help="gpu preset: tokenizer folder (default $KN_BENCH_TOKENIZER, else the default model's)")
    parser.add_argument("--layers", type=int, default=None,
                        help="gpu preset: fewer layers than GPT-2 XL's 48 (a quick dry run on CPU)")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    if args.preset == "gpu":
        lm = random_lm("gpt2-xl", args.device, tokenizer=bench_tokenizer(args.tokenizer),
                       n_layers=args.layers, dtype=dtype)
    else:
        lm = ku.load_model(args.model, device=args.device, dtype=dtype)
    n_tok = len(subject_span(lm, PROMPT, SUBJECT)[0])
    print(f"model {lm.name} ({lm.arch.n_layers} layers, d {lm.arch.d_model}) on {lm.device}, "
          f"{args.dtype}, prefix cache {args.prefix_cache}; prompt of {n_tok} tokens, "
          f"{args.samples} samples, all layers, "
          f"torch threads {torch.get_num_threads()}")
    # warm-up: first-call allocations and kernel selection are not what we measure
    causal_trace(lm, PROMPT, SUBJECT, samples=2, tokens=[0], noise=args.noise)
    repeat = args.repeat or (2 if torch.device(args.device).type == "cuda" else 1)
    prefix_cache = {"auto": None, "on": True, "off": False}[args.prefix_cache]
    tolerance = 1e-5 if dtype == torch.float32 else 1e-3
    failed = False
    for kind in args.kinds.split(","):
        t_fast, fast = best_time(
            lambda: causal_trace(lm, PROMPT, SUBJECT, kind=kind, samples=args.samples,  # noqa: B023
                                 noise=args.noise, window=args.window, batch_size=args.batch_size,
                                 prefix_cache=prefix_cache), args.device, repeat)
        line = f"{kind:6s} fast {t_fast:8.2f} s"
        if not args.skip_reference:
            t_ref, ref = best_time(
                lambda: reference_trace(lm, PROMPT, SUBJECT, kind=kind,  # noqa: B023
                                        samples=args.samples, noise=args.noise, window=args.window),
                args.device, repeat)
            diff = float((ref.scores - fast.scores).abs().max())
            failed |= not diff <= tolerance
            line += f"  reference {t_ref:8.2f} s  speed-up {t_ref / t_fast:5.1f}x  max|diff| {diff:.1e}"
        # a random model's probabilities are small: the diff means something only beside the scores
        line += f"  (clean {fast.high_score:.2e}, corrupted {fast.low_score:.2e})"
        print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
