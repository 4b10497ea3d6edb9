"""How close `lrc plan`'s peak-memory forecast comes to the peak RSS of a real `lrc distill` run.

For each shape: save a random Llama teacher of that shape (weights in --teacher-dtype, a small BPE
tokenizer), write a small corpus, run `lrc distill` for 2 optimizer steps in a fresh subprocess (on CPU,
--precision fp32 by default) and compare its peak resident memory (VmHWM, i.e. ru_maxrss) with the plan of
the same options. Each run is its own process, so nothing of one run's memory carries into the next. The
child reads every teacher weight once after loading (--no-touch: not), as a long run does: a checkpoint in
its storage dtype is memory-mapped, and an untied input embedding would otherwise stay resident only for the
few tokens of this corpus.

    python benchmarks/plan_accuracy.py                                   # the calibration set (~20 min, <3 GiB)
    python benchmarks/plan_accuracy.py --malloc default fixed           # also with MALLOC_MMAP_THRESHOLD_ set
    python benchmarks/plan_accuracy.py --shapes llama-3.2-1b --teacher-dtype bfloat16 --grad-accum 1
                                                                         # the issue's target: ~12 GiB, minutes
    python benchmarks/plan_accuracy.py --shapes s2048 --set layers=4 --trace   # + RSS and malloc per phase
    python benchmarks/plan_accuracy.py --runtime                          # the process's import baseline

--malloc fixed runs the child with MALLOC_MMAP_THRESHOLD_=131072: glibc then maps every block of 128 KiB or
more on its own and returns it when freed, instead of keeping freed heap memory resident (the forecast's
"allocator slack" line is left out for those runs). --trace samples the child's RSS every 2 ms and reports
the largest value in each phase of the run (load, init, evaluation, forward, loss, backward, optimizer, save)
with glibc's heap account (mallinfo2) at that moment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # hidden, layers, heads, kv heads, head_dim, ffn, vocab, tied, student hidden, seq_len
    "s256": dict(hidden=256, layers=4, heads=4, kv=2, head_dim=64, ffn=1024, vocab=16000, tied=False,
                 d_s=128, seq=256),
    "s512": dict(hidden=512, layers=4, heads=8, kv=2, head_dim=64, ffn=2048, vocab=32000, tied=True,
                 d_s=256, seq=512),
    # like Llama-3.2-1B's proportions (d_S at half width, factored roles at this token count), 4 layers
    "s1024": dict(hidden=1024, layers=4, heads=16, kv=4, head_dim=64, ffn=4096, vocab=32000, tied=True,
                  d_s=512, seq=256),
    # Llama-3.2-1B's layer (hidden 2048, FFN 8192, 32/8 heads) with 2 layers and a 32K vocabulary
    "s2048": dict(hidden=2048, layers=2, heads=32, kv=8, head_dim=64, ffn=8192, vocab=32000, tied=True,
                  d_s=1024, seq=512),
    "s512-untied-128k": dict(hidden=512, layers=2, heads=8, kv=2, head_dim=64, ffn=1536, vocab=128256,
                             tied=False, d_s=256, seq=256),
    # the target: Llama-3.2-1B (llama3 RoPE, tied) to hidden 1024, 1 x 512 tokens (~10+ GiB)
    "llama-3.2-1b": dict(hidden=2048, layers=16, heads=32, kv=8, head_dim=64, ffn=8192, vocab=128256, tied=True,
                         d_s=1024, seq=512, llama3_rope=True),
}
DEFAULT_SHAPES = ("s256", "s512", "s1024", "s2048", "s512-untied-128k")

CHILD = r"""
import json, sys, threading, time
trace = "trace" in sys.argv[1].split(",")
touch = "touch" in sys.argv[1].split(",")
argv = sys.argv[2:]
samples = {}
state = {"label": "start", "step": 1, "stop": False}

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def heap():
    # glibc's own account: (heap bytes in use, heap bytes free but kept, bytes in mmapped chunks)
    import ctypes
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    m = libc.mallinfo2()
    return {"heap_used": m.uordblks, "heap_free": m.fordblks, "mmapped": m.hblkhd}

heaps = {}

def sampler():
    best = 0
    while not state["stop"]:
        key = state["label"]
        now = rss()
        if now > samples.get(key, 0):
            samples[key] = now
            try:
                heaps[key] = heap()
            except Exception:
                pass
        if now > best:
            best = now
            samples["malloc at peak"] = heaps.get(key)
        time.sleep(0.002)

def labelled(obj, name, label, stepwise=False):
    inner = getattr(obj, name)
    def wrapper(*a, **k):
        samples.setdefault("at entry: " + label, rss())
        old = state["label"]
        state["label"] = f"step {state['step']} {label}" if stepwise else label
        try:
            return inner(*a, **k)
        finally:
            state["label"] = old
    setattr(obj, name, wrapper)

if touch:
    # Read every teacher weight once, as a long run does: a checkpoint in the storage dtype is memory-mapped,
    # and an untied input embedding would otherwise stay resident only for the few tokens of this corpus.
    import lrc.train.run
    load = lrc.train.run.load_teacher
    def load_touched(*a, **k):
        model = load(*a, **k)
        for p in model.parameters():
            float(p.detach().sum())
        return model
    lrc.train.run.load_teacher = load_touched

if trace:
    import torch
    import lrc.train.checkpoint, lrc.student.init, lrc.train.run, lrc.train.trainer, lrc.model.losses, lrc.model.weights
    from lrc.model.clone import LowRankClone
    labelled(lrc.train.run, "load_teacher", "load teacher")
    labelled(lrc.student.init, "init_pca", "init (pca)")
    labelled(lrc.train.trainer, "build_method", "build method")
    labelled(lrc.train.trainer, "_evaluate", "eval")
    labelled(lrc.train.checkpoint, "save_checkpoint", "save")
    labelled(lrc.model.weights.StepWeights, "__init__", "step weights", True)
    labelled(lrc.model.weights.StepWeights, "finish", "finish", True)
    labelled(LowRankClone, "forward", "forward", True)
    labelled(lrc.model.losses._FusedKDLMLoss, "forward", "loss", True)
    labelled(torch.Tensor, "backward", "backward", True)
    labelled(torch.autograd, "backward", "backward", True)
    step = torch.optim.AdamW.step
    def opt_step(self, *a, **k):
        old = state["label"]
        state["label"] = f"step {state['step']} optimizer"
        try:
            return step(self, *a, **k)
        finally:
            state["label"] = old
            state["step"] += 1
    torch.optim.AdamW.step = opt_step
    threading.Thread(target=sampler, daemon=True).start()

from lrc.cli import main
rc = main(argv)
state["stop"] = True
hwm = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        hwm = int(line.split()[1]) * 1024
print("@@RESULT " + json.dumps({"rc": rc, "peak": hwm, "phases": samples, "heaps": heaps}), flush=True)
"""

RUNTIME_CHILD = r"""
import json
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
import lrc.cli, lrc.train.trainer, lrc.model.clone, lrc.student.baselines, lrc.data, lrc.student.init, lrc.model.export
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("@@RESULT " + json.dumps({"peak": int(line.split()[1]) * 1024}))
"""


def child_env(cache: Path) -> dict:
    return dict(os.environ, LRC_CACHE=str(cache), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def words(n_docs: int, n_words: int, seed: int = 0) -> list[str]:
    import random

    vocab = ("the king queen castle night sword river crown ghost storm heart love death honour play speak dream "
             "gold field wind rose moon star fire stone bread wine horse ship sea tower bell").split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) for _ in range(n_words)) + "." for _ in range(n_docs)]


def save_teacher(shape: dict, dtype: str, path: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lrc.data.tokenizer import train_bpe

    kw = dict(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
              num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
              num_key_value_heads=shape["kv"], head_dim=shape["head_dim"], max_position_embeddings=4096,
              tie_word_embeddings=shape["tied"], rms_norm_eps=1e-5)
    if shape.get("llama3_rope"):
        kw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**kw), dtype=getattr(torch, dtype))
    model.save_pretrained(path)
    train_bpe(words(200, 50), vocab_size=300).save_pretrained(path)
    del model
    return path


def write_data(folder: Path, seq_len: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    n_docs = max(40, 40 * seq_len // 200)  # about 40 sequences of seq_len tokens
    for i, d in enumerate(words(n_docs, 200, seed=1)):
        (folder / f"doc{i:04d}.txt").write_text(d)
    return folder


def distill_args(shape: dict, teacher: Path, data: Path, out: Path, teacher_dtype: str, accum: int,
                 precision: str, extra: list[str]) -> list[str]:
    return ["distill", "--method", "lrc", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--hidden-size", str(shape["d_s"]), "--seq-len", str(shape["seq"]), "--batch-size", "1",
            "--grad-accum", str(accum), "--max-steps", "2", "--precision", precision,
            "--teacher-dtype", teacher_dtype, "--device", "cpu", "--calib-batches", "2", "--eval-batches", "2",
            "--log-every", "1", *extra]


def predict(argv: list[str], heap_slack: bool | None = None):
    from lrc.cli import build_parser
    from lrc.config import FIELDS, build_config
    from lrc.plan.estimate import plan_run

    args = build_parser().parse_args(argv)
    cfg = build_config({k: getattr(args, k) for k in FIELDS if hasattr(args, k)})
    return plan_run(cfg, device="cpu", heap_slack=heap_slack)


def run_child(code: str, argv: list[str], env: dict, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT "):
            return json.loads(line[len("@@RESULT "):])
    raise RuntimeError(f"child failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def measure_one(name, shape, dtype, accum, malloc, teacher, data, tmp, env, args) -> dict:
    out = tmp / f"run-{name}-{dtype}-{accum}-{time.time_ns()}"
    argv = distill_args(shape, teacher, data, out, dtype, accum, args.precision, args.extra)
    t0 = time.time()
    mode = ",".join(["plain"] + ["trace"] * args.trace + ["touch"] * (not args.no_touch))
    child_env = dict(env, MALLOC_MMAP_THRESHOLD_="131072") if malloc == "fixed" else env
    r = run_child(CHILD, [mode, *argv], child_env, args.timeout)
    if r["rc"] != 0:
        raise SystemExit(f"lrc distill failed with status {r['rc']}: {argv}")
    plan = predict(argv, heap_slack=malloc == "default")
    err = plan.peak_bytes / r["peak"] - 1
    row = {"shape": name, "teacher_dtype": dtype, "grad_accum": accum, "malloc": malloc, "measured": r["peak"],
           "predicted": plan.peak_bytes, "error": err, "predicted_phase": plan.peak_phase,
           "phases_predicted": plan.phases, "phases_measured": r["phases"], "seconds": time.time() - t0,
           "parts": {p.name: p.bytes for p in plan.memory}}
    print(f"{name:<18} {dtype:<9} {accum:>5} {malloc:<7} {r['peak'] / 2**30:>8.3f} G {plan.peak_bytes / 2**30:>8.3f} G "
          f"{err:>+7.1%}  {plan.peak_phase} ({', '.join(f'{p.name} {p.bytes / 2**20:.0f}M' for p in plan.memory)})",
          flush=True)
    if args.trace:
        print(f"    malloc at the peak (MiB): "
              f"{ {k: round(v / 2**20) for k, v in (r['phases'].pop('malloc at peak', None) or {}).items()} }")
        for k, v in sorted(r["phases"].items(), key=lambda kv: -kv[1]):
            h = r.get("heaps", {}).get(k) or {}
            print(f"    measured {k:<28} {v / 2**20:8.0f} MiB"
                  + (f"  (heap used {h['heap_used'] / 2**20:.0f}, free {h['heap_free'] / 2**20:.0f}, "
                     f"mmapped {h['mmapped'] / 2**20:.0f})" if h else ""))
        for k, v in plan.phases.items():
            print(f"    predicted {k:<27} {v / 2**20:8.0f} MiB")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), choices=list(SHAPES))
    ap.add_argument("--teacher-dtype", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--grad-accum", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--malloc", nargs="+", default=["default"], choices=["default", "fixed"],
                    help="glibc as it comes (dynamic mmap threshold), or MALLOC_MMAP_THRESHOLD_=131072 in the child")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override shape fields, e.g. layers=4 seq=256 (see SHAPES)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `lrc distill` options, last")
    ap.add_argument("--trace", action="store_true", help="also report the child's peak RSS per phase")
    ap.add_argument("--no-touch", action="store_true",
                    help="do not read the whole teacher at load: an untied teacher's memory-mapped input embedding "
                         "then stays resident only for the rows of the tokens this small corpus uses")
    ap.add_argument("--runtime", action="store_true", help="only measure the import baseline and exit")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="lrc-plan-accuracy-") as tmp:
        tmp = Path(tmp)
        env = child_env(tmp / "cache")
        if args.runtime:
            r = run_child(RUNTIME_CHILD, [], env, args.timeout)
            print(f"runtime baseline (imports only): {r['peak'] / 2**20:.0f} MiB")
            return
        rows = []
        print(f"{'shape':<18} {'teacher':<9} {'accum':>5} {'malloc':<7} {'measured':>10} {'predicted':>10} "
              f"{'error':>7}  "
              f"predicted peak phase", flush=True)
        for name in args.shapes:
            shape = dict(SHAPES[name])
            for kv in args.set:
                k, v = kv.split("=", 1)
                shape[k] = type(shape[k])(v) if k in shape and not isinstance(shape[k], bool) else v == "True"
            if args.set:
                name = name + "[" + ",".join(args.set) + "]"
            data = write_data(tmp / f"data-{shape['seq']}", shape["seq"])
            for dtype in args.teacher_dtype:
                teacher = tmp / f"teacher-{name}-{dtype}"
                if not teacher.exists():
                    save_teacher(shape, dtype, teacher)
                for accum in args.grad_accum:
                    for malloc in args.malloc:
                        rows.append(measure_one(name, shape, dtype, accum, malloc, teacher, data, tmp, env, args))
        if rows:
            worst = max(rows, key=lambda r: abs(r["error"]))
            print(f"largest error: {worst['error']:+.1%} ({worst['shape']}, {worst['teacher_dtype']}, "
                  f"accum {worst['grad_accum']}, malloc {worst['malloc']})")
        if args.json:
            print(json.dumps(rows))


if __name__ == "__main__":
    main()
