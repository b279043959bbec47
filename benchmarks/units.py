"""Items per hour of every experiment unit: an older commit (default 42640b7) and this tree, side by side.

For each unit, two fresh processes start together, one thread each (one per core of a 2-core box):
one imports kn_utils from the old tree, one from this tree; each loads the model and runs its own
``reproduce(lm, "report", <temp folder>, sections=[unit], sizes=SIZES)``, and reports the wall time
of that call (model load excluded; planning and rendering included, as a user pays them) and the
items it computed.  The two share the box the same way, so their ratio compares the code, not the
load; run it on an otherwise quiet machine for absolute numbers.

Items: this tree's ``n_done`` of the section (report.json); the old tree's rows of the section's
item table (Table 1 / CounterFact ``items``, Dai / Table 9 ``facts``, Fig 6b / Table 8 / BLiMP
``summary`` rows, tracing: the traced prompts, ``aie_n`` per set).  SIZES keeps the report scale's
per-item settings (IG steps, noise samples, ROME's configuration) except where noted, and cuts the
number of items; Fig 6b's and Table 8's bags are smaller (``bag_prompts``, ``fig6b_pairs``) so that
their four bags fit, and BLiMP reads 50 pairs per paradigm.  This tree runs the paper's ROME
configuration only (``rome_configs`` = 1), as the old tree did.  Fig 6b's protocol changed (issue
17: per-prompt suppression and Dai's weight edit), so its items are not the same work.

    python benchmarks/units.py                      # every unit, default model
    python benchmarks/units.py --units table1 tracing --old 42640b7
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
UNITS = ("table1", "counterfact", "dai", "fig6b", "table9", "blimp", "table8", "tracing")
SIZES = dict(rome_n=2, kn_n=1, counterfact_n=2, facts_per_relation=1, max_relations=1, blimp_n=50,
             bag_prompts=10, fig6b_pairs=50, aie_n=1, agreement_pool=20)
NEW_ONLY = dict(rome_configs=1)
OLD_TABLES = {"table1": "items", "counterfact": "items", "dai": "facts", "table9": "facts", "fig6b": "summary",
              "table8": "summary", "blimp": "summary"}


def worker(args):
    import torch

    import kn_utils as ku
    from kn_utils import reproduce as rp

    torch.set_num_threads(1)
    lm = ku.load_model(args.model)
    sizes = dict(SIZES, **(NEW_ONLY if args.tree == "new" else {}))
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        rep = rp.reproduce(lm, "report", out, sections=[args.unit], sizes=sizes,
                           data_dir=os.environ.get("KN_DATA_DIR"), model_name=args.model)
        seconds = time.perf_counter() - start
        if args.tree == "new":
            st = rep.meta["sections"][args.unit]
            items, failed = st["n_done"], bool(rep.failed)
        else:
            sec = next(s for s in rep.sections if s.key == args.unit)
            failed = bool(sec.error)
            if args.unit == "tracing":
                items = SIZES["aie_n"] * 3      # facts, DNA and SVA prompts, aie_n each
            else:
                table = sec.tables.get(OLD_TABLES[args.unit])
                items = 0 if table is None else len(table)
    Path(args.out).write_text(json.dumps({"seconds": seconds, "items": items, "failed": failed,
                                          "kn_utils": ku.__file__}))


def old_tree(commit: str, path: Path) -> Path:
    if not (path / "kn_utils").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True)
    return path


def start(tree: Path, which: str, unit: str, args):
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.setdefault("KN_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    cmd = [sys.executable, str(HERE / "units.py"), "--worker", "--tree", which, "--unit", unit,
           "--model", args.model, "--out", out]
    return subprocess.Popen(cmd, env=env, cwd=str(tree), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", nargs="+", default=list(UNITS), choices=UNITS)
    parser.add_argument("--model", default="default")
    parser.add_argument("--old", default="42640b7")
    parser.add_argument("--old-tree", default="/tmp/old42640")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", default="new", help=argparse.SUPPRESS)
    parser.add_argument("--unit", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    trees = {"old": old_tree(args.old, Path(args.old_tree)), "new": ROOT}
    print(f"{args.model}, one thread per process, old ({args.old}) and new side by side; sizes {SIZES} "
          f"(+ {NEW_ONLY} on the new tree)\n")
    print(f"| unit | old items | old s | old items/h | new items | new s | new items/h | speed-up |")
    print(f"|---|---|---|---|---|---|---|---|")
    for unit in args.units:
        procs = {which: start(tree, which, unit, args) for which, tree in trees.items()}
        res = {}
        for which, (proc, out) in procs.items():
            if proc.wait() != 0:
                res[which] = None
                continue
            res[which] = json.loads(Path(out).read_text())
            os.unlink(out)
            assert Path(res[which]["kn_utils"]).resolve().is_relative_to(trees[which].resolve())
        cells = []
        for which in ("old", "new"):
            r = res[which]
            if r is None or r["failed"] or not r["items"]:
                cells += ["failed" if r is None or r["failed"] else "0", "", ""]
            else:
                cells += [str(r["items"]), f"{r['seconds']:.1f}", f"{3600 * r['items'] / r['seconds']:.0f}"]
        ok = all(res[w] and res[w]["items"] and not res[w]["failed"] for w in ("old", "new"))
        ratio = (res["old"]["seconds"] / res["old"]["items"]) / (res["new"]["seconds"] / res["new"]["items"]) \
            if ok else float("nan")
        print(f"| {unit} | " + " | ".join(cells) + f" | x{ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
