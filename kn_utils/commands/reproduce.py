"""``python -m kn_utils reproduce --model default --scale report [--out reports/<model>] [--sections ...]``."""
from __future__ import annotations

HELP = "run every experiment of the paper at a scale and write reports/<model>/REPORT.md (CSV + PNG)"


def add_arguments(parser):
    from kn_utils.reproduce import SCALES, SECTIONS

    parser.add_argument("--scale", default="report", choices=tuple(SCALES),
                        help="smoke: seconds on a tiny model; report: issue 12's sizes for a CPU; paper: the paper's sizes (GPU)")
    parser.add_argument("--out", default=None, help="report folder (default reports/<model>)")
    parser.add_argument("--sections", nargs="+", default=None, choices=SECTIONS, help="a subset of the sections")
    parser.add_argument("--data-dir", default=None, help="data sets folder (default: $KN_DATA_DIR or ../shared/data)")
    parser.add_argument("--dtype", default=None, help="model dtype (float32, bfloat16, float16)")
    parser.add_argument("--size", action="append", default=[], metavar="NAME=VALUE",
                        help="override one size of the scale (repeatable), e.g. --size rome_n=30; "
                             "the report lists the sizes used and says they were overridden")


def parse_sizes(items) -> dict:
    """["rome_n=30", "max_relations=none"] -> {"rome_n": 30, "max_relations": None}."""
    sizes = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--size takes NAME=VALUE, got {item!r}")
        value = value.strip()
        if value.lower() in ("none", "all"):
            sizes[name.strip()] = None
            continue
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--size {name.strip()}: {value!r} is not an integer (or 'none')") from None
    return sizes


def run(args) -> int:
    import kn_utils as ku
    from kn_utils.reproduce import _safe_name, reproduce

    from kn_utils.reproduce import _check_args

    sizes = parse_sizes(args.size)
    _check_args(args.scale, args.sections, sizes)   # a bad size fails before the model loads
    lm = ku.load_model(args.model, device=args.device, dtype=args.dtype)
    out = args.out or f"reports/{_safe_name(args.model)}"
    report = reproduce(lm, args.scale, out, sections=args.sections, data_dir=args.data_dir,
                       model_name=args.model, progress=True, sizes=sizes or None)
    print(f"{report.path} ({report.seconds:.0f} s)")
    if report.failed:
        print(f"FAILED sections (errors are in the report): {', '.join(report.failed)}")
        return 1
    return 0
