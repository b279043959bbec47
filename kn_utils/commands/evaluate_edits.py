"""``python -m kn_utils evaluate-edits --editor rome --relation P36 --n 100 --out results/``."""
from __future__ import annotations

import warnings

from kn_utils.checks import replace_file, writable_folder
from kn_utils.cli import inputs_checked, nonnegative_int, positive_int

HELP = "edit ParaRel facts (ROME or KN) and measure reliability, generality, locality, symmetry, synonymy"


def add_arguments(parser):
    parser.add_argument("--editor", default="rome", choices=("rome", "kn"))
    parser.add_argument("--relation", default=["P36"], nargs="+", choices=("P36", "P1376", "P101"),
                        help="one or more of P36 P1376 P101")
    parser.add_argument("--n", type=positive_int, default=None,
                        help="first N facts of each relation (default all)")
    parser.add_argument("--out", default="results", help="folder for the per-item CSVs and the summary")
    parser.add_argument("--data-dir", default=None, help="data sets folder (default: $KN_DATA_DIR or ../shared/data)")
    parser.add_argument("--layer", type=nonnegative_int, default=None,
                        help="ROME layer (default: the model's preset)")
    parser.add_argument("--steps", type=positive_int, default=None, help="ROME v* optimisation steps")
    parser.add_argument("--config", default="paper", choices=("paper", "rome"),
                        help="ROME preset configuration: 'paper' (the paper's code, C = I; default) or "
                             "'rome' (ROME's published settings, covariance statistics on)")
    parser.add_argument("--no-mom2", action="store_true", help="ROME without covariance statistics (C = I)")
    parser.add_argument("--dtype", default=None, help="model dtype (float32, bfloat16, float16)")


def run(args) -> int:
    import kn_utils as ku
    from kn_utils.data import BuiltinDataWarning
    from kn_utils.data.pararel import load_bags
    from kn_utils.editing.rome import ROMEHyperParams
    from kn_utils.evaluation import evaluate_edits, summarize_edits

    # before the model: a folder that cannot take the results, a missing or damaged data file
    out = writable_folder(args.out)
    with warnings.catch_warnings():   # the run itself says once where the facts come from
        warnings.simplefilter("ignore", BuiltinDataWarning)
        for rel in args.relation:
            load_bags(rel, data_dir=args.data_dir, n=args.n)
    lm = ku.load_model(args.model, device=args.device, dtype=args.dtype)
    hparams = None
    if args.editor == "rome":
        hparams = ROMEHyperParams.for_model(lm, args.config)
        if args.layer is not None:
            hparams.layer = lm.arch.check_layer(args.layer, "--layer")
        if args.steps is not None:
            hparams.v_num_grad_steps = args.steps
        if args.no_mom2:
            hparams.mom2_adjustment = False
    inputs_checked()
    frames = {}
    for rel in args.relation:
        df = evaluate_edits(lm, editor=args.editor, relation=rel, n=args.n, data_dir=args.data_dir,
                            hparams=hparams)
        path = out / f"edits_{args.editor}_{rel}.csv"
        # a CSV keeps no attrs: the source goes in a column, so a file from the mini set says so
        table = df.assign(data_source=df.attrs["data_source"])
        replace_file(path, lambda tmp: table.to_csv(tmp, index=False))
        print(f"{rel}: {len(df)} items ({df.attrs.get('n_skipped', 0)} skipped) from "
              f"{df.attrs['data_source']} -> {path}")
        frames[rel] = df
    table = summarize_edits(frames)
    summary = out / f"edits_{args.editor}_summary.csv"
    replace_file(summary, lambda tmp: table.to_csv(tmp, index=False))
    print(f"summary -> {summary}")
    return 0
