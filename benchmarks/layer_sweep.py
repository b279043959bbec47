"""Which layer should ROME edit in the default model?  Efficacy and paraphrase success per layer.

    python benchmarks/layer_sweep.py                       # CPU preset (small), writes layer_sweep.csv
    python benchmarks/layer_sweep.py --device cuda --preset gpu

Each layer edits the first N ParaRel facts of a relation (new target = the previous fact's object)
with :func:`kn_utils.evaluate_edits` and records the means of reliability (efficacy), generality
(paraphrase success over the bag's other decoder prompts), locality and the symmetry criterion.
The CPU preset shrinks ROME (fewer steps, fewer context prefixes, fewer covariance tokens) so the
sweep fits a laptop; the columns say which settings produced each row.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

import kn_utils as ku
from kn_utils.editing.rome import ROMEHyperParams
from kn_utils.evaluation import evaluate_edits

PRESETS = {
    "cpu": dict(layers=[2, 4, 8, 14, 20], n=4, steps=12, context=[[5, 3]], mom2_tokens=3_000),
    "gpu": dict(layers=list(range(0, 30, 2)), n=20, steps=20, context=[[5, 10], [10, 10]],
                mom2_tokens=100_000),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--relation", default="P36")
    parser.add_argument("--layers", type=int, nargs="*", default=None)
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--no-mom2", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".csv")))
    args = parser.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    if args.layers:
        cfg["layers"] = args.layers
    if args.n:
        cfg["n"] = args.n
    lm = ku.load_model(args.model, device=args.device)
    rows = []
    crit = "synonym" if args.relation == "P101" else "symmetry"
    for layer in cfg["layers"]:
        hp = ROMEHyperParams.for_model(lm)
        hp.layer = layer
        hp.v_num_grad_steps = cfg["steps"]
        hp.context_template_length_params = cfg["context"]
        hp.mom2_adjustment = not args.no_mom2
        hp.mom2_sample, hp.mom2_n_samples = "tokens", cfg["mom2_tokens"]
        start = time.perf_counter()
        df = evaluate_edits(lm, "rome", args.relation, n=cfg["n"], hparams=hp, progress=False)
        seconds = time.perf_counter() - start
        row = {"model": lm.name, "device": str(lm.device), "relation": args.relation, "layer": layer,
               "n": len(df), "steps": cfg["steps"], "context": str(cfg["context"]),
               "mom2": hp.mom2_adjustment, "mom2_tokens": cfg["mom2_tokens"],
               "efficacy": df["reliability_prob"].mean(), "efficacy_acc": df["reliability_acc"].mean(),
               "paraphrase": df["generality_prob"].mean(), "paraphrase_acc": df["generality_acc"].mean(),
               "locality": df["locality_prob"].mean(), "locality_acc": df["locality_acc"].mean(),
               crit: df[f"{crit}_prob"].mean(), "delta_norm": df["delta_norm"].mean(),
               "seconds": round(seconds, 1)}
        rows.append(row)
        print(pd.DataFrame([row]).to_string(index=False, header=len(rows) == 1), flush=True)
        pd.DataFrame(rows).to_csv(args.out, index=False)   # keep partial results
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
