"""`lrc eval`: held-out perplexity of many models (exported folders, run folders, teachers) on the same
windows, and lm-eval task accuracy, through `lrc.train.heldout`'s loop.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lrc.config import load_run_config
from lrc.data import build_packed_dataset, resolve_data_files
from lrc.data.tokenise import tokenizer_fingerprint
from lrc.data.tokenizer import load_tokenizer
from lrc.errors import UserError
from lrc.eval.tasks import load_tasks, resolve_tasks, run_tasks
from lrc.model.teacher import load_teacher
from lrc.train.heldout import model_loss
from lrc.train.run import CHAT_TEMPLATE, load_run


def load_for_eval(path: str, device="cpu"):
    """(model, tokenizer, default seq_len or None) for an exported/HF model directory or an lrc run directory.
    The tokenizer carries the chat template stored with the model (or run)."""

    p = Path(path)
    if (p / "config.yaml").is_file():
        cfg, method, tokenizer, _ = load_run(p, device)
        return method.student_model().to(device).eval(), tokenizer, cfg.data.seq_len
    model = load_teacher(path).to(device)
    tokenizer = load_tokenizer(path, whose="the model's",
                               if_missing="export with `lrc export` (it copies the teacher's)")
    return model, tokenizer, run_settings(path).get("seq_len")


def run_settings(path: str) -> dict:
    """{"seq_len", "train_on"} of the lrc run a model comes from (a run directory's config.yaml, an export's
    lrc-config.yaml), else {} (any other model)."""
    p = Path(path)
    stored = p / "config.yaml" if (p / "config.yaml").is_file() else p / "lrc-config.yaml"
    try:
        cfg = yaml.safe_load(stored.read_text()) if stored.is_file() else None
    except (OSError, yaml.YAMLError):
        cfg = None
    return {k: cfg[k] for k in ("seq_len", "train_on") if k in cfg} if isinstance(cfg, dict) else {}


def _tokenizer_of(path: str):
    """The tokenizer a model or run directory is evaluated with (a run's: its teacher's), with the chat template
    stored with the model or run."""
    if (Path(path) / "config.yaml").is_file():

        cfg = load_run_config(path)
        tokenizer = load_tokenizer(str(cfg.teacher), trust_remote_code=cfg.trust_remote_code)
        stored = Path(path) / CHAT_TEMPLATE
        if stored.is_file():
            tokenizer.chat_template = stored.read_text(encoding="utf-8")
        return tokenizer
    return load_tokenizer(path, whose="the model's", if_missing="export with `lrc export` (it copies the teacher's)")


def table_windows(paths: list[str], seq_len: int | None):
    """(tokenizer, seq_len) that every model of one table is measured with, so that all rows count the same
    token windows: --seq-len, else the first lrc run's or export's, else 512. Models whose tokenizers differ
    cannot be measured on the same tokens: refused before any model is loaded."""
    tokenizers = [_tokenizer_of(p) for p in paths]
    prints = [{**tokenizer_fingerprint(t), "name_or_path": 0} for t in tokenizers]
    if (other := next((i for i, f in enumerate(prints) if f != prints[0]), None)) is not None:
        raise UserError(f"{paths[other]} and {paths[0]} use different tokenizers, so their held-out losses would not "
                        "be measured on the same tokens; evaluate them in separate `lrc eval` calls")
    stored = next((s["seq_len"] for s in map(run_settings, paths) if "seq_len" in s), None)
    return tokenizers[0], seq_len or stored or 512


def evaluate_models(paths: list[str], data: list[str] | None, tasks: list[str] | None = None, *,
                    seq_len: int | None = None, batch_size: int = 4, device="cpu", text_field: str = "text",
                    cache_dir: Path | None = None, num_fewshot: int | None = None,
                    limit: float | None = None, chat_template: str | None = None,
                    train_on: str | None = None) -> list[dict]:
    """One record per model (`lrc eval`): {"model", "parameters", and with data "loss", "perplexity", "tokens",
    "targets" (all, or assistant: the labelled tokens of chat rows), with tasks "tasks": {task: {"acc",
    "acc_norm", "samples"}}}.

    Chat rows are rendered with `chat_template` (a file; default: the template stored with each model or run)
    and every model is scored on the same `train_on` tokens (default: what the first lrc run or export among
    `paths` trained on, else all).

    Every input is checked first (data files, task names, task data, the models' tokenizers), then each model is
    loaded in turn (a run directory is exported in memory) and dropped before the next. Every model's held-out
    loss is measured on the same token windows (`table_windows`)."""
    if not data and not tasks:
        raise UserError("give --data FILES (held-out loss) or --tasks NAMES (accuracy), or both")
    files = resolve_data_files(list(data)) if data else None
    spec = manager = None
    if tasks:
        spec, manager = resolve_tasks(tasks)
        load_tasks(spec, manager)
    # One choice of targets for every model, so the losses compare: the first lrc run's --train-on by default
    targets = train_on or next((s["train_on"] for s in map(run_settings, paths) if "train_on" in s), "all")
    ds = None
    if files:  # one set of token windows for the whole table
        tokenizer, window = table_windows(paths, seq_len)
        ds = build_packed_dataset(files, tokenizer, window, cache_dir=cache_dir, text_field=text_field,
                                  chat_template=chat_template, train_on=targets)
    records = []
    for path in paths:
        model, tokenizer, _ = load_for_eval(path, device)
        record: dict = {"model": path, "parameters": sum(p.numel() for p in model.parameters())}
        if ds is not None:
            record.update(model_loss(model, ds, batch_size=batch_size, device=device, precision="auto"))
            record["targets"] = targets
        if spec is not None:
            record["tasks"] = run_tasks(model, tokenizer, spec, manager, batch_size=batch_size,
                                        num_fewshot=num_fewshot, limit=limit)
        records.append(record)
        del model
    return records
