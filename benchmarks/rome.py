"""Time one ROME edit with and without covariance statistics, the statistics pass in tokens/s, and
v*'s Adam steps over the suffix positions (the fast path) against the loop over every position.

    python benchmarks/rome.py                         # CPU preset: default model, small settings
    python benchmarks/rome.py --preset cpu-paper           # the paper's 20 steps and 21 prompts
    python benchmarks/rome.py --device cuda --preset gpu

The statistics are collected once (timed, tokens/s) and then read from the on-disk cache, so the
"with covariance" edit time is the edit itself, as in a long evaluation run.
"""
from __future__ import annotations

import argparse
import time

import torch

import kn_utils as ku
from kn_utils.editing import rome
from kn_utils.editing.rome import ROMEHyperParams, layer_stats, rome_edit
from common import bench_tokenizer, random_lm, sync

PRESETS = {
    "cpu": dict(stats_tokens=5_000, steps=10, context=[[5, 3]], repeats=1),
    "gpu": dict(stats_tokens=100_000, steps=20, context=[[5, 10], [10, 10]], repeats=3),
    # the paper's v* settings (20 steps, ROME's 21 context prompts) with a small statistics pass
    "cpu-paper": dict(stats_tokens=5_000, steps=20, context=[[5, 10], [10, 10]], repeats=1),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--random-gpt2-xl", action="store_true",
                        help="time on a random-init GPT-2 XL-size model (48 layers, d=1600) instead of "
                             "--model (for a GPU machine without models)")
    parser.add_argument("--tokenizer", default=None,
                        help="with --random-gpt2-xl: tokenizer folder (default $KN_BENCH_TOKENIZER, else "
                             "the default model's)")
    parser.add_argument("--layers", type=int, default=None,
                        help="with --random-gpt2-xl: fewer layers (a quick dry run on CPU)")
    args = parser.parse_args(argv)
    cfg = PRESETS[args.preset]
    if args.random_gpt2_xl:
        dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
        lm = random_lm("gpt2-xl", args.device, tokenizer=bench_tokenizer(args.tokenizer),
                       n_layers=args.layers, dtype=dtype)
    else:
        lm = ku.load_model(args.model, device=args.device, dtype=args.dtype)
    hp = ROMEHyperParams.for_model(lm)
    hp.v_num_grad_steps = cfg["steps"]
    hp.context_template_length_params = cfg["context"]
    hp.mom2_sample, hp.mom2_n_samples = "tokens", cfg["stats_tokens"]
    hp = hp.resolve(lm)
    rome.context_templates(lm, hp.context_template_length_params)   # generated once, cached

    sync(lm.device)
    start = time.perf_counter()
    layer_stats(lm, hp.layer, hp.mom2_dataset, hp.mom2_n_samples, recompute=True, progress=False)
    sync(lm.device)
    seconds = time.perf_counter() - start
    print(f"{lm.name} on {lm.device}: covariance, layer {hp.layer}: {hp.mom2_n_samples} tokens in "
          f"{seconds:.1f} s = {hp.mom2_n_samples / seconds:,.0f} tokens/s")

    request = ("The capital of Canada is", "Canada", "Rome")
    for mom2 in (False, True):
        hp.mom2_adjustment = mom2
        times = []
        for _ in range(cfg["repeats"]):
            sync(lm.device)
            start = time.perf_counter()
            edit = rome_edit(lm, *request, hp)
            sync(lm.device)
            times.append(time.perf_counter() - start)
            top = ku.predict(lm, request[0], 1)[0]
            edit.restore()
        print(f"ROME edit ({hp.v_num_grad_steps} steps, {len(rome.context_templates(lm, hp.context_template_length_params))} "
              f"prompts), covariance {'on (cached)' if mom2 else 'off'}: best {min(times):.2f} s "
              f"of {len(times)}; top-1 after edit {top[0]!r} p={top[1]:.3f}")

    # v*: the fast path (positions from the first subject end on, the rest in a KV cache) against
    # the plain loop that runs every position at every step, same rows, same steps
    from kn_utils import targets
    from kn_utils.editing.rome import compute
    from kn_utils.hooks import grad_ready

    hp.mom2_adjustment = False
    templates = rome.context_templates(lm, hp.context_template_length_params)
    prompt = targets.check_prompt(lm, request[0])
    timing, result = {}, {}
    for suffix in (False, True):
        if suffix and not compute.suffix_supported(lm):
            break
        best = float("inf")
        for _ in range(cfg["repeats"]):
            sync(lm.device)
            start = time.perf_counter()
            with grad_ready(lm.model):
                result[suffix] = compute.compute_v(lm, hp, templates, prompt, request[1], request[2],
                                                   suffix=suffix)
            sync(lm.device)
            best = min(best, time.perf_counter() - start)
        timing[suffix] = best
    if True in timing:
        full, fast = result[False], result[True]
        diff = float((fast[0] - full[0]).norm() / full[0].norm())
        print(f"v* ({full[2]['steps']} Adam steps, {len(templates)} prompts + KL): every position "
              f"({full[2]['positions_per_step']} per row) {timing[False]:.2f} s, suffix "
              f"({fast[2]['positions_per_step']} per row) {timing[True]:.2f} s: "
              f"{timing[False] / timing[True]:.1f}x; relative difference of v* {diff:.1e}")


if __name__ == "__main__":
    main()
