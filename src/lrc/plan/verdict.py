"""Whether a planned run fits its GPUs, the smallest change that does, and what the run will cost to budget.

`lrc plan --gpus N --gpu-memory 80GiB` compares each phase of the plan (`lrc.plan.estimate`, per process) with one
device's memory and, when a phase does not fit, searches the options a user can change without touching the
model: gradient checkpointing (for LRC then also `--recompute-targets`), a smaller micro-batch (the gradient
accumulation grows so the tokens per optimizer step stay the same), more processes under `--parallel fsdp`
(which divides the teacher and the projections), and a shorter sequence (which changes what is trained, so it
comes last). The first candidate
that fits, in order of how little it changes, is printed as the command line with those options replaced.

`lrc distill` runs the same check before any weights load (`check_before_load`) and warns when the forecast
does not fit the device it will use: the forecast is a model, so it never stops a run.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lrc.config import RunConfig
from lrc.errors import UserError
from lrc.methods.registry import METHODS, lr_rule_options
from lrc.optim.lr_rule import AUTO, auto_lr
from lrc.optim.schedule import total_steps
from lrc.plan.estimate import plan_from_config

GiB = 1 << 30
# Peak dense bf16 TFLOP/s and memory of the GPUs users name with --gpu (vendors' datasheets, SXM parts).
GPUS: dict[str, tuple[float, int]] = {
    "H100": (989.0, 80 * GiB),
    "H200": (989.0, 141 * 10**9),
    "B200": (2250.0, 180 * 10**9),
    "A100": (312.0, 80 * GiB),
    "A100-40GB": (312.0, 40 * GiB),
    "L40S": (362.0, 48 * GiB),
}
# Phases whose memory is host (CPU) memory under fsdp, not the GPU's: the teacher read before it is sharded.
HOST_PHASES = ("load",)
MAX_PROCESSES = 1024
MIN_SEQ_LEN = 256
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
          "g": GiB, "gib": GiB, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


def parse_memory(text: str) -> int:
    """Bytes of "80GiB", "80G" (binary), "80GB" (decimal), "81920MiB" or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--gpu-memory {text!r} is not a memory size; write e.g. 80GiB, 40GB or 81920MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def gpu_spec(name: str) -> tuple[float, int]:
    """(peak dense bf16 TFLOP/s, memory bytes) of a GPU named with --gpu (case and a leading NVIDIA- ignored)."""
    key = name.strip().upper().removeprefix("NVIDIA").strip(" -_")
    if key not in GPUS:
        raise UserError(f"--gpu {name!r} is not one lrc knows; choose from {', '.join(GPUS)}, or give "
                        "--device-tflops and --gpu-memory")
    return GPUS[key]


def local_gpu() -> tuple[str, int] | None:
    """(name, memory bytes) of this machine's first CUDA device, or None without one."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, int(props.total_memory)


def known_tflops(device_name: str) -> float | None:
    """The table's peak TFLOP/s for a device name as CUDA reports it ("NVIDIA H100 80GB HBM3"), if listed."""
    upper = device_name.upper()
    for key in sorted(GPUS, key=len, reverse=True):
        if key.split("-")[0] in upper:
            return GPUS[key][0]
    return None


@dataclass
class GpuChoice:
    """What `lrc plan` knows of the GPUs: device ("cuda" or None: from --device), one GPU's memory and where
    that figure comes from, its name and peak TFLOP/s (None where unknown)."""

    device: str | None
    memory: int | None
    source: str
    name: str | None
    tflops: float | None


def gpu_memory_for(gpus: int | None, memory: str | None, name: str | None, tflops: float | None) -> GpuChoice:
    """The GPU `lrc plan` judges against: --gpu-memory, else --gpu NAME's, else the local CUDA device's; with
    --gpus and none of them, a UserError (there is nothing to compare with)."""
    spec = gpu_spec(name) if name else None
    local = local_gpu()
    if memory is not None:
        mem, source = parse_memory(memory), f"--gpu-memory {memory}"
    elif spec is not None:
        mem, source = spec[1], f"--gpu {name}"
    elif local is not None:
        mem, source = local[1], f"this machine's {local[0]}"
    elif gpus is not None:
        raise UserError("--gpus needs the memory of one GPU: give --gpu-memory SIZE (e.g. 80GiB) or --gpu NAME "
                        f"({', '.join(GPUS)}); this machine has no CUDA device to read it from")
    else:
        mem, source = None, ""
    label = name if name else (local[0] if local is not None else None)
    if tflops is None:
        tflops = spec[0] if spec is not None else known_tflops(local[0]) if local is not None else None
    cuda = gpus is not None or memory is not None or name is not None
    return GpuChoice("cuda" if cuda else None, mem, source, label, tflops)


# ------------------------------------------------------------------------------------------- verdict
@dataclass
class Candidate:
    """A change of options (RunConfig fields and the process count) and the plan's peak with it."""

    changes: dict[str, object]
    nproc: int
    peak_bytes: int
    peak_phase: str
    words: str


@dataclass
class Verdict:
    memory_bytes: int
    memory_source: str
    phases: dict[str, bool]
    """Each device phase: fits (True) or not."""
    fits: bool
    host_bytes: int | None
    """Host memory per process while loading (fsdp), not compared with the GPU."""
    suggestion: Candidate | None = None
    searched: int = 0


def device_peak(phases: dict[str, int]) -> tuple[str, int]:
    """The largest phase that lives in device memory."""
    device = {k: v for k, v in phases.items() if k not in HOST_PHASES}
    name = max(device, key=lambda k: device[k])
    return name, device[name]


def _candidates(cfg: RunConfig, nproc: int, sharded_possible: bool):
    """(changes, nproc, words, disruption) for every combination of the options a user may change."""
    # memory for time: 1 gradient checkpointing, 2 also the clone targets recomputed with their layer (lrc)
    ckpt_now = (2 if cfg.compute.recompute_targets else 1) if cfg.compute.grad_checkpointing else 0
    ckpt = range(ckpt_now, 3 if cfg.method == "lrc" else max(ckpt_now + 1, 2))
    batches = [cfg.train.batch_size // 2**k for k in range(0, 12) if cfg.train.batch_size // 2**k >= 1
               and cfg.train.batch_size % 2**k == 0]
    # (processes, parallel): as now, then under fsdp (which divides memory) with as many and more processes
    procs = [(nproc, cfg.compute.parallel)]
    if sharded_possible:
        procs += [(nproc * 2**k, "fsdp") for k in range(0 if cfg.compute.parallel != "fsdp" and nproc > 1 else 1, 11)
                  if nproc * 2**k <= MAX_PROCESSES]
    seqs = [cfg.data.seq_len // 2**k for k in range(0,
                                                    6) if cfg.data.seq_len // 2**k >= MIN_SEQ_LEN] or [cfg.data.seq_len]
    for level, (bi, b), (pi, (p, parallel)), (si, s) in itertools.product(ckpt, enumerate(batches),
                                                                        enumerate(procs), enumerate(seqs)):
        changes: dict[str, object] = {}
        words = []
        c = level - ckpt_now
        if c and not cfg.compute.grad_checkpointing:
            changes["grad_checkpointing"] = True
            words.append("gradient checkpointing")
        if level == 2 and not cfg.compute.recompute_targets:
            changes["recompute_targets"] = True
            words.append("clone targets recomputed with their layer")
        if bi:
            changes["batch_size"] = b
            changes["grad_accum"] = cfg.train.grad_accum * (cfg.train.batch_size // b)
            words.append(f"micro-batch {b} (accumulation {changes['grad_accum']}: same tokens per step)")
        switch = pi > 0
        to_lrc = switch and parallel == "fsdp" and not METHODS[cfg.method].shards_teacher
        if switch:
            if parallel != cfg.compute.parallel:
                changes["parallel"] = parallel
            if to_lrc:  # a free-weight student holds the whole teacher on every process: only LRC shards it
                changes["method"] = "lrc"
            words.append(f"{p} processes" + (" under --parallel fsdp" if parallel != cfg.compute.parallel else "")
                         + (" with --method lrc (the teacher sharded)" if to_lrc else ""))
        if si:
            changes["seq_len"] = s
            words.append(f"sequence length {s}")
        if not (c or bi or switch or si):
            continue
        # checkpointing (time only) < each halving of the micro-batch (smaller products) < each doubling of
        # the processes (hardware) < each halving of the sequence (it changes what is trained: last resort)
        disruption = (c + 2 * bi + 3 * pi + 4 * to_lrc + 8 * si,
                      int(c > 0) + int(bi > 0) + int(switch) + int(to_lrc) + int(si > 0))
        yield changes, p, "; ".join(words), disruption


def judge(plan, teacher_config, cfg: RunConfig, memory_bytes: int, memory_source: str,
          device: str = "cuda") -> Verdict:
    """Does `plan` (of `cfg` with plan.nproc processes) fit devices of `memory_bytes`? If not, the smallest
    change of options that does (None when none within reach does)."""
    phases = {k: v <= memory_bytes for k, v in plan.phases.items() if k not in HOST_PHASES}
    host = plan.phases.get("load")
    v = Verdict(memory_bytes, memory_source, phases, all(phases.values()), host)
    if v.fits:
        return v
    ordered = sorted(_candidates(cfg, plan.nproc, sharded_possible=True), key=lambda c: c[3])
    for changes, nproc, words, _ in ordered:
        v.searched += 1
        try:
            other = plan_from_config(teacher_config, cfg.replace(**changes), nproc=nproc, device=device,
                                     teacher_dtype=plan.teacher_dtype, heap_slack=False if device == "cuda" else None)
        except UserError:
            continue
        phase, peak = device_peak(other.phases)
        if peak <= memory_bytes:
            v.suggestion = Candidate(changes, nproc, peak, phase, words)
            break
    return v


# ------------------------------------------------------------------------------------------- command lines
_FLAG = {"method": "--method", "grad_checkpointing": "--grad-checkpointing", "recompute_targets": "--recompute-targets",
         "batch_size": "--batch-size",
         "grad_accum": "--grad-accum",
         "parallel": "--parallel", "seq_len": "--seq-len"}


def _drop_option(argv: list[str], flags: Sequence[str], takes_value: bool) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in flags:
            skip = takes_value and "=" not in a
            continue
        out.append(a)
    return out


def command_with(argv: Sequence[str], changes: dict[str, object], nproc: int | None = None,
                 nproc_flag: str = "--gpus", prog: str = "lrc") -> str:
    """`prog argv` with the options in `changes` (RunConfig field -> value) and the process count replaced."""
    args = list(argv)
    for field, value in changes.items():
        flag = _FLAG[field]
        if isinstance(value, bool):
            args = _drop_option(args, (flag, "--no-" + flag[2:]), takes_value=False)
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args = _drop_option(args, (flag,), takes_value=True)
            args += [flag, str(value)]
    if nproc is not None:
        args = _drop_option(args, ("--gpus", "--nproc"), takes_value=True)
        args += [nproc_flag, str(nproc)]
    return shlex.join([prog, *args])


# ------------------------------------------------------------------------------------------- budget
@dataclass
class Budget:
    lr: float
    lr_auto: bool
    tokens_per_step: int
    steps: int | None
    seconds: float | None
    tflops: float | None
    gpu: str | None
    measured_start: bool = False
    """The run sets the lr from its start's measured KL (`free_lr_from_start`); `lr` is the rule's estimate."""


def budget(plan, cfg: RunConfig, d_t: int, tflops: float | None, gpu: str | None) -> Budget:
    """The learning rate `--lr auto` picks (or the one given), optimizer steps, and wall time at plan.mfu."""
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * plan.nproc * cfg.data.seq_len
    auto = cfg.optim.lr == AUTO
    lr = (auto_lr(int(cfg.student.hidden_size or 0), d_t, tokens_per_step, **lr_rule_options(cfg)) if auto
          else float(cfg.optim.lr))
    steps = None
    if cfg.train.max_steps is not None or cfg.train.max_tokens is not None:
        steps = total_steps(cfg, plan.nproc)
    seconds = None
    if steps is not None and tflops:
        per_process = tflops * 1e12 * plan.mfu / plan.flops_per_token
        seconds = steps * tokens_per_step / (per_process * plan.nproc)
    measured = auto and lr_rule_options(cfg)["from_lrc_start"] and cfg.student.init == "refit"
    return Budget(lr, auto, tokens_per_step, steps, seconds, tflops, gpu, measured)


def human_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_verdict(plan, v: Verdict, argv: Sequence[str] | None, nproc_flag: str = "--gpus") -> str:
    gib = v.memory_bytes / GiB
    word = "fits" if v.fits else "does NOT fit"
    lines = [f"verdict: {word} {plan.nproc} device(s) of {gib:.4g} GiB ({v.memory_source})"]
    for phase, ok in v.phases.items():
        lines.append(f"  {phase:<10} {plan.phases[phase] / GiB:9.2f} GiB  {'fits' if ok else 'does not fit'}")
    if v.host_bytes is not None:
        lines.append(f"  {'load':<10} {v.host_bytes / GiB:9.2f} GiB  host (CPU) memory per process, not the GPU's")
    if not v.fits:
        if v.suggestion is None:
            lines.append(f"no change of checkpointing, micro-batch, processes (up to {MAX_PROCESSES}) or sequence "
                         f"length (down to {MIN_SEQ_LEN}) fits; see the largest parts above")
        else:
            s = v.suggestion
            lines.append(f"smallest change that fits: {s.words} -> peak {s.peak_bytes / GiB:.2f} GiB "
                         f"({s.peak_phase})")
            if argv is not None:
                lines.append("  " + command_with(argv, s.changes, s.nproc if s.nproc != plan.nproc else None,
                                                 nproc_flag))
    return "\n".join(lines)


def format_budget(plan, b: Budget) -> str:
    lr = (f"--lr auto picks {b.lr:.3g} (lrc.optim.lr_rule, {b.tokens_per_step:,} tokens per step)" if b.lr_auto
          else f"lr {b.lr:.3g} (given)")
    if b.measured_start:
        lr = (f"--lr auto: about {b.lr:.3g} from the student's share of the teacher's width; the run sets it from "
              "its start's measured KL to the teacher (lrc.optim.lr_rule.free_lr_from_start)")
    steps = (f"{b.steps:,} optimizer steps" if b.steps is not None
             else "optimizer steps: give --max-tokens or --max-steps")
    if b.seconds is not None:
        where = f"{plan.nproc} x {b.gpu}" if b.gpu else f"{plan.nproc} device(s) of {b.tflops:g} TFLOP/s"
        time = (f"about {human_duration(b.seconds)} on {where} at {plan.mfu:.0%} of {b.tflops:g} TFLOP/s peak "
                "(assumed utilisation; the FLOP model above)")
    elif b.steps is None:
        time = "wall time: needs the steps"
    else:
        time = "wall time: name the GPU (--gpu H100) or give --device-tflops"
    return f"budget: {lr}; {steps}; {time}"


# ------------------------------------------------------------------------------------------- distill
def host_memory_per_process(local_processes: int) -> int:
    """This machine's physical memory shared by its processes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local_processes)


def device_memory(device_type: str, local_processes: int) -> tuple[int, str]:
    """(bytes one process may use, where the figure comes from) on the device `lrc distill` will use."""
    if device_type == "cuda":
        gpu = local_gpu()
        if gpu is not None:
            return gpu[1], f"{gpu[0]}"
    return host_memory_per_process(local_processes), f"host memory / {local_processes} local process(es)"


def check_before_load(teacher_config, cfg: RunConfig, nproc: int, device_type: str,
                      local_processes: int) -> str | None:
    """The warning `lrc distill` prints before loading any weights when the forecast does not fit the device
    (None when it fits)."""
    try:
        plan = plan_from_config(teacher_config, cfg, nproc=nproc, device=device_type)
        memory, source = device_memory(device_type, local_processes)
        phase, peak = device_peak(plan.phases)
        if peak <= memory:
            return None
        v = judge(plan, teacher_config, cfg, memory, source, device=device_type)
    except Exception:  # noqa: BLE001  a forecast must never stop a run (`plan.startup_summary` alike)
        return None
    fix = ""
    if v.suggestion is not None:
        s = v.suggestion
        fix = f"; the smallest change that fits: {s.words} (peak {s.peak_bytes / GiB:.2f} GiB)"
    return (f"plan: this run does not fit: peak {peak / GiB:.2f} GiB per process at the {phase} > "
            f"{memory / GiB:.2f} GiB ({source}){fix}; `lrc plan` with the same options for details")


def nproc_for(gpus: int | None, nproc: int | None) -> int:
    if gpus is not None and nproc is not None and gpus != nproc:
        raise UserError(f"--gpus {gpus} and --nproc {nproc} disagree; give one of them")
    n = gpus if gpus is not None else nproc if nproc is not None else 1
    if n < 1:
        raise UserError(f"--gpus / --nproc must be a positive integer (got {n})")
    return n
