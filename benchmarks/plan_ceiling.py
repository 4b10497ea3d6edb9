"""The teacher-size ceiling by `lrc plan` (issue 23): per-GPU peaks of the issue's rows before and after, each
with its verdict for 80 GiB GPUs and the smallest change that fits, from the published configs in
benchmarks/configs (config.json only: nothing is loaded).

"after": this checkout. "before": another checkout's src/ (--before-src; e.g. `git archive 60f127a src | tar -x
-C /tmp/lrc-before`), whose plan has no verdict: only its peak is read.

    python benchmarks/plan_ceiling.py --before-src /tmp/lrc-before/src --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GiB = 1 << 30
COMMON = ["--method", "lrc", "--parallel", "fsdp", "--seq-len", "2048", "--precision", "bf16", "--grad-checkpointing"]
# (label, teacher folder, student hidden, GPUs, micro-batch)
ROWS = [("Llama-3.1-8B -> 2048, micro-batch 2 x 2048", "llama-3.1-8b", 2048, 8, 2),
        ("Qwen2.5-32B -> 2560", "qwen2.5-32b", 2560, 16, 1),
        ("Llama-3.1-70B -> 4096", "llama-3.1-70b", 4096, 64, 1)]


def plan(src: str, argv: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lrc", "plan", *argv, "--json"], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout)


def largest(p: dict, n: int = 3) -> str:
    parts = sorted(p["memory"], key=lambda q: -q["bytes"])[:n]
    return ", ".join(f"{q['name']} {q['bytes'] / GiB:.1f}" for q in parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before-src", help="src/ of the checkout to compare with")
    ap.add_argument("--gpu-memory", default="80GiB")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    after_src = str(HERE.parent / "src")
    lines = ["| teacher -> hidden | GPUs | per-GPU peak before | per-GPU peak after | after, with --recompute-targets "
             f"| largest parts of that, GiB | verdict at {args.gpu_memory} (after) | smallest change that fits "
             "| host memory per process at load, before -> after |", "|---|---|---|---|---|---|---|---|---|"]
    for label, folder, hidden, gpus, batch in ROWS:
        argv = ["--teacher", str(HERE / "configs" / folder), "--hidden-size", str(hidden), "--batch-size",
                str(batch), *COMMON]
        before = plan(args.before_src, [*argv, "--nproc", str(gpus), "--device", "cuda"]) \
            if args.before_src else None
        after = plan(after_src, [*argv, "--gpus", str(gpus), "--gpu-memory", args.gpu_memory])
        lean = plan(after_src, [*argv, "--recompute-targets", "--nproc", str(gpus), "--device", "cuda"])
        lean_peak = max(b for k, b in lean["phases"].items() if k != "load")
        v = after["verdict"]
        s = v["suggestion"]
        change = "-" if v["fits"] else (f"{s['words']} (peak {s['peak_bytes'] / GiB:.1f} GiB)" if s else "none")
        device_peak = max(b for k, b in after["phases"].items() if k != "load")
        lines.append(
            f"| {label} | {gpus} | {before['peak_bytes'] / GiB:.1f} GiB ({before['peak_phase']}) | "
            f"{device_peak / GiB:.1f} GiB | {lean_peak / GiB:.1f} GiB | {largest(lean)} | "
            f"{'fits' if v['fits'] else 'does not fit'} | "
            f"{change} | {before['phases']['load'] / GiB:.1f} -> {after['phases']['load'] / GiB:.1f} GiB |"
            if before else f"| {label} | {gpus} | - | {device_peak / GiB:.1f} GiB | ... |")
        print(lines[-1], flush=True)
    md = "\n".join(lines)
    print(md)
    if args.markdown:
        args.markdown.write_text(md + "\n")


if __name__ == "__main__":
    main()
