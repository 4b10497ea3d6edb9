"""Which method gives the best student for a budget: held-out loss against training tokens (and wall time) at
a few shares of the teacher's own training tokens, half and quarter width, for LRC (and LRC without its clone
terms, on the default's loss: the parametrisation alone), kd from LRC's start with and without the clone terms,
LRC switching to free weights halfway (`--free-after 0.5`), prune-kd and scratch.

Two teachers of the demo's shape: `strong` (`lrc.train.teacher.STRONG`, trained here on 5M tokens, 10x the demo
teacher's and several epochs of the training plays, so that no student reaches it within the budgets) and `demo`
(`DEMO`, 500K tokens: undertrained, its students pass it). Every run is a separate `lrc distill` with its own
budget (`--max-tokens`, cosine schedule to that budget, `--lr auto`, the defaults otherwise), evaluated at its
end on the held-out plays; the teacher's loss is measured on the same windows. `--lr auto` is each method's own
rule (LRC's projections: `auto_lr`; a student from LRC's start: `free_lr_from_start`, from its measured KL;
prune-kd and scratch: `auto_lr(free=True)`). Results go to OUT/results.json
(runs added by seed: a rerun with other seeds adds to them), a PNG per teacher and a block of BENCHMARKS.md per
teacher.

    python benchmarks/budget_curves.py [--teacher strong] [--shares 0.01 0.03 0.1 0.3] [--widths 128 64]
        [--seeds 0 1] [--only METHOD ...] [--out bench-out/budget]
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
from _markdown import write_block

from lrc.config import RunConfig
from lrc.data.plays import play_files
from lrc.train.run import default_cache_dir
from lrc.train.teacher import DEMO, STRONG, Recipe, build_teacher
from lrc.train.trainer import distill

METHODS = {
    "lrc": dict(method="lrc"),
    # the low-rank parametrisation alone: LRC's loss without its clone terms, the default's CE weight and lr floor
    "lrc without clone terms": dict(method="lrc", clone_weight=0.0, ce_weight=0.25, min_lr_ratio=0.1),
    "kd from LRC's start": dict(method="kd", init="refit"),
    "kd from LRC's start + clone terms": dict(method="kd", init="refit", keep_clone_terms=True),
    "lrc, free weights after 50%": dict(method="lrc", free_after=0.5),
    "prune-kd": dict(method="prune-kd"),
    "scratch": dict(method="scratch"),
}
TEACHERS = {"strong": STRONG, "demo": DEMO}
DEFAULT = "kd from LRC's start"  # what `lrc distill` runs without --method


def markers(teacher: str) -> tuple[str, str]:
    name = "budget_curves" if teacher == "strong" else f"budget_curves_{teacher}"
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def one_run(s: Recipe, teacher: Path, train, val, out: Path, cache: Path, width: int, tokens: int, seed: int,
            eval_batches: int, opts: dict) -> dict:
    if out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    distill(RunConfig(teacher=str(teacher), data=[str(x) for x in train], val_data=[str(x) for x in val],
                      hidden_size=width, out=str(out), max_tokens=tokens, batch_size=s.batch, seq_len=s.seq_len,
                      seed=seed, eval_every=0, eval_batches=eval_batches, save_every=10**9, log_every=50,
                      cache_dir=str(cache / "tokens"), **opts), explicit=set(opts))  # opts as if given
    seconds = time.time() - t0
    rows = _records(out)
    final = [r for r in rows if r.get("split") == "val"][-1]
    teacher_loss = next(r["loss"] for r in rows if r.get("split") == "val_teacher")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {"loss": final["loss"], "teacher_loss": teacher_loss, "tokens": final["tokens"], "seconds": seconds}


def rel(r: dict) -> float:
    return r["loss"] / r["teacher_loss"] - 1.0


def write_markdown(name: str, results: dict, path: Path, command: str) -> None:
    s = TEACHERS[name]
    start, end = markers(name)
    widths = sorted({int(w) for w in results}, reverse=True)
    lines = [start, "",
             f"Teacher: `lrc.train.teacher.{name.upper()}` (Llama, hidden {s.teacher_hidden}, {s.teacher_layers} "
             f"layers, vocabulary {s.vocab}, trained here on {s.teacher_tokens:,} tokens of the training "
             "plays); held-out: 4 whole plays. Each cell: held-out loss relative to the teacher's on the same "
             "windows (lower is better; negative: the student passes the teacher), mean over seeds with +- half "
             "the spread where there are several, and the run's mean wall time on this machine "
             f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads). Each run has "
             "its own cosine schedule to its budget, `--lr auto`, defaults otherwise.", ""]
    for w in widths:
        per = results[str(w)]
        budgets = sorted({int(t) for m in per.values() for t in m})
        lines += [f"Width {w} of {s.teacher_hidden}:", "",
                  "| method | " + " | ".join(f"{t:,} tokens ({t / s.teacher_tokens:.0%})" for t in budgets) + " |",
                  "|---|" + "---:|" * len(budgets)]
        for method, cells in per.items():
            row = []
            for t in budgets:
                runs = cells.get(str(t), [])
                if not runs:
                    row.append("-")
                    continue
                losses = [rel(r) for r in runs]
                mean = sum(losses) / len(losses)
                spread = f" +-{(max(losses) - min(losses)) / 2:.2%}" if len(losses) > 1 else ""
                secs = sum(r["seconds"] for r in runs) / len(runs)
                seeds = f", {len(runs)} seeds" if len(runs) > 1 else ""
                row.append(f"{mean:+.2%}{spread} ({secs:.0f} s{seeds})")
            shown = f"{method} (the default)" if method == DEFAULT else method
            lines.append(f"| {shown} | " + " | ".join(row) + " |")
        lines.append("")
    lines += [f"Regenerate: `{command}` (every method, 1-30%, two seeds; the cells already in OUT/results.json "
              "are kept, `--redo` runs them again, `--only` and `--seeds` narrow the run).", "", end]
    write_block(path, start, end, lines, f"Budget curves on the {name} teacher")


def plot(name: str, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({int(w) for w in results}, reverse=True)
    fig, axes = plt.subplots(2, len(widths), figsize=(6 * len(widths), 8), squeeze=False)
    for col, w in enumerate(widths):
        for method, cells in results[str(w)].items():
            pts = sorted((int(t), [rel(r) for r in runs], [r["seconds"] for r in runs]) for t, runs in cells.items())
            x = [t for t, _, _ in pts]
            y = [100 * sum(v) / len(v) for _, v, _ in pts]
            half_spread = [50 * (max(v) - min(v)) for _, v, _ in pts]  # +- half the spread over seeds
            sec = [sum(v) / len(v) for _, _, v in pts]
            axes[0][col].errorbar(x, y, yerr=half_spread, marker="o", capsize=3, label=method)
            axes[1][col].errorbar(sec, y, yerr=half_spread, marker="o", capsize=3, label=method)
        for row in (0, 1):  # linear within +-1%, where the close methods are; logarithmic beyond
            axes[row][col].set_yscale("symlog", linthresh=1.0)
        axes[0][col].set_xscale("log")
        axes[0][col].set_xlabel("training tokens")
        axes[1][col].set_xscale("log")
        axes[1][col].set_xlabel("wall seconds (this machine)")
        for row in (0, 1):
            axes[row][col].set_ylabel("held-out loss vs teacher (%)")
            axes[row][col].set_title(f"{name} teacher: student width {w} of {TEACHERS[name].teacher_hidden}")
            axes[row][col].axhline(0, color="gray", linestyle=":")
            axes[row][col].grid(alpha=0.3)
            axes[row][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_runs(cell: list[dict], runs: list[dict]) -> list[dict]:
    """A cell's runs with `runs` added, one per seed (a seed run again replaces its earlier run)."""
    by_seed = {r["seed"]: r for r in cell}
    by_seed.update({r["seed"]: r for r in runs})
    return [by_seed[k] for k in sorted(by_seed)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", choices=sorted(TEACHERS), default="strong")
    p.add_argument("--shares", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3],
                   help="budgets as shares of the teacher's training tokens")
    p.add_argument("--widths", type=int, nargs="+", default=[128, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--only", nargs="+", default=None, help="run only these methods")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--redo", action="store_true", help="run cells again whose seed is already in results.json")
    p.add_argument("--out", default="bench-out/budget")
    p.add_argument("--markdown", default="BENCHMARKS.md")
    p.add_argument("--png", default=None, help="default: benchmarks/budget_curves[_TEACHER].png")
    args = p.parse_args(argv)
    recipe = TEACHERS[args.teacher]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = default_cache_dir().parent / "demo"
    train, val = play_files()
    t0 = time.time()
    teacher, _, spent = build_teacher(recipe, train, val, cache)
    print(f"teacher: {teacher} ({spent:.0f} s now)", flush=True)
    saved = out / "results.json"
    everything = json.loads(saved.read_text()) if saved.exists() else {}
    results = everything.setdefault(args.teacher, {})
    for width in args.widths:
        for name, opts in METHODS.items():
            if args.only and name not in args.only:
                continue
            for share in args.shares:
                tokens = int(round(share * recipe.teacher_tokens))
                for seed in args.seeds:
                    done = results.get(str(width), {}).get(name, {}).get(str(tokens), [])
                    if not args.redo and any(r["seed"] == seed for r in done):
                        continue
                    print(f"[budget] {args.teacher} teacher, width {width}, {name}, {tokens:,} tokens, seed {seed}",
                          flush=True)
                    r = one_run(recipe, teacher, train, val, out / "run", cache, width, tokens, seed,
                                args.eval_batches, opts)
                    print(f"[budget]   {rel(r):+.2%} of the teacher's loss in {r['seconds']:.0f} s", flush=True)
                    cells = results.setdefault(str(width), {}).setdefault(name, {})
                    cells[str(tokens)] = add_runs(cells.get(str(tokens), []), [{**r, "seed": seed}])
                    saved.write_text(json.dumps(everything, indent=1))
    ordered = {w: {n: results[w][n] for n in METHODS if n in results[w]} for w in results}
    write_markdown(args.teacher, ordered, Path(args.markdown),
                   f"python benchmarks/budget_curves.py --teacher {args.teacher}")
    suffix = "" if args.teacher == "strong" else f"_{args.teacher}"
    plot(args.teacher, ordered, Path(args.png or f"benchmarks/budget_curves{suffix}.png"))
    shutil.copy(saved, Path("benchmarks/budget_curves_results.json"))  # the raw runs, kept with the tables
    print(f"done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
