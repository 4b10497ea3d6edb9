"""Where should a student's parameters go? Hidden-only LRC against LRC that also narrows the FFN or drops
layers, and prune-kd, at equal parameter budgets and equal training tokens (demo teacher, CPU).

For each budget (a share of the teacher's non-embedding parameters) the shapes are solved with
`lrc.student.shape.solve` (the same solver as `--target-params`, counting non-embedding parameters):

* lrc hidden: only the hidden size shrinks (the paper's LRC);
* lrc hidden+ffn: hidden and FFN width (`--ffn-size`) shrink by a common factor;
* lrc hidden+depth: hidden size and depth (`--layers`, the least important layers dropped) shrink;
* prune-kd: the hidden-only shape, width-pruned from the teacher and trained with CE + KL.

Every run trains on the same number of tokens with the same schedule; the held-out loss is measured at the
end (and at step 0, the initialisation). Writes the table into BENCHMARKS.md (between markers) and
OUT/results.json.

    python benchmarks/compare_sizes.py [--budgets 0.5 0.25] [--tokens 61440] [--out bench-sizes]

It uses the `lrc demo --quick` teacher (cached by the demo; trained here first if it is not); --full the
full demo's.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from _markdown import write_block

from lrc.config import RunConfig
from lrc.data.plays import play_files
from lrc.model.teacher import load_teacher_config
from lrc.student.shape import param_counter, solve
from lrc.train.run import default_cache_dir
from lrc.train.teacher import DEMO, DEMO_QUICK, build_teacher
from lrc.train.trainer import distill

VARIANTS = {
    "lrc hidden": (("hidden",), dict(method="lrc")),
    "lrc hidden+ffn": (("hidden", "ffn"), dict(method="lrc")),
    "lrc hidden+depth": (("hidden", "layers"), dict(method="lrc")),
    "prune-kd (hidden)": (("hidden",), dict(method="prune-kd")),
}
START, END = "<!-- compare_sizes:start -->", "<!-- compare_sizes:end -->"


def val_losses(run: Path, split: str = "val") -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["tokens"], r["loss"]) for r in rows if r.get("split") == split]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25],
                   help="shares of the teacher's non-embedding parameters")
    p.add_argument("--tokens", type=int, default=61_440, help="training tokens of every run")
    p.add_argument("--eval-batches", type=int, default=16, help="held-out batches of the final evaluation")
    p.add_argument("--out", default="bench-sizes")
    p.add_argument("--only", nargs="+", default=None, help="run only these variants")
    p.add_argument("--markdown", default="BENCHMARKS.md")
    p.add_argument("--full", action="store_true", help="use the full demo's teacher (trained first unless cached)")
    args = p.parse_args(argv)
    s = DEMO if args.full else DEMO_QUICK
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = default_cache_dir().parent / "demo"
    train, val = play_files()
    teacher_dir, _, _ = build_teacher(s, train, val, cache)
    tcfg = load_teacher_config(str(teacher_dir))
    counter = param_counter(tcfg)
    full = counter.non_embedding(tcfg.hidden_size, tcfg.intermediate_size, tcfg.num_hidden_layers)
    results: dict = {"teacher_non_embedding": full, "runs": []}
    for budget in args.budgets:
        for name, (dims, opts) in VARIANTS.items():
            if args.only and name not in args.only:
                continue
            sol = solve(tcfg, int(budget * full), dims, count=counter.non_embedding)
            shape = dict(hidden_size=sol.hidden,
                         ffn_size=sol.ffn if sol.ffn < tcfg.intermediate_size else None,
                         layers=sol.layers if sol.layers < tcfg.num_hidden_layers else None)
            run = out / "runs" / f"{budget:g}-{name.replace(' ', '_').replace('(', '').replace(')', '')}"
            if run.exists():
                shutil.rmtree(run)
            t0 = time.time()
            cfg = RunConfig(teacher=str(teacher_dir), data=[str(x) for x in train], val_data=[str(x) for x in val],
                            out=str(run), max_tokens=args.tokens, batch_size=s.batch, seq_len=s.seq_len,
                            lr="auto", schedule="cosine", warmup_ratio=0.05, eval_every=0,
                            eval_batches=args.eval_batches, save_every=10**9, log_every=10,
                            cache_dir=str(cache / "tokens"), **shape, **opts)
            distill(cfg)
            losses = val_losses(run)
            results["teacher_loss"] = val_losses(run, "val_teacher")[0][1]
            results["runs"].append({
                "budget": budget, "variant": name, "hidden": sol.hidden, "ffn": sol.ffn, "layers": sol.layers,
                "drop_layers": cfg.student.drop_layers, "non_embedding": sol.params, "total": counter(sol.hidden,
                                                                                                      sol.ffn,
                                                                                             sol.layers),
                "step0": losses[0][1], "final": losses[-1][1], "tokens": losses[-1][0],
                "seconds": time.time() - t0})
            (out / "results.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, args, s, Path(args.markdown), " ".join(["python", *sys.argv]))
    return 0


def write_markdown(results: dict, args, s, md: Path, command: str) -> None:
    runs = results["runs"]
    full = results["teacher_non_embedding"]
    lines = [START, "", f"Teacher: the `lrc demo{'' if args.full else ' --quick'}` Llama (hidden {s.teacher_hidden}, "
             f"FFN {s.ffn}, {s.teacher_layers} layers, vocabulary {s.vocab}, tied; {full:,} non-embedding parameters; "
             f"trained on {s.teacher_tokens:,} tokens; held-out loss {results['teacher_loss']:.3f}). Every "
             f"student trains on {args.tokens:,} tokens (sequences of {s.seq_len}, batch {s.batch}, lr "
             f"auto cosine after 5% warm-up, pca init, default loss weights); held-out: 4 whole plays, "
             f"{args.eval_batches} batches.", "",
             "| budget | variant | shape (hidden / FFN / layers) | non-embedding params | all params | "
             "held-out loss at step 0 | held-out loss at the end | vs lrc hidden | wall time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for budget in sorted({r["budget"] for r in runs}, reverse=True):
        group = [r for r in runs if r["budget"] == budget]
        ref = next((r for r in group if r["variant"] == "lrc hidden"), None)
        for r in group:
            delta = "" if ref is None or r is ref else f"{r['final'] - ref['final']:+.3f}"
            dropped = f" (dropped {r['drop_layers']})" if r.get("drop_layers") else ""
            lines.append(f"| {budget:.0%} | {r['variant']} | {r['hidden']} / {r['ffn']} / {r['layers']}{dropped} | "
                         f"{r['non_embedding']:,} ({r['non_embedding'] / full:.1%}) | {r['total']:,} | "
                         f"{r['step0']:.3f} | {r['final']:.3f} ({math.exp(r['final']):.1f}) | {delta} | "
                         f"{r['seconds']:.0f} s |")
    lines += ["", f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
              f"Command: `{command}`.", "", END]
    print(write_block(md, START, END, lines, "Where the parameters go: FFN width and depth (issue 13)"))


if __name__ == "__main__":
    sys.exit(main())
