"""Which layer should ROME edit?  Efficacy, paraphrase success and locality per layer.

    python benchmarks/layer_sweep.py                       # CPU preset (small), writes layer_sweep.csv
    python benchmarks/layer_sweep.py --device cuda --preset gpu
    python benchmarks/layer_sweep.py --model gemma-3-270m --config paper --preset as-run \\
        --layers 1 2 3 4 6 8 --n 6 --out benchmarks/layer_sweep_gemma_paper.csv \\
        --write-preset kn_utils/resources/rome_presets/gemma-3-270m-paper.json

Each layer edits the first N ParaRel facts of a relation (new target = the previous fact's object)
with :func:`kn_utils.evaluate_edits` and records the means of reliability (efficacy), generality
(paraphrase success over the bag's other decoder prompts), locality (neighbourhood success and the
share of neighbours' teacher-forced tokens left unchanged) and the symmetry criterion.

``--config``: the ROME configuration the edits run in — ``paper`` (covariance OFF, as the paper's
code and the reports run ROME) or ``rome`` (covariance ON).  A layer chosen in one configuration need
not suit the other: with the covariance off an edit spreads further, so sweep in the configuration
that is run.  ``--preset``: ``cpu`` shrinks ROME (fewer steps, fewer context prefixes, covariance
from 3,000 tokens) so the sweep fits a laptop; ``as-run`` keeps the configuration's own steps and
prefixes (what the reports run); the columns say which settings produced each row.
``--write-preset PATH`` writes the chosen layer, by :func:`choose_layer`'s rule, as a preset JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import pandas as pd

import kn_utils as ku
from kn_utils.editing.rome import ROMEHyperParams
from kn_utils.editing.rome.hparams import write_preset
from kn_utils.evaluation import evaluate_edits

PRESETS = {
    "cpu": dict(layers=[2, 4, 8, 14, 20], n=4, steps=12, context=[[5, 3]], mom2_tokens=3_000),
    "gpu": dict(layers=list(range(0, 30, 2)), n=20, steps=20, context=[[5, 10], [10, 10]],
                mom2_tokens=100_000),
    # the configuration's own steps / prefixes / covariance sample: what the reports run
    "as-run": dict(layers=[2, 4, 8, 14, 20], n=6, steps=None, context=None, mom2_tokens=None),
}

# The layer rule.  Efficacy: the paper's Table 1 reliability (teacher-forced accuracy of the new
# answer); an edit that does not take on >= 90 % of its requests is not a usable ROME layer.
EFFICACY_MIN = 0.9
# Locality: share of neighbours' teacher-forced answer tokens left unchanged.  At >= 0.8 the edit
# leaves most of the relation's other facts alone (ROME's GPT-2 XL neighbourhood score is 75 %);
# below it the edit rewrites the relation rather than one fact.
LOCALITY_MIN = 0.8


def choose_layer(sweep: pd.DataFrame) -> tuple[int, str]:
    """(layer, why): the earliest layer with efficacy_acc >= EFFICACY_MIN and locality_acc >=
    LOCALITY_MIN (ROME's early-MLP site, kept local); else, among the layers with the highest
    efficacy_acc, the one with the best locality_acc (earliest on ties)."""
    if sweep.empty:
        raise ValueError("empty sweep: no layer to choose")
    ok = sweep[(sweep["efficacy_acc"] >= EFFICACY_MIN) & (sweep["locality_acc"] >= LOCALITY_MIN)]
    if len(ok):
        row = ok.sort_values("layer").iloc[0]
        return int(row["layer"]), (f"earliest layer with efficacy_acc >= {EFFICACY_MIN} and locality_acc "
                                   f">= {LOCALITY_MIN} (efficacy_acc {row['efficacy_acc']:.2f}, "
                                   f"locality_acc {row['locality_acc']:.2f}, n = {int(row['n'])})")
    best = sweep[sweep["efficacy_acc"] == sweep["efficacy_acc"].max()]
    row = best.sort_values(["locality_acc", "layer"], ascending=[False, True]).iloc[0]
    return int(row["layer"]), (f"no layer reaches efficacy_acc >= {EFFICACY_MIN} with locality_acc >= "
                               f"{LOCALITY_MIN}: best locality_acc ({row['locality_acc']:.2f}) among the "
                               f"layers of highest efficacy_acc ({row['efficacy_acc']:.2f}), n = {int(row['n'])}")


def preset_json(lm, hp: ROMEHyperParams, config: str, sweep: pd.DataFrame, csv_path: str) -> dict:
    layer, why = choose_layer(sweep)
    arch = lm.arch
    first = sweep.iloc[0]
    return {"model": lm.name, "config": config,
            "match": {"family": arch.family, "n_layers": arch.n_layers, "d_model": arch.d_model},
            "hparams": dataclasses.asdict(dataclasses.replace(hp, layer=layer)),
            "layer_source": {"file": csv_path, "row": f"layer={layer}",
                             "why": f"{why}; rule: benchmarks/layer_sweep.py choose_layer, over layers "
                                    f"{sorted(int(x) for x in sweep['layer'])} of {first['relation']} "
                                    f"({int(first['n'])} requests each, {int(first['steps'])} Adam steps, "
                                    f"prefixes {first['context']}) in the {config} configuration "
                                    f"(covariance {'on' if bool(first['mom2']) else 'off'})"}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--config", default=None, choices=("paper", "rome"),
                        help="ROME configuration (paper: covariance off; rome: on). Default: the "
                             "preset's own (cpu/gpu: covariance on from tokens; as-run: paper)")
    parser.add_argument("--relation", default="P36")
    parser.add_argument("--layers", type=int, nargs="*", default=None)
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--no-mom2", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".csv")))
    parser.add_argument("--write-preset", default=None, metavar="PATH")
    parser.add_argument("--from-csv", action="store_true",
                        help="no edits: choose the layer from the rows already in --out (a sweep "
                             "stopped early) and write --write-preset")
    args = parser.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    if args.layers:
        cfg["layers"] = args.layers
    if args.n:
        cfg["n"] = args.n
    config = args.config or ("paper" if args.preset == "as-run" else None)
    lm = ku.load_model(args.model, device=args.device)
    rows = pd.read_csv(args.out).to_dict("records") if args.from_csv else []
    if args.from_csv and {r["config"] for r in rows} != {config}:
        raise SystemExit(f"{args.out} holds configurations {sorted({r['config'] for r in rows})}, not {config}")
    crit = "synonym" if args.relation == "P101" else "symmetry"
    for layer in [] if args.from_csv else cfg["layers"]:
        hp = ROMEHyperParams.for_model(lm, config or "rome")
        hp.layer = layer
        if cfg["steps"] is not None:
            hp.v_num_grad_steps = cfg["steps"]
        if cfg["context"] is not None:
            hp.context_template_length_params = cfg["context"]
        if config is None:   # the old sweeps: covariance from the first tokens of the corpus
            hp.mom2_adjustment = not args.no_mom2
            hp.mom2_sample, hp.mom2_n_samples = "tokens", cfg["mom2_tokens"]
        elif cfg["mom2_tokens"] is not None and hp.mom2_adjustment:
            hp.mom2_sample, hp.mom2_n_samples = "tokens", cfg["mom2_tokens"]
        start = time.perf_counter()
        df = evaluate_edits(lm, "rome", args.relation, n=cfg["n"], hparams=hp, progress=False)
        seconds = time.perf_counter() - start
        row = {"model": lm.name, "device": str(lm.device), "relation": args.relation, "layer": layer,
               "config": config or "legacy", "n": len(df), "steps": hp.v_num_grad_steps,
               "context": str(hp.context_template_length_params),
               "mom2": hp.mom2_adjustment, "mom2_tokens": cfg["mom2_tokens"] if hp.mom2_adjustment else 0,
               "efficacy": df["reliability_prob"].mean(), "efficacy_acc": df["reliability_acc"].mean(),
               "paraphrase": df["generality_prob"].mean(), "paraphrase_acc": df["generality_acc"].mean(),
               "locality": df["locality_prob"].mean(), "locality_pre": df["locality_prob_pre"].mean(),
               "locality_acc": df["locality_acc"].mean(),
               crit: df[f"{crit}_prob"].mean(), "delta_norm": df["delta_norm"].mean(),
               "seconds": round(seconds, 1)}
        rows.append(row)
        print(pd.DataFrame([row]).to_string(index=False, header=len(rows) == 1), flush=True)
        pd.DataFrame(rows).to_csv(args.out, index=False)   # keep partial results
        print(f"-> {args.out}")
    if args.write_preset:
        if config is None:
            raise SystemExit("--write-preset needs --config paper|rome (the configuration the preset is for)")
        sweep = pd.DataFrame(rows)
        base = ROMEHyperParams.for_model(lm, config)
        try:
            csv_path = str(Path(args.out).resolve().relative_to(Path.cwd()))
        except ValueError:
            csv_path = args.out
        preset = preset_json(lm, base, config, sweep, csv_path)
        target = Path(args.write_preset)
        if target.name != f"{preset['model']}-{config}.json":
            raise SystemExit(f"--write-preset must name {preset['model']}-{config}.json, got {target.name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        # the preset format's own writer: checks the record as ROMEHyperParams.preset loads it
        path = write_preset(dataclasses.replace(base, layer=preset["hparams"]["layer"]), preset["model"],
                            config, match=preset["match"], layer_source=preset["layer_source"],
                            folder=target.parent)
        print(f"layer {preset['hparams']['layer']}: {preset['layer_source']['why']} -> {path}")


if __name__ == "__main__":
    main()
