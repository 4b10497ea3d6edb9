"""What LRC buys over the alternatives, on the demo teacher (Shakespeare, CPU).

Runs every method of `lrc distill --method` and LRC's ablations on the same teacher, data and student
architecture, each for the largest budget with a constant learning rate after warm-up, and reads the
held-out loss at each budget off the run's evaluation curve (so one run per method serves every budget;
a run with a schedule tuned to each budget could do a little better at the small ones). Writes the
results to BENCHMARKS.md (between markers), a PNG of the curves and a JSON file.

    python benchmarks/compare_methods.py [--budgets 20000 40000 80000] [--full] [--out bench-out]

By default it uses the `lrc demo --quick` teacher (cached by the demo); --full uses the full demo's.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from _markdown import write_block

from lrc.config import RunConfig
from lrc.data.plays import play_files
from lrc.train.run import default_cache_dir
from lrc.train.teacher import DEMO, DEMO_QUICK, build_teacher
from lrc.train.trainer import distill

VARIANTS = {
    "lrc (refit init)": dict(method="lrc"),
    "lrc, pca init": dict(method="lrc", init="pca"),
    "lrc, random init": dict(method="lrc", init="random"),
    "lrc, no clone loss": dict(method="lrc", clone_weight=0.0),
    "lrc, no FFN terms": dict(method="lrc", clone_gate=0.0, clone_up=0.0, clone_ffn_out=0.0),
    "lrc, no attention terms": dict(method="lrc", clone_q=0.0, clone_k=0.0, clone_v=0.0, clone_attn_out=0.0),
    "lrc, no KL": dict(method="lrc", kl_weight=0.0),
    "kd": dict(method="kd", init="random"),  # KD from random weights (the table's kd; --init refit starts from LRC's)
    "prune-kd": dict(method="prune-kd"),
    "scratch": dict(method="scratch"),
}
START, END = "<!-- compare_methods:start -->", "<!-- compare_methods:end -->"


def curve(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["tokens"], r["loss"]) for r in rows if r.get("split") == "val"]


def loss_at(points, tokens):
    """Held-out loss at `tokens` (linear interpolation in log-tokens between evaluations)."""
    import math

    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if t0 <= tokens <= t1:
            if t1 == t0:
                return l1
            a = (math.log(max(tokens, 1)) - math.log(max(t0, 1))) / (math.log(t1) - math.log(max(t0, 1)))
            return l0 + a * (l1 - l0)
    return points[-1][1] if tokens >= points[-1][0] else None


def tokens_to_reach(points, target):
    """First training tokens at which the held-out loss is <= target (interpolated), or None."""
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if l1 <= target:
            if l0 <= target:
                return t0
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return points[0][0] if points and points[0][1] <= target else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=int, nargs="+", default=[20_000, 40_000, 80_000])
    p.add_argument("--full", action="store_true", help="use the full demo's teacher and student sizes")
    p.add_argument("--out", default="bench-out")
    p.add_argument("--eval-every", type=int, default=6, help="steps between held-out evaluations")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches per evaluation")
    p.add_argument("--only", nargs="+", default=None, help="run only these variants")
    p.add_argument("--markdown", default="BENCHMARKS.md")
    p.add_argument("--from-results", action="store_true", help="rewrite BENCHMARKS.md from OUT/results.json")
    args = p.parse_args(argv)
    s = DEMO if args.full else DEMO_QUICK
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        results = json.loads((out / "results.json").read_text())
        write_markdown(results, sorted(args.budgets), s, Path(args.markdown), " ".join(["python"] + sys.argv))
        return 0
    cache = default_cache_dir().parent / "demo"
    train, val = play_files()
    teacher_dir, _, _ = build_teacher(s, train, val, cache)
    budgets = sorted(args.budgets)
    # --only adds to (or replaces in) the results of earlier runs, so the variants can run in short chunks
    saved = out / "results.json"
    results = json.loads(saved.read_text()) if args.only and saved.exists() else {}
    for name, opts in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        run = out / "runs" / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        if run.exists():
            shutil.rmtree(run)
        t0 = time.time()
        distill(RunConfig(
            teacher=str(teacher_dir), data=[str(x) for x in train], val_data=[str(x) for x in val],
            hidden_size=s.student_hidden, out=str(run), max_tokens=budgets[-1], batch_size=s.batch,
            seq_len=s.seq_len, schedule="constant", warmup_ratio=0.05,  # --lr auto, as every run by default
            eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=10**9, log_every=20,
            cache_dir=str(cache / "tokens"), **opts))
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        tps = [r["tokens_per_s"] for r in rows if r.get("split") == "train"]
        lr = yaml.safe_load((run / "config.yaml").read_text())["lr"]
        results[name] = {"curve": curve(run), "seconds": time.time() - t0, "lr": lr,
                         "tokens_per_s": sum(tps[1:]) / max(1, len(tps) - 1) if len(tps) > 1 else tps[0]}
        (out / "results.json").write_text(json.dumps(results, indent=1))
    results = {name: results[name] for name in VARIANTS if name in results}  # the table's order
    write_markdown(results, budgets, s, Path(args.markdown), " ".join(["python"] + sys.argv))
    return 0


def plot(results, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in results.items():
        pts = [(t, v) for t, v in r["curve"] if t > 0]
        ax.plot([t for t, _ in pts], [v for _, v in pts], label=name,
                linestyle="-" if name.startswith("lrc") else "--")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(results, budgets, s, md: Path, command: str):
    import math

    png = Path("benchmarks") / "compare_methods.png"
    png.parent.mkdir(exist_ok=True)
    plot(results, png)
    ref = results.get("lrc (refit init)")
    lrs = sorted({r["lr"] for r in results.values() if "lr" in r})
    lr_text = "auto (" + ", ".join(f"{x:.3g}" for x in lrs) + ")" if lrs else "auto"
    target = loss_at(ref["curve"], budgets[0]) if ref else None
    lines = [START, "", f"Teacher: the demo's Llama (hidden {s.teacher_hidden}, {s.teacher_layers} layers, vocabulary "
             f"{s.vocab}, {s.teacher_tokens:,} training tokens); students: hidden {s.student_hidden}, sequences of "
             f"{s.seq_len}, batch {s.batch}, lr {lr_text} constant after 5% warm-up; held-out: 4 whole plays.",
             "", "### Held-out loss by method and budget (nats/token; perplexity in brackets)", "",
             "| method | " + " | ".join(f"{b:,} tokens" for b in budgets) + " | tokens to reach LRC's loss at "
             f"{budgets[0]:,} | tokens to reach scratch's loss at {budgets[-1]:,} | tokens/s | wall time |",
             "|---|" + "---|" * (len(budgets) + 4)]
    scratch_final = loss_at(results["scratch"]["curve"], budgets[-1]) if "scratch" in results else None
    for name, r in results.items():
        cells = []
        for b in budgets:
            v = loss_at(r["curve"], b)
            cells.append("n/a" if v is None else f"{v:.3f} ({math.exp(v):.1f})")
        reach = tokens_to_reach(r["curve"], target) if target is not None else None
        reach_s = "not reached" if reach is None else f"{reach:,.0f}"
        if reach is not None and ref is not None and name != "lrc (refit init)":
            reach_s += f" ({reach / budgets[0]:.1f}x)"
        reach2 = tokens_to_reach(r["curve"], scratch_final) if scratch_final is not None else None
        reach2_s = "not reached" if reach2 is None else f"{reach2:,.0f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {reach_s} | {reach2_s} | {r['tokens_per_s']:,.0f} | "
                     f"{r['seconds']:.0f} s |")
    step0 = {n: r["curve"][0][1] for n, r in results.items() if r["curve"]}
    lines += ["", "Budgets are read off one constant-LR run per method (interpolated in log-tokens between "
              "evaluations every few steps); \"not reached\" means not within the largest budget. tokens/s and wall "
              "time include the periodic held-out evaluations (every 6 steps), which cost the LRC runs a teacher "
              "forward too; `lrc bench` below measures step throughput alone.",
              "", "Held-out loss at step 0: " + ", ".join(f"{n} {v:.3f}" for n, v in step0.items()) + ".", "",
              f"![held-out loss against tokens]({png.as_posix()})", "",
              f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
              f"Command: `{command}`.", "", END]
    print(write_block(md, START, END, lines, "LRC against the alternatives (demo teacher)"))


if __name__ == "__main__":
    sys.exit(main())
