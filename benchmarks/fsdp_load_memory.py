"""Peak host memory per process of `lrc distill --parallel fsdp` on CPU (gloo) with a Llama-3.2-1B-shaped bf16
teacher (1.24B parameters, random weights, 2.5 GB), before and after each process reads only its own shards
of the teacher (issue 23), next to `lrc plan`'s forecast of the same run.

"after": this checkout. "before": another checkout's src/ (--before-src; e.g. `git archive 60f127a src | tar
-x -C /tmp/lrc-before`), where every process loads the whole teacher before FSDP shards it. Each process's
peak is its VmHWM read from /proc while it runs (benchmarks/sharded_memory.py). The runs set
MALLOC_MMAP_THRESHOLD_ (the plan's calibrated setting, no glibc heap slack).

    flock /tmp/lrc-heavy.lock python benchmarks/fsdp_load_memory.py --before-src /tmp/lrc-before/src \\
        --work /tmp/lrc-1b --markdown out.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from sharded_memory import _children, _hwm_kib  # noqa: E402

# Llama-3.2-1B (shared/reference/real-teachers.md: tied head)
SHAPE = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
             max_position_embeddings=4096, rms_norm_eps=1e-5)
ARGS = ["--hidden-size", "256", "--seq-len", "64", "--batch-size", "1", "--grad-accum", "1",
        "--precision", "fp32", "--init", "random", "--eval-every", "0", "--val-fraction", "0", "--log-every", "1",
        "--parallel", "fsdp", "--device", "cpu", "--lr", "1e-3"]
GiB = 1 << 30


def make_inputs(root: Path) -> tuple[Path, Path]:
    """The teacher (saved once; reused from `root`) and a small text folder."""
    from helpers import write_data

    teacher = root / "teacher"
    if not (teacher / "model.safetensors").is_file():
        import torch
        from helpers import corpus
        from transformers import AutoModelForCausalLM, LlamaConfig

        from lrc.data.tokenizer import train_bpe

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE), dtype=torch.bfloat16)
        model.save_pretrained(teacher)
        train_bpe(corpus(), vocab_size=300).save_pretrained(teacher)
        del model
    data = root / "data"
    if not data.is_dir():
        write_data(data)
    return teacher, data


def lrc_argv(teacher: Path, data: Path, out: Path, steps: int = 2) -> list[str]:
    return ["distill", "--method", "lrc", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *ARGS,
            "--max-steps", str(steps)]


def measure(src: str, nproc: int, teacher: Path, data: Path, out: Path, steps: int = 2) -> list[float]:
    """Peak RSS (bytes) of each training process, largest first."""
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", LRC_CACHE=str(out / "cache"),
               MALLOC_MMAP_THRESHOLD_="131072")
    lrc = ["-m", "lrc", *lrc_argv(teacher, data, out / "run", steps)]
    cmd = [sys.executable, *lrc] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *lrc]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        for w in [proc.pid] if nproc == 1 else _children(proc.pid):
            hwm = _hwm_kib(w)
            if hwm is not None:
                peaks[w] = max(peaks.get(w, 0), hwm)
        time.sleep(0.05)
    text = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0 or f"done: {steps} steps" not in text:
        raise SystemExit(f"run failed ({proc.returncode}):\n{text[-3000:]}")
    return sorted((v * 1024 for v in peaks.values()), reverse=True)


def forecast(teacher: Path, data: Path, nproc: int) -> tuple[int, str]:
    """The plan's peak per process for the same run (heap slack off: the runs fix the mmap threshold)."""
    from lrc.cli import build_parser
    from lrc.config import FIELDS, build_config
    from lrc.plan.estimate import plan_run

    args = build_parser().parse_args(lrc_argv(teacher, data, Path("unused")))
    cfg = build_config({k: getattr(args, k) for k in FIELDS if hasattr(args, k)})
    plan = plan_run(cfg, nproc=nproc, device="cpu", heap_slack=False)
    return plan.peak_bytes, plan.peak_phase


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before-src", help="src/ of a checkout where every process loads the whole teacher")
    ap.add_argument("--work", type=Path, required=True, help="folder for the teacher (kept) and the runs")
    ap.add_argument("--runs", nargs="+", default=["after-1", "after-4", "before-4"],
                    help="which runs: LABEL-NPROC with LABEL before or after")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps; 0: set-up only (loading and sharding "
                    "the teacher, building the clone), whose peak is the loading's")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    teacher, data = make_inputs(args.work)
    rows = []
    for run in args.runs:
        label, n = run.split("-")
        src = str(HERE.parent / "src") if label == "after" else args.before_src
        if src is None:
            raise SystemExit("--before-src is needed for a before run")
        t0 = time.time()
        peaks = measure(src, int(n), teacher, data, args.work / f"{run}-{int(t0)}", args.steps)
        planned, phase = forecast(teacher, data, int(n)) if label == "after" and args.steps else (None, "")
        wall = time.time() - t0
        rows.append((label, int(n), peaks, planned, phase, wall))
        print(f"{run}: peak RSS per process {', '.join(f'{p / GiB:.2f}' for p in peaks)} GiB; plan "
              f"{'-' if planned is None else f'{planned / GiB:.2f} GiB ({phase})'}; {wall:.0f} s", flush=True)
    lines = ["| checkout | processes | peak RSS per process, GiB (largest first) | plan, GiB (phase) | plan error "
             "| wall s |", "|---|---|---|---|---|---|"]
    for label, n, peaks, planned, phase, wall in rows:
        err = f"{(planned - max(peaks)) / max(peaks):+.1%}" if planned else "-"
        plan = f"{planned / GiB:.2f} ({phase})" if planned else "-"
        lines.append(f"| {label} | {n} | {', '.join(f'{p / GiB:.2f}' for p in peaks)} | {plan} | {err} "
                     f"| {wall:.0f} |")
    md = "\n".join(lines)
    print(md)
    if args.markdown:
        args.markdown.write_text(md + "\n")


if __name__ == "__main__":
    main()
