"""`lrc export`: a run's student at one of its checkpoints as a Hugging Face model folder, with the run's
chat template, a model card and the teacher's licence files, written whole or not at all (`lrc.atomic`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lrc.atomic import fsync_tree, publish_dir
from lrc.model.export import chat_generation_config, save_student
from lrc.model.precision import dtype_name
from lrc.publish.card import CardFacts, heldout_at, teacher_folder, teacher_front_matter, write_card
from lrc.student.shape import describe
from lrc.train.run import COMMANDS, find_checkpoint, load_run


def export_run(run_dir: Path, out: Path, dtype: torch.dtype | None = None, step: int | None = None,
               checkpoint: Path | None = None) -> tuple[Path, str]:
    """`lrc export`: a run's student at one of its checkpoints (default: the latest) as a Hugging Face model
    folder with the run's chat template, a model card and the teacher's licence files. Returns (the
    checkpoint exported, a one-line description)."""
    chosen = find_checkpoint(run_dir, step, checkpoint)
    cfg, method, tokenizer, teacher = load_run(run_dir, "cpu", checkpoint=chosen)
    # Written under a hidden name beside `out` and renamed into place when complete: a killed export leaves no
    # half model at `out` (the same command runs again), only this folder, which that run replaces
    final, out = out, out.resolve().with_name(f".{out.resolve().name}.partial")
    shutil.rmtree(out, ignore_errors=True)
    try:
        described = _write_export(run_dir, chosen, out, final.resolve().name, cfg, method, tokenizer, teacher, dtype)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    fsync_tree(out)
    publish_dir(out, final)
    return chosen, described


def _write_export(run_dir: Path, chosen: Path, out: Path, name: str, cfg, method, tokenizer, teacher,
                  dtype: torch.dtype | None) -> str:
    dtype = dtype or next(teacher.parameters()).dtype  # a bf16 teacher gives a bf16 student
    chat = bool(cfg.data.chat_template) or cfg.data.train_on == "assistant"
    template = getattr(tokenizer, "chat_template", None)
    generation = chat_generation_config(teacher.generation_config, tokenizer,
                                        template if chat and isinstance(template, str) else None)
    with torch.no_grad():
        student = method.student_model(dtype)
        save_student(student, out, tokenizer, generation)
    state = json.loads((chosen / "state.json").read_text())
    mine, theirs = heldout_at(run_dir, state["step"])
    commands = run_dir / COMMANDS
    shape = describe(cfg, teacher.config)
    facts = CardFacts(cfg=cfg, step=state["step"], tokens=state["tokens"],
                      parameters=sum(p.numel() for p in student.parameters()),
                      teacher_parameters=sum(p.numel() for p in teacher.parameters()), shape=shape,
                      heldout=mine, teacher_heldout=theirs, chat=chat, name=name,
                      commands=commands.read_text().splitlines() if commands.is_file() else [],
                      licence=None)
    folder = teacher_folder(str(cfg.teacher))
    facts.licence = teacher_front_matter(folder).get("license")
    licences = write_card(out, facts, folder)
    if facts.licence is None and licences:  # the teacher's terms are in its files: say so in the metadata
        facts.licence = "other"
        write_card(out, facts, folder)
    return (f"{cfg.method} student at step {state['step']:,} ({shape}, {dtype_name(dtype)})"
            + (f"; copied the teacher's {', '.join(licences)}" if licences else ""))
