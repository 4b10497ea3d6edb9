"""A free student's held-out loss at explicit learning rates, on the budget curves' teachers and budgets (the
measurements behind `lrc.optim.lr_rule.free_lr_from_start`; BENCHMARKS.md, "The step a student from LRC's start
takes"). Each cell is one `budget_curves.one_run` with `--lr` given; finished cells are read back from OUT.

    python benchmarks/free_lr_sweep.py --teacher demo --widths 64 --shares 0.01 0.03 0.1 --lrs 5e-4 1e-3 \\
        [--seeds 0 1] [--method kd] [--set ce_weight=0 ...] [--out bench-out/kd-lr]

Results: one JSON per cell in OUT, and all of them in benchmarks/free_lr_sweep_results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import budget_curves as bc

from lrc.data.plays import play_files
from lrc.train.run import default_cache_dir
from lrc.train.teacher import build_teacher


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", choices=sorted(bc.TEACHERS), default="strong")
    p.add_argument("--widths", type=int, nargs="+", default=[128])
    p.add_argument("--shares", type=float, nargs="+", required=True)
    p.add_argument("--lrs", type=float, nargs="+", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--method", default="kd", help="kd (from LRC's start) or another --method")
    p.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE",
                   help="other RunConfig options for every cell, e.g. ce_weight=0 min_lr_ratio=0.1 (named in the file)")
    p.add_argument("--out", default="bench-out/kd-lr")
    args = p.parse_args(argv)
    extra = {k: _number(v) for k, v in (item.split("=", 1) for item in args.set)}
    tag = "".join(f"-{k}{v}" for k, v in sorted(extra.items()))
    recipe = bc.TEACHERS[args.teacher]
    cache = default_cache_dir().parent / "demo"
    train, val = play_files()
    teacher, _, _ = build_teacher(recipe, train, val, cache)
    opts = dict(method=args.method, init="refit") if args.method == "kd" else dict(method=args.method)
    opts.update(extra)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for width in args.widths:
        for share in args.shares:
            tokens = int(round(share * recipe.teacher_tokens))
            for lr in args.lrs:
                for seed in args.seeds:
                    name = f"{args.teacher}-{args.method}-w{width}-t{tokens}-lr{lr:g}{tag}-s{seed}.json"
                    if (out / name).exists():
                        r = json.loads((out / name).read_text())
                    else:
                        r = bc.one_run(recipe, teacher, train, val, out / "run", cache, width, tokens, seed, 16,
                                       dict(opts, lr=lr))
                        (out / name).write_text(json.dumps(r))
                    print(f"[sweep] {name}: {bc.rel(r):+.2%} in {r['seconds']:.0f} s", flush=True)
    every = {f.stem: json.loads(f.read_text()) for f in sorted(out.glob("*.json"))}
    Path("benchmarks/free_lr_sweep_results.json").write_text(json.dumps(every, indent=1) + "\n")
    return 0


def _number(text: str):
    try:
        return float(text) if any(c in text for c in ".e") else int(text)
    except ValueError:
        return text


if __name__ == "__main__":
    sys.exit(main())
