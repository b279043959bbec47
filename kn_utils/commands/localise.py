"""``python -m kn_utils localise``: knowledge neurons of BLiMP paradigms, one prompt set per number.

    python -m kn_utils localise --model default --paradigm regular_plural_subject_verb_agreement_1 \
        --n 100 --out results/

For each paradigm and each group of its pairs (singular / plural targets, or anaphor gender), the
first ``--n`` pairs whose good word is one token are attributed with integrated gradients and
refined into KNs (adaptive τ).  Written under ``--out``:

* ``localise_<UID>.json``   model, data source (``data_source``: file or builtin:<file>, items), per group: neurons, τ, |KN| at τ = 0.7, R²₁, and
  BLiMP accuracy before / after suppressing the group's KNs;
* ``localise_<UID>_groups.csv``  the same per group, one row each;
* ``localise_<UID>_prompts.csv`` per prompt: top neuron and score, coarse-neuron count, the summed
  score of the group's KNs;
* ``figures/``  attribution heatmaps around the KNs and the KNs' layer distribution.

The search itself is :func:`kn_utils.localisation.localise_paradigm`; this module only parses the
arguments, writes its tables and draws its figures.
"""
from __future__ import annotations

import json
import re
import warnings

from ..checks import replace_file, writable_folder
from ..cli import fraction, inputs_checked, int_at_least, positive_int
from ..localisation import localise_paradigm  # noqa: F401  (the library function; also importable here)

HELP = "find knowledge neurons of BLiMP paradigms (per number) and write CSV/JSON and figures"


def add_arguments(parser):
    parser.add_argument("--paradigm", action="append", required=True,
                        help="BLiMP UID or short name (dna_1, with_adj_1, ...); repeat or comma-separate")
    parser.add_argument("--n", type=int_at_least(2, " (R²₁ and tau need several prompts)"), default=20,
                        help="prompts per group for the KN search (>= 2)")
    parser.add_argument("--eval-n", type=positive_int, default=None,
                        help="pairs per paradigm for BLiMP accuracy (default: --n times the groups)")
    parser.add_argument("--steps", type=positive_int, default=20, help="integrated-gradients points")
    parser.add_argument("--threshold", type=fraction, default=0.2, help="coarse threshold, fraction of max")
    parser.add_argument("--tau", type=fraction, default=0.7, help="starting refinement threshold")
    parser.add_argument("--no-adaptive", action="store_true", help="keep tau fixed")
    parser.add_argument("--tau-mode", choices=("strict", "paper"), default="strict",
                        help="strict: more than tau of the prompts; paper: the paper code's "
                             "floating-point tau steps")
    parser.add_argument("--data-dir", default=None, help="folder with blimp/ (default: $KN_DATA_DIR)")
    parser.add_argument("--out", default="results", help="output folder")
    parser.add_argument("--no-figures", action="store_true")


def _paradigms(values) -> list[str]:
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def run(args) -> int:
    import kn_utils as ku

    from ..data import BuiltinDataWarning, blimp
    from ..plotting import attribution as plots

    # before the model: unknown paradigms, damaged data files, a folder that cannot take the results
    out = writable_folder(args.out)
    uids = [blimp.resolve_uid(name, args.data_dir) for name in _paradigms(args.paradigm) or [""]]
    with warnings.catch_warnings():   # the run itself says once where the pairs come from
        warnings.simplefilter("ignore", BuiltinDataWarning)
        for uid in uids:
            blimp.load_paradigm(uid, args.data_dir)
    lm = ku.load_model(args.model, device=args.device)
    inputs_checked()
    for uid in uids:
        summary, groups, prompts, maps = localise_paradigm(
            lm, uid, n=args.n, eval_n=args.eval_n, steps=args.steps, threshold=args.threshold,
            tau=args.tau, adaptive=not args.no_adaptive, data_dir=args.data_dir, tau_mode=args.tau_mode)
        uid = summary["paradigm"]
        replace_file(out / f"localise_{uid}.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
        for name, table in (("groups", groups), ("prompts", prompts)):
            table = table.assign(data_source=summary["data_source"])   # a CSV keeps no attrs
            replace_file(out / f"localise_{uid}_{name}.csv", lambda tmp: table.to_csv(tmp, index=False))
        print(f"{uid}: pairs from {summary['data_source']}")
        print(groups[["paradigm", "group", "n_prompts", "kn_count_tau_start", "tau", "r2", "neurons"]]
              .to_string(index=False))
        for group, info in summary["groups"].items():
            print(f"  {group}: BLiMP accuracy {info['accuracy_before']:.3f} -> "
                  f"{info['accuracy_after_suppression']:.3f} with its {len(info['neurons'])} KNs suppressed")
        if args.no_figures:
            continue
        figures = out / "figures"
        slug = re.sub(r"[^A-Za-z0-9]+", "_", str(uid))
        for group, m in maps.items():
            neurons = [tuple(x) for x in summary["groups"][str(group)]["neurons"]] or None
            plots.plot_attribution_heatmap(m, neurons, width=6, title=f"{uid}: {group}",
                                           save=f"{slug}_{group}_heatmap", folder=figures)
        plots.plot_layer_distribution(
            {str(g): [tuple(x) for x in info["neurons"]] for g, info in summary["groups"].items()},
            lm.arch.n_layers, normalise=False, title=f"{uid}: KN layers",
            save=f"{slug}_layers", folder=figures)
    print(f"wrote {out.resolve()}")
    return 0
