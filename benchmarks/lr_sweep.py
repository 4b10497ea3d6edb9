"""Learning rate x student width on two small teachers of different family and corpus, and pca vs refit init.

The evidence behind `--lr auto` (`lrc.optim.lr_rule`) and `--init refit` (`lrc.student.refit`), in BENCHMARKS.md:

* `llama-plays`: the full demo's teacher (Llama, hidden 256, 4 layers, Shakespeare, 500K tokens; built and
  cached by `lrc.train.teacher.build_teacher`, so `lrc demo` reuses it);
* `qwen3-code`: a Qwen3 (hidden 192, 3 layers, untied head, its own 2048-token BPE) trained here on 400K
  tokens of the Python standard library's top-level modules (every tenth file held out).

Each student is trained on 10% of its teacher's tokens (sequences of 128, batch 8) with the run defaults
otherwise; the held-out loss is read at step 0 and at the end. Every run's result is appended to a JSON file
at once, and a run already there is skipped, so the sweep can be run in short chunks (`--max-seconds`).

    python benchmarks/lr_sweep.py teachers
    python benchmarks/lr_sweep.py runs --lrs 5e-4 1e-3 2e-3 4e-3 8e-3 [--cells llama-plays:128 ...] [--init refit]
    python benchmarks/lr_sweep.py runs --lrs auto --init pca refit
    python benchmarks/lr_sweep.py fit          # least squares of the best lr on the width: lr_rule's constants
    python benchmarks/lr_sweep.py report [--markdown BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import sysconfig
import time
from dataclasses import replace
from pathlib import Path

import torch
from _markdown import write_block

from lrc.config import RunConfig
from lrc.data.plays import play_files
from lrc.train.run import default_cache_dir
from lrc.train.teacher import DEMO, build_teacher
from lrc.train.trainer import TrainingDiverged, distill

WORK = Path("/tmp/lrc15")
# A width series on the same plays, tokenizer, depth (2 layers) and tokens (1M): what changes is d_T alone
# (the learning rate's dependence on absolute width, issue 21). head_dim 64 as in Llama 3; FFN 2.75 d_T.
_SERIES = replace(DEMO, teacher_layers=2, teacher_tokens=1_000_000)
WIDE = {"plays-w256": replace(_SERIES, teacher_hidden=256, heads=4, kv_heads=2, ffn=704, teacher_lr=2e-3),
        "plays-w512": replace(_SERIES, teacher_hidden=512, heads=8, kv_heads=4, ffn=1408, teacher_lr=1.4e-3),
        "plays-w1024": replace(_SERIES, teacher_hidden=1024, heads=16, kv_heads=8, ffn=2816, teacher_lr=1e-3)}
WIDTHS = {"llama-plays": (128, 96, 64), "qwen3-code": (96, 72, 48),  # half, between, quarter
          **{k: (s.teacher_hidden // 2, s.teacher_hidden // 4) for k, s in WIDE.items()}}
TEACHER_WIDTH = {"llama-plays": DEMO.teacher_hidden, "qwen3-code": 192,
                 **{k: s.teacher_hidden for k, s in WIDE.items()}}
TEACHER_TOKENS = {"llama-plays": DEMO.teacher_tokens, "qwen3-code": 400_000,
                  **{k: s.teacher_tokens for k, s in WIDE.items()}}
SEQ, BATCH = 128, 8
START, END = "<!-- lr_sweep:start -->", "<!-- lr_sweep:end -->"


def code_files() -> tuple[list[Path], list[Path]]:
    """The standard library's top-level modules, copied as .txt documents (lrc reads text files by suffix)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    out: tuple[list[Path], list[Path]] = ([], [])
    for i, f in enumerate(files):
        copy = WORK / "code" / ("val" if i % 10 == 0 else "train") / f"{f.stem}.txt"
        if not copy.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(f.read_text(errors="replace"))
        out[i % 10 == 0].append(copy)
    return out


def build_code_teacher(cache: Path) -> Path:
    """A Qwen3 on Python source, trained with the project's own trainer (`--method scratch`)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from lrc.data.tokenizer import train_bpe
    from lrc.model.export import save_student
    from lrc.train.run import load_run

    home = cache / "teacher-qwen3-code"
    model_dir = home / "teacher"
    if (model_dir / "config.json").is_file():
        return model_dir
    if home.exists():
        shutil.rmtree(home)
    train, val = code_files()
    tok = train_bpe((p.read_text() for p in train), vocab_size=2048)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=48, max_position_embeddings=4 * SEQ,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(home / "init")
    tok.save_pretrained(home / "init")
    run = home / "run"
    distill(RunConfig(teacher=str(home / "init"), data=[str(p) for p in train], val_data=[str(p) for p in val],
                      hidden_size=192, out=str(run), method="scratch", max_tokens=TEACHER_TOKENS["qwen3-code"],
                      batch_size=16, seq_len=SEQ, lr=2e-3, warmup_ratio=0.05, eval_every=0, eval_batches=8,
                      save_every=10**9, log_every=20, cache_dir=str(cache / "tokens")))
    _, method, tokenizer, _ = load_run(run)
    save_student(method.student_model(), model_dir, tokenizer)
    shutil.copy(run / "metrics.jsonl", home / "metrics.jsonl")
    shutil.rmtree(run)
    return model_dir


def teachers(names=None) -> dict[str, tuple[Path, list[Path], list[Path]]]:
    """The sweep's teachers (all, or those named), each built and cached on first use."""
    demo_cache = default_cache_dir().parent / "demo"
    train, val = play_files()
    out = {}
    for name in names or TEACHER_WIDTH:
        if name == "qwen3-code":
            ctrain, cval = code_files()
            out[name] = (build_code_teacher(WORK), ctrain, cval)
        else:
            out[name] = (build_teacher(WIDE.get(name, DEMO), train, val, demo_cache)[0], train, val)
    return out


def _key(teacher: str, width: int, init: str, lr: str, extra: dict) -> str:
    tail = "".join(f"|{k}={v}" for k, v in sorted(extra.items()))
    return f"{teacher}|{width}|{init}|{lr}{tail}"


def run_one(name: str, paths, width: int, init: str, lr: str, extra: dict) -> dict:
    teacher, train, val = paths
    out = WORK / "runs" / _key(name, width, init, lr, extra).replace("|", "_")
    if out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    options = dict(teacher=str(teacher), data=[str(p) for p in train], val_data=[str(p) for p in val],
                   hidden_size=width, out=str(out), method="lrc", init=init, max_tokens=TEACHER_TOKENS[name] // 10,
                   batch_size=BATCH, seq_len=SEQ, eval_every=0, save_every=10**9, log_every=10,
                   cache_dir=str(WORK / "tokens"))
    # the same 128 held-out sequences whatever the batch size
    options["eval_batches"] = 128 // int(extra.get("batch_size", BATCH))
    cfg = RunConfig(**(options | extra))
    if lr != "auto":
        cfg.optim.lr = float(lr)
    try:
        distill(cfg)
    except TrainingDiverged as e:  # --stop-on-rise: a learning rate far too high is a result too
        shutil.rmtree(out, ignore_errors=True)
        return {"final": float("nan"), "stopped": str(e).split(";")[0], "lr": cfg.optim.lr, "seconds": time.time() - t0}
    saved = (out / "config.yaml").read_text()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    vals = [r for r in rows if r.get("split") == "val"]
    init = next((r for r in rows if r.get("split") == "init"), {})
    teacher_loss = next(r["loss"] for r in rows if r.get("split") == "val_teacher")
    lr_used = next(float(line.split(":", 1)[1]) for line in saved.splitlines() if line.startswith("lr:"))
    shutil.rmtree(out)
    return {"teacher_loss": teacher_loss, "step0": vals[0]["loss"], "final": vals[-1]["loss"], "lr": lr_used,
            "step0_kl": vals[0]["kl"], "final_kl": vals[-1]["kl"], "steps": vals[-1]["step"],
            "init": {k: v for k, v in init.items() if k not in ("split", "step")}, "seconds": time.time() - t0}


def cmd_runs(args) -> None:
    results_path = WORK / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    cells = [c.split(":") for c in args.cells] if args.cells else [(t, str(w)) for t in WIDTHS for w in WIDTHS[t]]
    paths = teachers(sorted({name for name, _ in cells}))
    extra = dict(kv.split("=") for kv in args.set)
    text = {"schedule", "drop_layers", "precision", "teacher_dtype"}
    extra = {k: v if k in text else int(v) if v.isdigit() else float(v) for k, v in extra.items()}
    t_start = time.time()
    for name, width in cells:
        for init in args.init:
            for lr in args.lrs:
                key = _key(name, int(width), init, lr, extra)
                if key in results:
                    continue
                if time.time() - t_start > args.max_seconds:
                    print(f"[lr_sweep] time budget spent; rerun to continue (next: {key})")
                    return
                results[key] = run_one(name, paths[name], int(width), init, lr, extra)
                print(f"[lr_sweep] {key}: {results[key]}", flush=True)
                results_path.write_text(json.dumps(results, indent=1))


def _cells(results: dict, init: str = "refit", extra: str = "") -> dict[tuple[str, int], dict[str, dict]]:
    """{(teacher, width): {lr label: result}} for the runs of one init without other options (or with `extra`)."""
    out: dict[tuple[str, int], dict[str, dict]] = {}
    for key, r in results.items():
        parts = key.split("|")
        if parts[2] != init or "|".join(parts[4:]) != extra:
            continue
        out.setdefault((parts[0], int(parts[1])), {})[parts[3]] = r
    return out


def best_lr(runs: dict[str, dict]) -> tuple[float, float, float]:
    """(best swept lr, its loss, the vertex of a parabola in log lr through the best and its neighbours)."""
    import math

    swept = sorted((float(k), v["final"]) for k, v in runs.items() if k != "auto" and v["final"] == v["final"])
    i = min(range(len(swept)), key=lambda j: swept[j][1])
    lr, loss = swept[i]
    if 0 < i < len(swept) - 1:
        (x0, y0), (x1, y1), (x2, y2) = [(math.log(a), b) for a, b in swept[i - 1:i + 2]]
        denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
        a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
        b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
        vertex = math.exp(-b / (2 * a)) if a > 0 else lr
    else:
        vertex = lr
    return lr, loss, vertex


def cmd_fit(results: dict) -> None:
    """Least squares of log(vertex lr) on log(2 d_S / d_T): the constants of lrc.optim.lr_rule."""
    import math

    pts = []
    for (teacher, width), runs in sorted(_cells(results).items()):
        if len([k for k in runs if k != "auto"]) < 3:
            continue
        lr, loss, vertex = best_lr(runs)
        pts.append((math.log(2 * width / TEACHER_WIDTH[teacher]), math.log(vertex)))
        print(f"{teacher} width {width}: best swept {lr:g} ({loss:.4f}), parabola vertex {vertex:.3g}")
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    slope = sum((x - mx) * (y - my) for x, y in pts) / max(1e-12, sum((x - mx) ** 2 for x, _ in pts))
    at_half = math.exp(my - slope * mx)
    rms = math.sqrt(sum((y - (my + slope * (x - mx))) ** 2 for x, y in pts) / n)
    print(f"fit: lr = {at_half:.3g} * (2 d_S / d_T) ** {slope:.2f}; rms residual {rms:.2f} in log lr")


def _pct(loss: float, ref: float) -> str:
    return f"{100 * (loss / ref - 1):+.2f}%"


def write_report(results: dict, md: Path) -> None:
    lines = [START, ""]
    sweep = _cells(results)
    lrs = sorted({float(k) for runs in sweep.values() for k in runs if k != "auto"})
    lines += ["### Final held-out loss by learning rate (refit init; % above the teacher's held-out loss)", "",
              "| teacher | d_S | " + " | ".join(f"{x:g}" for x in lrs) + " | best swept | auto: lr | auto: loss | "
              "auto vs best |", "|---|---|" + "---|" * (len(lrs) + 4)]
    for (teacher, width), runs in sorted(sweep.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        t = next(iter(runs.values()))["teacher_loss"]
        cells = []
        for x in lrs:
            r = next((v for k, v in runs.items() if k != "auto" and float(k) == x), None)
            cells.append("" if r is None else f"{r['final']:.4f} ({_pct(r['final'], t)})")
        lr, loss, _ = best_lr(runs) if len(runs) > 1 else (float("nan"), float("nan"), 0)
        auto = runs.get("auto")
        tail = (f"{auto['lr']:.3g} | {auto['final']:.4f} ({_pct(auto['final'], t)}) | {_pct(auto['final'], loss)}"
                if auto else " | | ")
        lines.append(f"| {teacher} (teacher {t:.4f}) | {width} | " + " | ".join(cells) + f" | {lr:g} | {tail} |")
    pca, refit = _cells(results, "pca"), _cells(results, "refit")
    lines += ["", "### pca vs refit initialisation (both at --lr auto; held-out loss, % above the teacher)", "",
              "| teacher | d_S | step 0: pca | step 0: refit | final: pca | final: refit |",
              "|---|---|---|---|---|---|"]
    for (teacher, width), runs in sorted(pca.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        a, b = runs.get("auto"), refit.get((teacher, width), {}).get("auto")
        if not (a and b):
            continue
        t = a["teacher_loss"]
        lines.append(f"| {teacher} | {width} | {a['step0']:.4f} ({_pct(a['step0'], t)}) | {b['step0']:.4f} "
                     f"({_pct(b['step0'], t)}) | {a['final']:.4f} ({_pct(a['final'], t)}) | {b['final']:.4f} "
                     f"({_pct(b['final'], t)}) |")
    others = sorted({"|".join(k.split("|")[4:]) for k in results} - {""})
    if others:
        lines += ["", "### Other options: warm-up ratio, batch size (refit init; in brackets: the same cell and lr at "
                  "the defaults, warm-up 0.05 and batch 8)", "",
                  "| teacher | d_S | options | lr | final held-out loss |", "|---|---|---|---|---|"]
        for extra in others:
            for (teacher, width), runs in sorted(_cells(results, "refit", extra).items()):
                for lr, r in runs.items():
                    base = refit.get((teacher, width), {}).get(lr)
                    vs = f" (default: {base['final']:.4f})" if base else ""
                    lines.append(f"| {teacher} | {width} | {extra.replace('|', ', ')} | {lr} ({r['lr']:.3g}) | "
                                 f"{r['final']:.4f}{vs} |")
    secs = sum(r["seconds"] for r in results.values())
    lines += ["", f"{len(results)} runs, {secs / 60:.0f} minutes of wall time in all (2-core AMD EPYC, fp32).", "",
              END]
    print(write_block(md, START, END, lines, "Learning rate x student width, and the refit init"))


START21, END21 = "<!-- lr_sweep_21:start -->", "<!-- lr_sweep_21:end -->"
PAPER = (("Llama-3.2-3B", 3072, 1536, 1e-4), ("Qwen2.5-3B", 2048, 1200, 6.7e-5), ("Qwen2.5-7B", 3584, 2048, 1e-4))


def _loss_cell(r: dict | None, t: float) -> str:
    if r is None:
        return ""
    if r["final"] != r["final"]:
        return "stopped (loss rose)"
    return f"{r['final']:.4f} ({_pct(r['final'], t)})"


def write_report21(results: dict, md: Path) -> None:
    """Issue 21's tables: the width series against the 1/d_T rule, the rule at the paper's shapes, and pca vs
    refit (held-out KL at step 0 and at the end, fp32/bf16, with and without layer 0)."""
    from lrc.optim.lr_rule import auto_lr

    lines = [START21, "", "### Final held-out loss by learning rate on the width series (refit init, half width; "
             "columns are multiples of the rule's value; % above the teacher's held-out loss)", "",
             "| teacher | d_S | rule (auto) | x1/4 | x1/2 | x1 | x2 | x4 | best swept | auto vs best |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    sweep = _cells(results)
    for name in WIDE:
        for width in WIDTHS[name]:
            runs = sweep.get((name, width))
            if not runs or "auto" not in runs:
                continue
            auto = runs["auto"]
            t = auto["teacher_loss"]
            by_lr = {float(k): v for k, v in runs.items() if k != "auto"}
            cells = [_loss_cell(next((v for x, v in by_lr.items() if abs(x / (auto["lr"] * m) - 1) < 0.01),
                                     auto if m == 1 else None), t)
                     for m in (0.25, 0.5, 1, 2, 4)]
            lr, loss, _ = best_lr(runs)
            lines.append(f"| {name} (d_T {TEACHER_WIDTH[name]}, teacher {t:.4f}) | {width} | {auto['lr']:.3g} | "
                         + " | ".join(cells) + f" | {lr:g} ({loss:.4f}) | {_pct(auto['final'], loss)} |")
    lines += ["", "### The rule at the paper's shapes (`lrc plan` prints the same value)", "",
              "| teacher -> d_S | d_T | previous rule | `--lr auto` now | paper | now / paper |",
              "|---|---|---|---|---|---|"]
    for name, d_t, d_s, paper in PAPER:
        old = 1.5e-3 * (2 * d_s / d_t) ** 1.4
        new = auto_lr(d_s, d_t, 2048 * 256)
        lines.append(f"| {name} -> {d_s} | {d_t} | {old:.3g} | {new:.3g} | {paper:g} | {new / paper:.2f} |")
    lines += ["", "### pca vs refit: held-out KL to the teacher at step 0 and after 10% of the teacher's tokens "
              "(--lr auto)", "",
              "The guard column is the keep-or-revert check on the held-out calibration batches (KL of pca -> "
              "refit, in the dtype the student exports in); step 0 and final are on the run's held-out split.", "",
              "| teacher | d_S | options | guard: pca -> refit | kept | step 0 KL: pca | step 0 KL: refit | "
              "final KL: pca | final KL: refit | final loss: pca | final loss: refit |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    extras = sorted({"|".join(k.split("|")[4:]) for k in results if k.split("|")[0] in ("llama-plays", "qwen3-code")})
    for extra in extras:
        pca, refit = _cells(results, "pca", extra), _cells(results, "refit", extra)
        for (teacher, width), runs in sorted(refit.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
            a, b = pca.get((teacher, width), {}).get("auto"), runs.get("auto")
            if not (a and b) or "step0_kl" not in b:
                continue
            g = b.get("init", {})
            guard = (f"{g['heldout_kl_pca']:.5f} -> {g['heldout_kl_refit']:.5f}" if "heldout_kl_pca" in g else "")
            lines.append(f"| {teacher} | {width} | {extra.replace('|', ', ') or 'fp32'} | {guard} | "
                         f"{'yes' if g.get('refit_kept') else 'no'} | {a['step0_kl']:.5f} | {b['step0_kl']:.5f} | "
                         f"{a['final_kl']:.5f} | {b['final_kl']:.5f} | {a['final']:.4f} | {b['final']:.4f} |")
    secs = sum(r["seconds"] for r in results.values())
    lines += ["", f"{len(results)} runs, {secs / 60:.0f} minutes of wall time in all (2-core Xeon with AMX).", "",
              END21]
    print(write_block(md, START21, END21, lines, "LRC at real sizes: refit, calibration, learning rate (issue 21)"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teachers")
    t.add_argument("names", nargs="*", help="teachers to build (default: all)")
    r = sub.add_parser("runs")
    r.add_argument("--lrs", nargs="+", default=["auto"])
    r.add_argument("--init", nargs="+", default=["refit"])
    r.add_argument("--cells", nargs="+", default=None, help="TEACHER:WIDTH (default: all six)")
    r.add_argument("--set", nargs="*", default=[], help="other RunConfig options, e.g. warmup_ratio=0.05")
    r.add_argument("--max-seconds", type=float, default=240.0, help="start no new run after this long")
    sub.add_parser("fit")
    rep = sub.add_parser("report")
    rep.add_argument("--markdown", default="BENCHMARKS.md")
    rep21 = sub.add_parser("report21", help="issue 21's tables")
    rep21.add_argument("--markdown", default="BENCHMARKS.md")
    args = p.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    if args.cmd == "teachers":
        for name, (path, _, _) in teachers(args.names).items():
            print(f"[lr_sweep] {name}: {path}")
    elif args.cmd == "runs":
        cmd_runs(args)
    elif args.cmd == "fit":
        cmd_fit(json.loads((WORK / "results.json").read_text()))
    elif args.cmd == "report21":
        write_report21(json.loads((WORK / "results.json").read_text()), Path(args.markdown))
    else:
        write_report(json.loads((WORK / "results.json").read_text()), Path(args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
