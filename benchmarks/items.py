"""Items per hour: a Table 1 ROME item and an AIE fact, an older commit against this tree, in one run.

Each measurement is a fresh process (``--worker``) importing kn_utils from one tree (PYTHONPATH),
one thread; the variants run interleaved, round after round (the first variant alternates), and
the medians are reported.  The old tree is a detached ``git worktree`` of ``--old`` (default
42640b7), made once under ``--old-tree``.

* ``rome``: ``evaluate_edits(lm, "rome", relation, n=N)`` with the model's preset (the paper's
  configuration: 20 Adam steps, 21 context templates), seconds per item.  Variants: ``old``;
  ``new`` (the same call on this tree: v* steps from the edited layer); ``new-batched`` (this tree,
  ``evaluate_edits(..., batch_rome=True)``: the N requests' v* in one batch by ``rome_compute``, a
  request's rows leaving the batch when it stops, then apply / measure / restore each item, as
  Table 1's ``compute_batch`` does).
* ``aie``: one known fact traced for the three kinds (hidden, mlp, attn): ``old`` calls
  ``average_indirect_effect`` per kind, ``new`` calls ``average_indirect_effects`` once.

Checks: the ROME rows' criteria must agree between variants and the AIE tables be identical; the
largest differences are printed.

    python benchmarks/items.py --what rome --n 6 --rounds 2
    python benchmarks/items.py --what aie --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CRITERIA = ["reliability_acc", "reliability_prob", "generality_acc", "generality_prob", "locality_acc",
            "locality_prob"]


# ----------------------------------------------------------------------------- worker (one tree)

def worker(args):
    import pandas as pd
    import torch

    import kn_utils as ku
    torch.set_num_threads(1)
    lm = ku.load_model(args.model)
    out = {"kn_utils": ku.__file__}
    if args.what == "rome":
        from kn_utils.editing.rome import ROMEHyperParams, context_templates
        hp = ROMEHyperParams.for_model(lm).resolve(lm)
        context_templates(lm, hp.context_template_length_params, hp.seed)   # generated once, cached
        start = time.perf_counter()
        # new-batched: every item's update by one rome_compute call (v* of the N requests in one
        # batch, a stopped request's rows dropped), then apply / measure / restore each
        extra = {"batch_rome": True} if args.variant == "new-batched" else {}
        df = ku.evaluate_edits(lm, "rome", args.relation, n=args.n, progress=False, **extra)
        out["seconds"] = (time.perf_counter() - start) / len(df)
        out["rows"] = df[["p_new_post", "p_true_post", "delta_norm"] + CRITERIA].to_dict("list")
    else:
        facts = ku.filter_known(lm, ku.load_known_facts(), 1)
        start = time.perf_counter()
        if args.variant == "old":
            frames = {k: ku.average_indirect_effect(lm, facts, kind=k, progress=False)
                      for k in ("hidden", "mlp", "attn")}
        else:
            frames = ku.average_indirect_effects(lm, facts, kinds=("hidden", "mlp", "attn"), progress=False)
        out["seconds"] = (time.perf_counter() - start) / len(facts)
        table = pd.concat([df.assign(kind=k) for k, df in frames.items()], ignore_index=True)
        out["rows"] = table[["kind", "token_class", "layer", "aie", "score"]].to_dict("list")
        out["fact"] = facts.iloc[0][["prompt", "subject"]].tolist()
    Path(args.out).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- driver

def old_tree(commit: str, path: Path) -> Path:
    if not (path / "kn_utils").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True)
    return path


def run_variant(tree: Path, variant: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.setdefault("KN_DATA_DIR", "/work/shared/data")
    cmd = [sys.executable, str(HERE / "items.py"), "--worker", "--what", args.what, "--variant", variant,
           "--model", args.model, "--relation", args.relation, "--n", str(args.n), "--out", out]
    subprocess.run(cmd, env=env, cwd=str(tree), check=True, stdout=subprocess.DEVNULL)
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def compare(a: dict, b: dict) -> str:
    diffs = []
    for key, values in a["rows"].items():
        other = b["rows"][key]
        if all(isinstance(v, (int, float)) for v in values):
            rel = max((abs(x - y) / max(abs(x), abs(y), 1e-12) for x, y in zip(values, other)), default=0)
            diffs.append(f"{key} {max((abs(x - y) for x, y in zip(values, other)), default=0):.1e} "
                         f"(rel {rel:.1e})")
        elif values != other:
            diffs.append(f"{key} DIFFERS")
    return ", ".join(diffs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("rome", "aie"), default="rome")
    parser.add_argument("--model", default="default")
    parser.add_argument("--relation", default="P36")
    parser.add_argument("--n", type=int, default=3, help="rome: items per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--old", default="42640b7")
    parser.add_argument("--old-tree", default="/tmp/old42640")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="rome: which of old, new, new-batched to run (default: all three; old first)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="new", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    trees = {"old": old_tree(args.old, Path(args.old_tree)), "new": ROOT, "new-batched": ROOT}
    variants = ["old", "new", "new-batched"] if args.what == "rome" else ["old", "new"]
    if args.variants:
        unknown = sorted(set(args.variants) - set(variants))
        if unknown or "old" not in args.variants:
            parser.error(f"--variants: choose 'old' and any of {variants[1:]} (got {args.variants})")
        variants = [v for v in variants if v in args.variants]
    seconds = {v: [] for v in variants}
    last = {}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            result = run_variant(trees[v], v, args)
            assert Path(result["kn_utils"]).resolve().is_relative_to(trees[v].resolve()), result["kn_utils"]
            seconds[v].append(result["seconds"])
            last[v] = result
            print(f"round {r + 1} {v:12s} {result['seconds']:8.1f} s per item", flush=True)
    unit = f"Table 1 ROME item ({args.relation}, n={args.n})" if args.what == "rome" else \
        f"AIE fact (3 kinds: {last['old'].get('fact')})"
    print(f"\n{unit}, {args.model}, one thread, {args.rounds} rounds (medians; box shared with other jobs):")
    base = statistics.median(seconds["old"])
    for v in variants:
        med = statistics.median(seconds[v])
        print(f"  {v:12s} {med:8.1f} s/item  {3600 / med:7.1f} items/h  speed-up x{base / med:.2f}  "
              f"(runs: {', '.join(f'{s:.1f}' for s in seconds[v])})")
    for v in variants[1:]:   # each round's old and new ran back to back: their ratio is less noisy
        ratios = [o / s for o, s in zip(seconds["old"], seconds[v])]
        print(f"  {v}: per-round speed-up x{statistics.median(ratios):.2f} (median of "
              f"{', '.join(f'{r:.2f}' for r in ratios)}); largest differences from old: "
              f"{compare(last['old'], last[v])}")
    if "new-batched" in seconds and "new" in seconds:
        ratios = [o / s for o, s in zip(seconds["new"], seconds["new-batched"])]
        print(f"  new-batched vs new: per-round speed-up x{statistics.median(ratios):.2f} "
              f"({', '.join(f'{r:.2f}' for r in ratios)}); differences: {compare(last['new'], last['new-batched'])}")


if __name__ == "__main__":
    main()
