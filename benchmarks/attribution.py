"""Integrated-gradients speed: the fast batched path against the plain per-layer reference loop.

    python benchmarks/attribution.py                       # CPU: default model, ~10-token prompt
    python benchmarks/attribution.py --device cuda --preset gpu   # random GPT-2 XL + BERT-base sizes

Both paths run in ONE process on the same inputs; the script prints absolute times, the speed-up
and the relative error between the two maps (max |fast - ref| / max |ref|).  The reference
(``kn_utils.reference.reference_ig_query``, the loop the tests use) is the obvious implementation:
for each layer, one batch of ``steps`` rows, full forward of the whole sequence with full logits,
one backward.  On CUDA both paths run once untimed first (kernel
selection).  Exit status 1 if the maps disagree (rel. err > 1e-3; 5e-2 in 16-bit).
"""
from __future__ import annotations

import argparse
import sys

import torch

import kn_utils as ku
from kn_utils.attribution import ig_query
from kn_utils.reference import reference_ig_query
from kn_utils.targets import prepare
from common import best_time, random_lm

PROMPT = "The official language spoken by most people in the Netherlands is"  # ~11 tokens


def cases(preset: str, device: str, n_tokens: int, n_layers: int | None = None,
          dtype: torch.dtype = torch.float32):
    """(name, lm, input_ids, position, target_id) to benchmark."""
    if preset == "cpu":
        lm = ku.load_model("default", device=device, dtype=dtype)
        spec = prepare(lm, PROMPT, "Dutch")
        q = spec.queries[0]
        yield f"{lm.name} ({len(q.input_ids)} tokens)", lm, q.input_ids, q.position, q.target_id
        return
    g = torch.Generator().manual_seed(0)
    for kind in ("gpt2-xl", "bert-base"):
        lm = random_lm(kind, device, n_layers=n_layers, dtype=dtype)
        vocab = lm.model.config.vocab_size
        ids = torch.randint(1000, vocab, (n_tokens,), generator=g).tolist()
        position = len(ids) - 1 if kind == "gpt2-xl" else n_tokens // 2
        target = int(torch.randint(1000, vocab, (1,), generator=g))
        yield f"random {kind} ({n_tokens} tokens)", lm, ids, position, target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--repeat", type=int, default=1, help="best of N timings per path")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=10, help="sequence length (gpu preset)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per fast-path forward")
    parser.add_argument("--dtype", default="float32", help="model dtype (both paths)")
    parser.add_argument("--layers", type=int, default=None,
                        help="gpu preset: fewer layers than the real sizes (a quick dry run on CPU)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    failed = False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    for name, lm, ids, position, target in cases(args.preset, args.device, args.tokens, args.layers,
                                                   getattr(torch, args.dtype)):
        fast = lambda: ig_query(lm, ids, position, target, steps=args.steps,  # noqa: E731
                                batch_size=args.batch_size)
        ref = lambda: reference_ig_query(lm, ids, position, target, steps=args.steps)  # noqa: E731
        if args.device.startswith("cuda"):
            fast(), ref()  # warm-up: a GPU's first run of each shape pays for kernel selection
        t_ref, m_ref = best_time(ref, args.device, args.repeat)
        t_fast, m_fast = best_time(fast, args.device, args.repeat)
        err = float((m_fast - m_ref).abs().max() / m_ref.abs().max().clamp_min(1e-30))
        # two summation orders in a 16-bit format differ by far more than in float32
        failed |= err > (1e-3 if args.dtype == "float32" else 5e-2)
        print(f"{name} on {args.device}, {args.dtype}, {lm.arch.n_layers} layers x {args.steps} steps: "
              f"reference {t_ref:.3f} s, fast {t_fast:.3f} s, speed-up {t_ref / t_fast:.1f}x, "
              f"rel. err {err:.2e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
