"""``python -m kn_utils trace``: causal trace of one prompt, written as a CSV and a figure."""
from __future__ import annotations

import re
import sys
from pathlib import Path

HELP = "causal trace (ROME) of one prompt: scores CSV + hidden/MLP/attention heatmaps"


def add_arguments(parser):
    parser.add_argument("--prompt", required=True, help='e.g. "The Eiffel Tower is located in the city of"')
    parser.add_argument("--subject", required=True, help="substring of the prompt to corrupt")
    parser.add_argument("--kind", default="all", choices=("all", "hidden", "mlp", "attn"))
    parser.add_argument("--target", default=None, help="score this target (default: clean top-1)")
    parser.add_argument("--samples", type=int, default=10, help="noise samples (default 10)")
    parser.add_argument("--noise", default="s3",
                        help="noise level: s3 = 3 x subject embedding std (default), or a number")
    parser.add_argument("--window", type=int, default=10, help="restored layers for mlp/attn (10)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward (default: auto)")
    parser.add_argument("--out", default="results", help="output folder (default results/)")
    parser.add_argument("--name", default=None, help="file name stem (default from the subject)")


def _noise(text):
    try:
        return float(text)
    except ValueError:
        return text


def run(args) -> int:
    import pandas as pd

    import kn_utils as ku
    from kn_utils.plotting import plot_trace_panels
    from kn_utils.tracing import causal_trace

    kinds = ("hidden", "mlp", "attn") if args.kind == "all" else (args.kind,)
    try:
        lm = ku.load_model(args.model, device=args.device)
        results = {kind: causal_trace(lm, args.prompt, args.subject, kind=kind, samples=args.samples,
                                      noise=_noise(args.noise), window=args.window, target=args.target,
                                      batch_size=args.batch_size, progress=True)
                   for kind in kinds}
    except ValueError as err:
        print(f"trace: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or "trace_" + (re.sub(r"[^A-Za-z0-9]+", "_", args.subject).strip("_").lower() or "x")
    table = pd.concat([r.to_frame() for r in results.values()], ignore_index=True)
    csv = out / f"{stem}.csv"
    table.to_csv(csv, index=False)
    plot_trace_panels(results, save=stem, folder=out, model_name=lm.name)
    first = next(iter(results.values()))
    print(f"answer {first.answer!r}: clean p={first.high_score:.4f}, corrupted p={first.low_score:.4f}")
    for kind, r in results.items():
        t, layer = divmod(int(r.scores.nan_to_num(-1).argmax()), r.scores.shape[1])
        print(f"{kind:6s} peak p={float(r.scores[t, layer]):.4f} at token {t} ({r.tokens[t]!r}), "
              f"layer {layer}")
    print(f"wrote {csv}, {out / (stem + '.png')}, {out / (stem + '.pdf')}")
    return 0
