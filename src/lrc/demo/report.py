"""The demo's report: held-out loss curves (plot), sampled continuations, and report.md in words."""

from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPTS = ("**HAMLET**  \n", "**KING**  \nWhat news", "**ROMEO**  \nO")


def val_curve(metrics: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [(r["tokens"], r["loss"]) for r in rows if r.get("split") == "val"]


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path, teacher_final: float) -> None:
    import matplotlib  # heavy: only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only for the plot

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


def samples(model, tokenizer, n_tokens: int) -> list[str]:
    out = []
    for i, prompt in enumerate(PROMPTS):
        torch.manual_seed(i)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        gen = model.generate(ids, max_new_tokens=n_tokens, do_sample=True, top_k=40, temperature=0.8,
                             pad_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0], skip_special_tokens=True))
    return out


def report_text(s, results, timings, curves, total, quick, tiny, held_out) -> str:
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
