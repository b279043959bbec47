"""``python -m kn_utils reproduce --model default --scale report [--out reports/<model>] [--sections ...]
[--time-budget S] [--shard K/N] [--render-only]`` (also under ``torchrun --nproc-per-node N -m kn_utils``)."""
from __future__ import annotations

HELP = ("run the paper's experiments into reports/<model>/records (only the items not yet there) and "
        "render REPORT.md (CSV + PNG) from every record of the folder")


def add_arguments(parser):
    from kn_utils.reproduce import SCALES, SECTIONS

    parser.add_argument("--scale", default="report", choices=tuple(SCALES),
                        help="smoke: seconds on a tiny model; report: the report minimum (issue 21); "
                             "paper: the paper's sizes (GPU)")
    parser.add_argument("--out", default=None, help="report folder (default reports/<model>)")
    parser.add_argument("--sections", nargs="+", default=None, choices=SECTIONS, help="a subset of the sections")
    parser.add_argument("--data-dir", default=None, help="data sets folder (default: $KN_DATA_DIR or ../shared/data)")
    parser.add_argument("--dtype", default=None, help="model dtype (float32, bfloat16, float16)")
    parser.add_argument("--size", action="append", default=[], metavar="NAME=VALUE",
                        help="override one size of the scale (repeatable), e.g. --size rome_n=30; a positive "
                             "integer, or 'none' (all the data holds) where meaningful")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no item after this many seconds; the items in progress finish, the "
                             "report is rendered (marked incomplete) and the command exits 0")
    parser.add_argument("--shard", default=None, metavar="K/N",
                        help="compute items K, K+N, K+2N, ... of each section (job arrays; torchrun sets "
                             "this from RANK / WORLD_SIZE)")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite REPORT.md, CSVs, figures and headline from the folder's records "
                             "without loading the model")


def parse_sizes(items) -> dict:
    """["rome_n=30", "max_relations=none"] -> {"rome_n": 30, "max_relations": None}; a malformed
    item raises ValueError naming it (positivity and names are checked by reproduce's _check_args)."""
    sizes = {}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            raise ValueError(f"--size takes NAME=VALUE, got {item!r}")
        if value.lower() in ("none", "all"):
            sizes[name] = None
            continue
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"--size {name}: {value!r} is not an integer (or 'none')") from None
    return sizes


def _device(device):
    """Under torchrun with GPUs each process takes its own (LOCAL_RANK)."""
    import os

    local = os.environ.get("LOCAL_RANK")
    if local is None or device not in (None, "cuda"):
        return device
    import torch

    return f"cuda:{int(local)}" if torch.cuda.is_available() else device


def run(args) -> int:
    from pathlib import Path

    from kn_utils.reproduce import _check_args, _safe_name, check_out, parse_shard, render_report, reproduce

    out = Path(args.out or f"reports/{_safe_name(args.model)}")
    if args.render_only:
        if not out.is_dir():
            raise NotADirectoryError(f"--render-only: {out} is not a report folder")
        check_out(out)
        report = render_report(out)
        print(f"{report.path} (rendered from records in {report.seconds:.1f} s)")
        return 1 if report.failed else 0
    # every argument is checked before the model loads
    sizes = parse_sizes(args.size)
    _check_args(args.scale, args.sections, sizes)
    shard = parse_shard(args.shard) if args.shard is not None else None
    if args.time_budget is not None and not args.time_budget > 0:
        raise ValueError(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    check_out(out)
    import kn_utils as ku

    lm = ku.load_model(args.model, device=_device(args.device), dtype=args.dtype)
    report = reproduce(lm, args.scale, out, sections=args.sections, data_dir=args.data_dir,
                       model_name=args.model, progress=True, sizes=sizes or None,
                       time_budget=args.time_budget, shard=shard)
    if not report.sections:       # a torchrun rank other than 0: rank 0 renders
        print(f"[reproduce] {report.computed} items computed ({report.seconds:.0f} s)")
        return 0
    meta = report.meta
    print(f"{report.path} ({report.seconds:.0f} s; {report.computed} items computed here"
          + ("; INCOMPLETE" if meta.get("incomplete") else "") + ")")
    if report.failed:
        print(f"FAILED sections (errors are in the report): {', '.join(report.failed)}")
        return 1
    return 0
