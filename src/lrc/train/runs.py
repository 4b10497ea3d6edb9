"""`lrc runs`: a run's kept checkpoints with their held-out losses (from metrics.jsonl), for `lrc export --step`."""

from __future__ import annotations

import json
from pathlib import Path

from lrc.config import load_run_config
from lrc.train import checkpoint as ckpt


def heldout_by_step(run_dir: Path) -> tuple[dict[int, dict], dict | None]:
    """({step: the student's last held-out record at that step}, the teacher's held-out record or None)."""
    student: dict[int, dict] = {}
    teacher = None
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill
        if r.get("split") == "val":
            student[int(r["step"])] = r
        elif r.get("split") == "val_teacher":
            teacher = r
    return student, teacher


def list_checkpoints(run_dir: Path) -> dict:
    """{"run", "teacher", "method", "teacher_loss", "checkpoints": [{"step", "tokens", "loss", "perplexity",
    "path"}]}; loss and perplexity are None where no evaluation ran at a checkpoint's step."""
    cfg = load_run_config(run_dir)  # UserError for a folder that is not a run
    heldout, teacher = heldout_by_step(run_dir)
    rows = []
    for folder in ckpt.checkpoint_dirs(run_dir):
        try:
            state = json.loads((folder / "state.json").read_text())
        except (OSError, ValueError):
            continue  # unreadable: not exportable either
        r = heldout.get(int(state["step"]), {})
        rows.append({"step": int(state["step"]), "tokens": int(state.get("tokens", 0)), "loss": r.get("loss"),
                     "perplexity": r.get("perplexity"), "path": str(folder)})
    return {"run": str(run_dir), "teacher": cfg.teacher, "method": cfg.method,
            "teacher_loss": teacher.get("loss") if teacher else None, "checkpoints": rows}


def format_runs(listing: list[dict]) -> str:
    blocks = []
    for run in listing:
        head = f"{run['run']}: {run['method']} from {run['teacher']}"
        if run["teacher_loss"] is not None:
            head += f" (teacher held-out loss {run['teacher_loss']:.4f})"
        lines = [head]
        if not run["checkpoints"]:
            lines.append("  no checkpoint yet")
        else:
            lines.append(f"  {'step':>10}  {'tokens':>15}  {'held-out loss':>13}  {'perplexity':>10}")
            for c in run["checkpoints"]:
                loss = f"{c['loss']:.4f}" if c["loss"] is not None else "-"
                ppl = f"{c['perplexity']:.2f}" if c["perplexity"] is not None else "-"
                lines.append(f"  {c['step']:>10,}  {c['tokens']:>15,}  {loss:>13}  {ppl:>10}")
            lines.append(f"  export one with `lrc export {run['run']} --step N --out MODEL_DIR`")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
