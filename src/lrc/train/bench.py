"""`lrc bench`: what an LRC optimizer step costs beyond what it cannot avoid.

    overhead = t(LRC optimizer step) / (t(no-grad teacher forward) + t(training step of the exported
               student architecture)),  all on the same batch, dtype and process settings.

Variants: `teacher_fwd` (no-grad forward, logits included), `student_step` (ordinary training of the
exported student architecture, CE only), `lrc` (the optimised path: weights generated once per optimizer
step and reused across micro-batches, each role generated or factored by the cost model, input embedding
by gathered rows, chunked fused CE + KL) and `lrc_naive` (every matrix generated per micro-batch,
full-vocabulary logits through autograd). Times are medians of round-robin runs in one process (the
machine's speed drifts over minutes; interleaving keeps the ratios fair); peak memory comes from each
variant alone in a fresh process (peak RSS on CPU, peak allocated on CUDA).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lrc.data.batch import Batch, next_token_labels
from lrc.distributed.processes import DistInfo, pick_device
from lrc.methods.base import Method
from lrc.methods.direct import Direct
from lrc.methods.lrc import LRC
from lrc.model.clone import LowRankClone
from lrc.model.costs import lrc_step_floor
from lrc.model.precision import resolve_precision
from lrc.student.baselines import random_student
from lrc.train.trainer import train_step

SHAPES = {
    "small": dict(hidden=256, layers=4, heads=4, kv=4, ffn=768, vocab=4096, seq=256, d_s=128, batch=4),
    "large": dict(hidden=1024, layers=8, heads=16, kv=4, ffn=2816, vocab=32000, seq=512, d_s=512, batch=1),
    # the large shape at 8 sequences per micro-batch: how the overhead falls with tokens per micro-batch
    "large-b8": dict(hidden=1024, layers=8, heads=16, kv=4, ffn=2816, vocab=32000, seq=512, d_s=512, batch=8),
    # for the loss-memory benchmark: a small model whose memory is dominated by the vocabulary
    "vocab32k": dict(hidden=128, layers=2, heads=4, kv=2, ffn=384, vocab=32000, seq=2048, d_s=64, batch=1),
    "vocab128k": dict(hidden=128, layers=2, heads=4, kv=2, ffn=384, vocab=128256, seq=2048, d_s=64, batch=1),
}
VARIANTS = ("teacher_fwd", "student_step", "lrc", "lrc_naive")


def _peak_rss() -> int:
    """This process's peak resident memory in bytes. VmHWM belongs to the address space, which exec
    replaces; getrusage's ru_maxrss would carry over the parent's peak into a forked-and-exec'd child."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _teacher(shape):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv"], max_position_embeddings=2 * shape["seq"],
                      tie_word_embeddings=True,
                      attn_implementation="sdpa")  # type: ignore[call-arg]  # a PretrainedConfig kwarg, untyped
    return AutoModelForCausalLM.from_config(cfg).eval()


def _setup(shape_name: str, accum: int, variants, precision: str = "auto"):
    """One shared teacher and a step function per variant (closures over their own optimizer state)."""

    shape = SHAPES[shape_name]
    device = pick_device("auto")
    prec = resolve_precision(precision, device)
    teacher = _teacher(shape).to(device)
    g = torch.Generator().manual_seed(0)
    b, t = shape["batch"], shape["seq"]
    pos = torch.arange(t).expand(b, t)
    micro: list[Batch] = []
    for _ in range(accum):
        ids = torch.randint(0, shape["vocab"], (b, t), generator=g)
        micro.append({"input_ids": ids, "position_ids": pos, "labels": next_token_labels(ids, pos)})

    def make(variant):
        if variant == "teacher_fwd":
            def forward():
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16"):
                    for m in micro:  # with logits, as KL needs
                        teacher(input_ids=m["input_ids"].to(device), position_ids=pos.to(device), use_cache=False)
            return forward
        method: Method
        if variant == "student_step":
            method = Direct(random_student(teacher, shape["d_s"], 0))
        else:  # the naive path generates every matrix per micro-batch, like the official code
            naive = variant == "lrc_naive"
            method = LRC(LowRankClone(teacher, shape["d_s"]), fused_loss=not naive, reuse_weights=not naive)
            if not naive:
                method.prepare(b * t, reuse=accum, sharded=False)
        method.to(device)
        opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-4)
        # the trainer's own step (no clipping, as before: the plain student step pays none either)
        return lambda: train_step(method, micro, opt, device=device, precision=prec, info=DistInfo(device=device))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    info = {"device": str(device), "precision": prec, "tokens": b * t * accum}
    return {v: make(v) for v in variants}, sync, info


def cost_floor(shape_name: str, accum: int) -> float:
    """The cost model's lowest possible overhead for this shape (`lrc.model.costs.lrc_step_floor`)."""
    s = SHAPES[shape_name]
    head_dim = s["hidden"] // s["heads"]
    q, kv = s["heads"] * head_dim, s["kv"] * head_dim
    outs = [q, kv, kv, q, s["ffn"], s["ffn"], s["ffn"]]
    return lrc_step_floor(s["batch"] * s["seq"], s["hidden"], s["d_s"], outs, s["vocab"], s["layers"], reuse=accum)


def measure(shape_name: str, accum: int, variant: str, steps: int, precision: str = "auto") -> dict:
    """Median step time and peak memory of one variant alone (run it in a fresh process for the memory)."""
    steps_by_variant, sync, info = _setup(shape_name, accum, [variant], precision)
    step = steps_by_variant[variant]
    step()  # warm-up (allocations, kernels)
    sync()
    if info["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if info["device"].startswith("cuda") else _peak_rss()
    return {"shape": shape_name, "accum": accum, "variant": variant, "seconds": statistics.median(times),
            "peak_bytes": peak, **info}


def measure_interleaved(shape_name: str, accum: int, steps: int, precision: str = "auto") -> tuple[dict, dict]:
    """Median step time of every variant, measured round-robin in one process: on a shared or throttling
    machine the speed drifts over minutes, and interleaving makes the ratios fair."""
    steps_by_variant, sync, info = _setup(shape_name, accum, VARIANTS, precision)
    for step in steps_by_variant.values():
        step()  # warm-up
    sync()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(steps):
        for v, step in steps_by_variant.items():
            t0 = time.perf_counter()
            step()
            sync()
            times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(ts) for v, ts in times.items()}, info


def measure_in_subprocess(shape: str, accum: int, variant: str, steps: int) -> dict:
    """`measure` in a fresh interpreter, so that the peak memory it reports is this variant's alone."""
    cmd = [sys.executable, "-m", "lrc.train.bench", shape, str(accum), variant, str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_bench(shapes=("small", "large"), steps: int = 3, accums=(1, 4)) -> list[dict]:
    rows = []
    for shape in shapes:
        for accum in accums:
            seconds, info = measure_interleaved(shape, accum, steps)
            res = {}
            for variant in VARIANTS:  # memory: each variant alone in a fresh process, one timed step
                res[variant] = measure_in_subprocess(shape, accum, variant, 1)
                res[variant]["seconds"] = seconds[variant]
            base = res["teacher_fwd"]["seconds"] + res["student_step"]["seconds"]
            row = {"shape": shape, "accum": accum, "device": res["lrc"]["device"],
                   "precision": res["lrc"]["precision"], "tokens": res["lrc"]["tokens"]}
            for v in VARIANTS:
                row[f"{v}_s"] = res[v]["seconds"]
                row[f"{v}_peak_mib"] = res[v]["peak_bytes"] / 2**20
            row["overhead"] = res["lrc"]["seconds"] / base
            row["floor"] = cost_floor(shape, accum)
            row["overhead_naive"] = res["lrc_naive"]["seconds"] / base
            row["lrc_tokens_per_s"] = row["tokens"] / res["lrc"]["seconds"]
            row["naive_tokens_per_s"] = row["tokens"] / res["lrc_naive"]["seconds"]
            row["student_tokens_per_s"] = row["tokens"] / res["student_step"]["seconds"]
            rows.append(row)
            print(f"{shape:5s} accum {accum}: overhead {row['overhead']:.2f} (naive {row['overhead_naive']:.2f}, "
                  f"FLOP floor {row['floor']:.2f}) | "
                  f"LRC {row['lrc_tokens_per_s']:,.0f} tok/s (naive {row['naive_tokens_per_s']:,.0f}), plain "
                  f"student step {row['student_tokens_per_s']:,.0f} tok/s | teacher fwd {row['teacher_fwd_s']:.3f}s "
                  f"+ student step {row['student_step_s']:.3f}s vs LRC {row['lrc_s']:.3f}s | peak MiB: LRC "
                  f"{row['lrc_peak_mib']:,.0f}, naive {row['lrc_naive_peak_mib']:,.0f}, student "
                  f"{row['student_step_peak_mib']:,.0f} [{row['device']}, {row['precision']}]", flush=True)
    return rows


if __name__ == "__main__":
    shape, accum, variant, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    print(json.dumps(measure(shape, accum, variant, steps)))
