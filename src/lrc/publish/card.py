"""The exported student's model card (README.md with Hugging Face's YAML metadata block) and the teacher's
licence files, which most teachers' licences require a derived model to carry.

Everything on the card comes from the run directory: config.yaml (teacher, method, data, shape, learning
rate), the exported checkpoint's state.json (step, tokens), metrics.jsonl (held-out losses of the student at
that step and of the teacher) and commands.txt (the command lines that ran it).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub
import yaml

from lrc.config import RunConfig
from lrc.data.sources import split_weights
from lrc.train.runs import heldout_by_step

LICENCE_PATTERNS = ("LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*")
METHOD_NAMES = {"lrc": "Low-Rank Clone (arXiv 2505.12781)",
                "kd": "knowledge distillation of an ordinary student (from LRC's start unless init is random)",
                "scratch": "training from scratch", "prune-kd": "width pruning, then knowledge distillation"}


@dataclass
class CardFacts:
    """What the card states, gathered from the run (`gather_facts`)."""

    cfg: RunConfig
    step: int
    tokens: int
    parameters: int
    teacher_parameters: int
    shape: str
    heldout: dict[str, float] = field(default_factory=dict)  # the student's at `step`
    teacher_heldout: dict[str, float] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    licence: str | None = None  # the teacher card's `license:`
    chat: bool = False
    name: str = "student"  # the exported folder's name, the card's title


def local_path(item: str) -> bool:
    """True for a path on this machine (a hub id is not one)."""
    return item.startswith(("/", ".", "~")) or Path(item).expanduser().exists()


def teacher_folder(teacher: str) -> Path | None:
    """A folder holding the teacher's card and licence files: the teacher's own folder, or for a hub id those
    files fetched into the Hugging Face cache (loading a model does not fetch them); None when offline."""
    if local_path(teacher):
        return Path(teacher).expanduser() if Path(teacher).expanduser().is_dir() else None
    try:
        return Path(huggingface_hub.snapshot_download(teacher, allow_patterns=["README.md", *LICENCE_PATTERNS]))
    except Exception:  # noqa: BLE001 - offline, gated or gone: the card says less, the export still works
        return None


def teacher_front_matter(teacher: str | Path | None) -> dict[str, Any]:
    """The YAML metadata block of the teacher's own README.md ({} without one or when unreadable)."""
    if teacher is None:
        return {}
    readme = Path(teacher) / "README.md"
    if not readme.is_file():
        return {}
    match = re.match(r"---\s*\n(.*?)\n---\s*\n", readme.read_text(encoding="utf-8", errors="replace"), re.S)
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def heldout_at(run_dir: Path, step: int) -> tuple[dict[str, float], dict[str, float]]:
    """(the student's held-out record at `step`, the teacher's) from metrics.jsonl; {} where absent."""
    by_step, teacher = heldout_by_step(run_dir)
    return by_step.get(step, {}), teacher or {}


def copy_licence_files(folder: Path | None, out: Path) -> list[str]:
    """Copy LICENSE*, LICENCE*, NOTICE* and USE_POLICY* of the teacher's folder into `out`; their names."""
    if folder is None or not folder.is_dir():
        return []
    copied = []
    for pattern in LICENCE_PATTERNS:
        for f in sorted(folder.glob(pattern)):
            if f.is_file() and not (out / f.name).exists():
                shutil.copyfile(f, out / f.name)
                copied.append(f.name)
    return copied


def _data_ids(cfg: RunConfig) -> list[str]:
    """Hub dataset ids among --data (config, split and weight dropped), for the `datasets:` field."""
    ids = []
    for paths, _ in split_weights(cfg.data.files):
        for item in paths:
            if not local_path(item):
                ids.append(item.split("@")[0].split(":")[0])
    return sorted(set(ids))


def front_matter(f: CardFacts) -> dict[str, Any]:
    cfg = f.cfg
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    teacher = str(cfg.teacher)
    if not local_path(teacher):
        meta["base_model"] = teacher
    elif teacher_front_matter(teacher).get("base_model"):  # a local copy of a published model names it
        meta["base_model"] = teacher_front_matter(teacher)["base_model"]
    if f.licence:
        meta["license"] = f.licence
    if _data_ids(cfg):
        meta["datasets"] = _data_ids(cfg)
    meta["tags"] = ["lowrankclone", "distillation", cfg.method] + (["chat"] if f.chat else [])
    return {k: v for k, v in meta.items() if v is not None}


def _loss(r: dict[str, float]) -> str:
    return f"{r['loss']:.4f} (perplexity {r['perplexity']:.2f})" if r.get("loss") is not None else "not measured"


def _chat_note(cfg: RunConfig) -> str:
    template = (f"the template {cfg.data.chat_template}" if cfg.data.chat_template
                else "the teacher tokenizer's chat template")
    targets = "the assistant's tokens" if cfg.data.train_on == "assistant" else "all tokens"
    return f"; chat rows rendered with {template}, targets: {targets} (--train-on {cfg.data.train_on})"


def card_text(f: CardFacts) -> str:
    """README.md: the metadata block, then what the student is and how it was made."""
    cfg = f.cfg
    sources = split_weights(cfg.data.files)
    weights = sum(w for _, w in sources)
    data = "; ".join(f"{' '.join(p)}" + (f" (weight {w / weights:.0%})" if len(sources) > 1 else "")
                     for p, w in sources)
    rows = [
        ("teacher", f"{cfg.teacher} ({f.teacher_parameters:,} parameters)"),
        ("method", f"{cfg.method}: {METHOD_NAMES.get(cfg.method, cfg.method)}"
                   + (f", init {cfg.student.init}" if cfg.method in ("lrc", "kd") else "")),
        ("student", f"{f.shape}; {f.parameters:,} parameters ({f.parameters / f.teacher_parameters:.1%} of the "
                    "teacher)"),
        ("data", data + (_chat_note(cfg) if f.chat else "")),
        ("trained", f"{f.step:,} steps, {f.tokens:,} tokens, sequences of {cfg.data.seq_len}, {cfg.train.batch_size} x "
                    f"{cfg.train.grad_accum} sequences per process per step"),
        ("learning rate", f"{cfg.optim.lr:.3g} peak, {cfg.optim.schedule} schedule, warm-up "
                          f"{cfg.optim.warmup_ratio:.0%}"
         if isinstance(cfg.optim.lr, float) else str(cfg.optim.lr)),
        ("held-out loss", f"student {_loss(f.heldout)}; teacher {_loss(f.teacher_heldout)}"),
    ]
    meta = yaml.safe_dump(front_matter(f), sort_keys=False).strip()
    lines = [f"---\n{meta}\n---", "", f"# {f.name}", "",
             f"A student distilled from `{cfg.teacher}` with [lowrankclone](https://arxiv.org/abs/2505.12781) "
             f"(run `{cfg.out}`, exported at step {f.step:,}). It is an ordinary Hugging Face causal LM of the "
             "teacher's architecture: load it with `AutoModelForCausalLM.from_pretrained`.", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if f.chat:
        lines += ["", "It carries the chat template it was trained with (`chat_template.jinja`): use "
                  "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`."]
    lines += ["", "## How it was made", "", "```", *(f.commands or ["(command line not recorded)"]), "```",
              "", "The full configuration is in `lrc-config.yaml`.",
              "", "## Licence", "",
              "The student's weights are derived from the teacher's; the teacher's licence and notices apply "
              "(copied here where the teacher folder held them)."]
    return "\n".join(lines) + "\n"


def write_card(out: Path, facts: CardFacts, teacher: Path | None) -> list[str]:
    """README.md, lrc-config.yaml and the licence files of the teacher's folder (`teacher_folder`) into `out`;
    the names of the licence files."""
    (out / "README.md").write_text(card_text(facts), encoding="utf-8")
    (out / "lrc-config.yaml").write_text(yaml.safe_dump(facts.cfg.to_dict(), sort_keys=False))
    return copy_licence_files(teacher, out)
