"""Small teachers trained here from scratch (`--method scratch` with a BPE tokenizer trained on the same text),
cached by their recipe: the demo's, and the benchmarks' (which reuse the demo's cached teachers).

A `Recipe` names the teacher's shape and training and the students' settings the demo and benchmarks pair
with it; only the teacher's own fields key its cache, so changing a student setting reuses the teacher.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lrc.config import RunConfig
from lrc.data.tokenizer import train_bpe
from lrc.model.export import save_student
from lrc.train.run import load_run
from lrc.train.trainer import distill


@dataclass(frozen=True)
class Recipe:
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


DEMO = Recipe()
DEMO_QUICK = Recipe(teacher_hidden=192, ffn=512, student_hidden=96, teacher_tokens=160_000,
                     student_tokens=80_000, eval_every=10, eval_batches=4, final_eval_sequences=96)
DEMO_TINY = Recipe(vocab=320, teacher_hidden=48, teacher_layers=2, heads=2, kv_heads=1, ffn=96,
                    student_hidden=24, seq_len=32, batch=4, teacher_tokens=2_048, student_tokens=1_024,
                    eval_every=4, eval_batches=1, final_eval_sequences=8, task_items=8)

# The benchmarks' teacher: the demo's shape trained on 10x its tokens (several epochs of the training plays), so
# that students at the budgets measured (up to a third of its tokens) stay below it.
STRONG = Recipe(teacher_tokens=5_000_000, eval_every=250)


def _log(msg: str) -> None:
    print(f"[teacher] {msg}", flush=True)


# What the cached teacher depends on: the students' settings may change without retraining it.
_TEACHER_FIELDS = ("vocab", "teacher_hidden", "teacher_layers", "heads", "kv_heads", "ffn", "seq_len", "batch",
                   "teacher_tokens", "teacher_lr", "eval_every", "eval_batches")


def _key(s: Recipe) -> str:
    fields = {k: getattr(s, k) for k in _TEACHER_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def build_teacher(s: Recipe, train: list[Path], val: list[Path], cache: Path) -> tuple[Path, Path, float]:
    """Train (or reuse, from `cache`) the teacher of recipe `s` on the `train` files; returns (model dir, its
    metrics.jsonl, seconds spent now)."""
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
    _, method, tokenizer, _ = load_run(run)
    save_student(method.student_model(), model_dir, tokenizer)
    shutil.copy(run / "metrics.jsonl", metrics)
    shutil.rmtree(run)
    return model_dir, metrics, time.time() - t0
