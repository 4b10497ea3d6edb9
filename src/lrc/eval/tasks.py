"""Zero-shot task accuracy through lm-evaluation-harness (`lrc eval --tasks`), on models already in memory.

Task names are checked, and every task's data loaded, before any model is: a misspelt name or a hub task
without network is one line, not a traceback after minutes of evaluation. Three kinds of name:
- `lrc_next_line`, the shipped offline task (`lrc.eval.next_line`), and `paper`, the paper's nine tasks;
- a task YAML file (lm-eval's custom task format, e.g. over local json data);
- any task, group or tag lm-eval knows (its built-in tasks fetch their data from the Hugging Face hub).
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lrc.errors import UserError
from lrc.eval import next_line as next_line_task

# The paper's nine zero-shot tasks, spelt as lm-eval names them (ARC-E, ARC-C, LogiQA, CommonsenseQA, PIQA,
# WinoGrande, BoolQ, SciQ, MMLU).
PAPER_TASKS = ("arc_easy", "arc_challenge", "logiqa", "commonsense_qa", "piqa", "winogrande", "boolq", "sciq", "mmlu")
METRICS = ("acc", "acc_norm")  # reported where a task has them (",none" is lm-eval's default filter)


@dataclass(frozen=True)
class TaskSpec:
    """What `lrc eval --tasks` resolved: lm-eval specs (names or YAML paths) and the names results come under."""

    specs: tuple[str, ...]
    names: tuple[str, ...]
    needs_hub: tuple[str, ...]  # names whose data lm-eval fetches from the hub


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("--tasks needs lm-eval, which is not installed: pip install 'lowrankclone[eval]'") from None


def _yaml_task_name(path: Path) -> str:
    try:
        doc = yaml.safe_load(path.read_text().replace("!function", ""))  # names only; lm-eval parses it fully
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"task file {path} could not be read as YAML ({e.__class__.__name__}); "
                        "give an lm-eval task YAML") from None
    name = doc.get("task") if isinstance(doc, dict) else None
    if not isinstance(name, str):
        raise UserError(f"task file {path} has no `task:` name; give an lm-eval task YAML")
    return name


def resolve_tasks(requested: list[str], cache: Path | None = None):
    """(TaskSpec, lm-eval TaskManager) for `--tasks`; unknown names are a UserError naming the first."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager  # the optional [eval] extra


    specs: list[str] = []
    names: list[str] = []
    builtin: list[str] = []
    for name in requested:
        for one in PAPER_TASKS if name == "paper" else (name,):
            if one == next_line_task.TASK:
                specs.append(str(next_line_task.task_yaml(cache)))
                names.append(one)
            elif one.endswith((".yaml", ".yml")):
                path = Path(one)
                if not path.is_file():
                    raise UserError(f"task file {one} does not exist; give an lm-eval task YAML or a task name")
                specs.append(str(path.resolve()))
                names.append(_yaml_task_name(path))
            else:
                specs.append(one)
                names.append(one)
                builtin.append(one)
    manager = TaskManager(include_defaults=bool(builtin))  # indexing lm-eval's own tasks takes seconds: only if named
    unknown = [n for n in builtin if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r}: not an lm-eval task, group or tag, nor a task YAML file; "
                        f"`lm-eval ls tasks` lists them, `--tasks paper` names the paper's nine, "
                        f"`--tasks lrc_next_line` is the shipped offline task")
    seen: dict[str, None] = dict.fromkeys(names)  # keep order, drop repeats
    unique_specs = list(dict.fromkeys(specs))
    return TaskSpec(tuple(unique_specs), tuple(seen), tuple(dict.fromkeys(builtin))), manager


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_tasks(spec: TaskSpec, manager) -> None:
    """Load every task's data once (into the `datasets` cache), so a missing dataset fails before any model
    is evaluated. Hub tasks without network become one line saying so."""
    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        manager.load(list(spec.specs))
    except Exception as e:  # lm-eval and datasets raise many kinds; every one here means the data is unavailable
        if spec.needs_hub:
            why = "the network is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if _offline() else \
                f"it failed: {e.__class__.__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            which = f"tasks {', '.join(spec.needs_hub)} need" if len(spec.needs_hub) > 1 else \
                f"task {spec.needs_hub[0]} needs"
            raise UserError(f"{which} the network to fetch their data from the "
                            f"Hugging Face hub (once; then it is cached), and {why}; offline, use local tasks: "
                            f"lrc_next_line or a task YAML file over local json") from None
        raise UserError(f"task data could not be loaded: {e.__class__.__name__}: {str(e).splitlines()[0][:200]}"
                        ) from None
    finally:
        quiet.setLevel(level)


def _quiet_git_hash() -> str | None:
    """lm-eval's `get_git_commit_hash` without its stderr: outside a git checkout (where `lrc eval` usually runs)
    `git describe` prints "fatal: not a git repository" to the user's terminal."""
    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
    except OSError:  # no git installed
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def run_tasks(model, tokenizer, spec: TaskSpec, manager, *, batch_size: int = 4, num_fewshot: int | None = None,
              limit: float | None = None) -> dict[str, dict[str, float]]:
    """{task: {"acc": ..., "acc_norm": ... (where the task has them), "samples": n}} of one model in memory."""
    import lm_eval.evaluator  # the optional [eval] extra
    from lm_eval import simple_evaluate  # the optional [eval] extra
    from lm_eval.models.huggingface import HFLM  # the optional [eval] extra

    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # lm-eval warns about a model passed as an object; that is intended here
    git_hash = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = _quiet_git_hash
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=list(spec.specs), task_manager=manager, num_fewshot=num_fewshot,
                              limit=limit, bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    finally:
        quiet.setLevel(level)
        lm_eval.evaluator.get_git_commit_hash = git_hash
    assert out is not None  # None only on non-zero ranks of a distributed lm-eval run
    return extract_metrics(out, spec.names)


def extract_metrics(out: dict[str, Any], names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """The requested tasks' acc / acc_norm from lm-eval's results; a tag (no aggregate of its own) expands to
    its tasks."""
    results = out.get("results", {})
    groups = out.get("group_subtasks", {})
    table: dict[str, dict[str, float]] = {}
    for name in names:
        for task in [name] if name in results else groups.get(name, []):
            row = {m: float(results[task][f"{m},none"]) for m in METRICS if f"{m},none" in results[task]}
            n = out.get("n-samples", {}).get(task, {}).get("effective")
            if n is not None:
                row["samples"] = int(n)
            table[task] = row
    return table
