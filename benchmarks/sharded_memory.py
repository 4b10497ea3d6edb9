"""Peak memory per process of `lrc distill --parallel fsdp` on CPU (gloo), with and without the trainable
projections sharded (issue 16), for 1, 2 and 4 processes of one fixed shape.

"with": this checkout (teacher and layer projections sharded). "without": another checkout given by
--without-src (e.g. a main from before the change: the teacher sharded, the projections whole on every
process). Each process's peak is its VmHWM (peak resident set) read from /proc while it runs.

    flock /tmp/lrc-heavy.lock python benchmarks/sharded_memory.py --without-src /path/to/old/src --markdown out.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

# teacher hidden 1024 (16 heads of 64, 4 KV heads), MLP 1024, 8 layers; student hidden 1024: the projections
# (8 x 7 x 1024 x 1024 = 58.7M, 0.94 GB with gradients and AdamW moments) outweigh the teacher (46M, 0.18 GB)
SHAPE = dict(hidden_size=1024, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, head_dim=64)
ARGS = ["--hidden-size", "1024", "--seq-len", "64", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "2",
        "--precision", "fp32", "--init", "random", "--eval-every", "0", "--val-fraction", "0", "--log-every", "1",
        "--parallel", "fsdp"]


def make_inputs(root: Path) -> tuple[Path, Path]:
    from conftest import make_teacher
    from helpers import corpus, write_data

    from lrc.data.tokenizer import train_bpe

    tok = train_bpe(corpus(), vocab_size=300)
    teacher = make_teacher("llama", False, vocab_size=len(tok), **SHAPE)
    path = root / "teacher"
    teacher.save_pretrained(path)
    tok.save_pretrained(path)
    return path, write_data(root / "data")


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(src: str, nproc: int, teacher: Path, data: Path, out: Path) -> list[float]:
    """Peak RSS (GiB) of each training process."""
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", LRC_CACHE=str(out / "cache"))
    lrc = ["-m", "lrc", "distill", "--method", "lrc",
           "--teacher", str(teacher), "--data", str(data), "--out", str(out / "run"), *ARGS]
    cmd = [sys.executable, *lrc] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *lrc]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        workers = [proc.pid] if nproc == 1 else _children(proc.pid)
        for w in workers:
            hwm = _hwm_kib(w)
            if hwm is not None:
                peaks[w] = max(peaks.get(w, 0), hwm)
        time.sleep(0.05)
    text = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0 or "done: 2 steps" not in text:
        raise SystemExit(f"run failed ({proc.returncode}):\n{text[-3000:]}")
    held = [line for line in text.splitlines() if line.startswith(("layer projections", "held per process"))]
    for line in held:
        print(f"    {line}", flush=True)
    return sorted((v / 2**20 for v in peaks.values()), reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--without-src", required=True, help="src/ of a checkout without the sharded projections")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    with_src = str(HERE.parent / "src")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, data = make_inputs(root)
        for n in args.nproc:
            for label, src in (("without", args.without_src), ("with", with_src)):
                if n == 1 and label == "without":
                    continue  # one process shards nothing
                t0 = time.time()
                peaks = measure(src, n, teacher, data, root / f"{label}-{n}")
                row = (n, label if n > 1 else "(nothing to shard)", max(peaks), peaks, time.time() - t0)
                print(f"{n} process(es), {row[1]}: peak RSS per process {', '.join(f'{p:.2f}' for p in peaks)} "
                      f"GiB ({row[4]:.0f} s)", flush=True)
                rows.append(row)
    lines = ["| processes | projections sharded | peak RSS per process, GiB (largest first) | wall s |",
             "|---|---|---|---|"]
    for n, label, _, peaks, wall in rows:
        lines.append(f"| {n} | {label} | {', '.join(f'{p:.2f}' for p in peaks)} | {wall:.0f} |")
    md = "\n".join(lines)
    print(md)
    if args.markdown:
        args.markdown.write_text(md + "\n")


if __name__ == "__main__":
    main()
