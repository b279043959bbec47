"""``python -m kn_utils trace``: causal trace of one prompt, written as a CSV and a figure."""
from __future__ import annotations

import argparse
import math
import re

from kn_utils.checks import replace_file, writable_folder
from kn_utils.cli import inputs_checked, positive_int

HELP = "causal trace (ROME) of one prompt: scores CSV + hidden/MLP/attention heatmaps"


def add_arguments(parser):
    parser.add_argument("--prompt", required=True, help='e.g. "The Eiffel Tower is located in the city of"')
    parser.add_argument("--subject", required=True, help="substring of the prompt to corrupt")
    parser.add_argument("--kind", default="all", choices=("all", "hidden", "mlp", "attn"))
    parser.add_argument("--target", default=None, help="score this target (default: clean top-1)")
    parser.add_argument("--samples", type=positive_int, default=10, help="noise samples (default 10)")
    parser.add_argument("--noise", default="s3", type=_noise,
                        help="noise level: s3 = 3 x subject embedding std (default), or a number")
    parser.add_argument("--window", type=positive_int, default=10, help="restored layers for mlp/attn (10)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="rows per forward (default: auto)")
    parser.add_argument("--out", default="results", help="output folder (default results/)")
    parser.add_argument("--name", default=None, help="file name stem (default from the subject)")


def _noise(text):
    """A number >= 0, or "s<k>" (k x the subject's embedding std)."""
    from kn_utils.tracing import _noise_factor

    try:
        value = float(text)
    except ValueError:
        try:
            _noise_factor(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 or s<k>, got {text}")
    return value


def run(args) -> int:
    import pandas as pd

    import kn_utils as ku
    from kn_utils.plotting import plot_trace_panels
    from kn_utils.tracing import causal_trace

    kinds = ("hidden", "mlp", "attn") if args.kind == "all" else (args.kind,)
    out = writable_folder(args.out)      # before the model: a file in its place, a read-only folder
    lm = ku.load_model(args.model, device=args.device)
    # the prompt, subject and target as the trace will read them: a mistake is one line, not a trace
    prompt = ku.targets.check_prompt(lm, args.prompt)
    ku.subject_span(lm, prompt, args.subject)
    if args.target is not None:
        ku.prepare(lm, prompt, args.target)
    inputs_checked()
    results = {kind: causal_trace(lm, args.prompt, args.subject, kind=kind, samples=args.samples,
                                  noise=args.noise, window=args.window, target=args.target,
                                  batch_size=args.batch_size, progress=True)
               for kind in kinds}
    stem = args.name or "trace_" + (re.sub(r"[^A-Za-z0-9]+", "_", args.subject).strip("_").lower() or "x")
    table = pd.concat([r.to_frame() for r in results.values()], ignore_index=True)
    csv = out / f"{stem}.csv"
    replace_file(csv, lambda tmp: table.to_csv(tmp, index=False))
    plot_trace_panels(results, save=stem, folder=out, model_name=lm.name)
    first = next(iter(results.values()))
    print(f"answer {first.answer!r}: clean p={first.high_score:.4f}, corrupted p={first.low_score:.4f}")
    for kind, r in results.items():
        t, layer = divmod(int(r.scores.nan_to_num(-1).argmax()), r.scores.shape[1])
        print(f"{kind:6s} peak p={float(r.scores[t, layer]):.4f} at token {t} ({r.tokens[t]!r}), "
              f"layer {layer}")
    print(f"wrote {csv}, {out / (stem + '.png')}, {out / (stem + '.pdf')}")
    return 0
