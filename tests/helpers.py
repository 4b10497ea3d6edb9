"""Saved tiny teachers with tokenizers and small corpora, for CLI tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from conftest import make_teacher

from lrc.data.tokenizer import train_bpe

WORDS = ("the king queen castle night sword river crown ghost storm heart love death honour play "
         "speak dream gold field wind rose").split()


def corpus(n_docs: int = 40, words: int = 60, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        # a little structure to learn: word i tends to be followed by word i+1
        idx = int(torch.randint(0, len(WORDS), (1,), generator=g))
        out = []
        for _ in range(words):
            out.append(WORDS[idx])
            idx = (idx + 1) % len(WORDS) if torch.rand(1, generator=g) < 0.8 else int(
                torch.randint(0, len(WORDS), (1,), generator=g))
        docs.append(" ".join(out) + ".")
    return docs


def save_teacher(path: Path, family: str = "llama", tied: bool = False) -> Path:
    tok = train_bpe(corpus(), vocab_size=300)
    teacher = make_teacher(family, tied, vocab_size=len(tok))
    teacher.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_data(folder: Path, kind: str = "txt", n_docs: int = 40, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    docs = corpus(n_docs, seed=seed)
    if kind == "txt":
        for i, d in enumerate(docs):
            (folder / f"doc{i:03d}.txt").write_text(d)
        return folder
    if kind == "jsonl":
        p = folder / "data.jsonl"
        p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        return p
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = folder / "data.parquet"
        pq.write_table(pa.table({"text": docs}), p)
        return p
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------- CLI runs


def run(*argv) -> None:
    """`lrc ARGV` in this process; it must succeed."""
    from lrc.cli import main

    assert main([str(a) for a in argv]) == 0


def env(cache_dir: Path) -> dict[str, str]:
    """The environment of an `lrc` subprocess: its own token cache, one thread, offline."""
    return dict(os.environ, LRC_CACHE=str(cache_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def records(run_dir: Path, split: str = "train") -> list[dict]:
    """The metrics.jsonl records of one split."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a job scheduler ends a job (torchrun's workers
    survive a SIGKILL of torchrun alone: they are in sessions of their own)."""
    import signal

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
