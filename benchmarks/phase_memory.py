"""Peak RSS of each phase of an `lrc distill` step, per process (how issue 23's four-process gap was attributed,
BENCHMARKS.md "The teacher-size ceiling"): a thread samples VmRSS every millisecond and books it to the phase
running then (teacher forward, student forward, loss, backward, optimizer, and "after X" between them). Linux only.

    MALLOC_MMAP_THRESHOLD_=131072 PYTHONPATH=src torchrun --standalone --nproc-per-node 4 \
        benchmarks/phase_memory.py distill --method lrc --parallel fsdp ...   # any lrc distill arguments

Prints one line per process at exit: PHASEMEM RANK {phase: GiB}, largest first."""
import atexit
import json
import os
import sys
import threading
import time

import torch

import lrc.methods.lrc as ml
import lrc.model.clone as cl
from lrc.cli import main

label = ["setup"]
peaks: dict = {}

def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0

def sampler():
    while True:
        kb = rss_kib()
        lab = label[0]
        if kb > peaks.get(lab, 0):
            peaks[lab] = kb
        time.sleep(0.001)

threading.Thread(target=sampler, daemon=True).start()

def tag(owner, name, lab):
    orig = getattr(owner, name)
    def wrapped(*a, **k):
        label[0] = lab
        try:
            return orig(*a, **k)
        finally:
            label[0] = "after " + lab
    setattr(owner, name, wrapped)

tag(cl, "teacher_activations", "teacher forward")
tag(cl.LowRankClone, "_run_student", "student forward")
tag(ml, "lrc_objective", "loss")
tag(torch.autograd, "backward", "backward")
tag(torch.optim.AdamW, "step", "optimizer")

@atexit.register
def report():
    gib = {k: round(v / 2**20, 3) for k, v in sorted(peaks.items(), key=lambda x: -x[1])}  # KiB -> GiB
    print("PHASEMEM", os.environ.get("RANK", "0"), json.dumps(gib), flush=True)

sys.exit(main(sys.argv[1:]))
