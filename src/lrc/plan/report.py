"""`lrc plan`'s words: the plan as text and JSON, and the one line `lrc distill` prints at start-up."""

from __future__ import annotations

import json

from lrc.config import RunConfig
from lrc.log import human_count, human_duration
from lrc.plan.estimate import Plan, plan_from_config
from lrc.plan.memory import GiB, MiB


def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def format_plan(plan: Plan) -> str:
    s = plan.shape
    factored = [r for r, m in plan.roles.items() if m == "factored"]
    lines = [
        f"teacher {plan.teacher} ({plan.family}, hidden {s.d_t}, FFN {s.ffn}, {s.teacher_layers} layers, "
        f"vocab {s.vocab:,}"
        f"{', tied' if s.tied else ''}): {human_count(plan.teacher_params)} parameters in {plan.teacher_dtype}",
        f"student: {plan.student_shape}; {plan.student_params:,} parameters exported "
        f"({plan.student_share:.1%} of the teacher); {plan.trainable_params:,} trainable while distilling",
        f"run: {plan.nproc} process(es) x {plan.device}, {plan.parallel}"
        f"{' (teacher sharded)' if plan.sharded else ''}, precision {plan.precision}, micro-batch "
        f"{plan.batch_size} x {plan.seq_len} tokens, grad accumulation {plan.grad_accum}; "
        + (f"factored: {', '.join(factored) if factored else 'none'}" if plan.method == "lrc" else
           f"--method {plan.method}: free weights"),
        "",
        f"memory per process, at its peak ({plan.peak_phase}):",
    ]
    width = max(len(p.name) for p in plan.memory)
    for p in plan.memory:
        lines.append(f"  {p.name:<{width}}  {_gib(p.bytes):>11}   {p.note}")
    lines.append(f"  {'total':<{width}}  {_gib(plan.peak_bytes):>11}")
    other = "with" if not plan.grad_checkpointing else "without"
    lines.append(f"  activations {_gib(plan.activations['without_checkpointing'])} without gradient checkpointing, "
                 f"{_gib(plan.activations['with_checkpointing'])} with; peak {other} --grad-checkpointing: "
                 f"{_gib(plan.peak_other_checkpointing)}")
    lines.append("  phases: " + ", ".join(f"{k} {_gib(v)}" for k, v in plan.phases.items()))
    lines += ["", f"FLOPs per trained token: {plan.flops_per_token / 1e9:.3g} GFLOP"]
    for k, v in plan.flops.items():
        lines.append(f"  {k:<48} {v / 1e9:10.3g} GFLOP")
    if plan.tokens_per_s is not None:
        lines.append(f"throughput at {plan.device_tflops:g} TFLOP/s peak and {plan.mfu:.0%} utilisation (assumed): "
                     f"{plan.tokens_per_s:,.0f} tokens/s per process"
                     + (f", {plan.tokens_per_s * plan.nproc:,.0f} in all" if plan.nproc > 1 else ""))
        if plan.hours is not None:
            lines.append(f"time for {human_count(plan.budget_tokens or 0)} tokens (the budget): "
                         f"{human_duration(plan.hours)}")
    else:
        lines.append("tokens/s: pass --device-tflops (the device's peak dense TFLOP/s) for an estimate")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict())


def startup_summary(teacher_config, cfg: RunConfig, nproc: int, device: str, teacher_dtype: str) -> str:
    """The plan line `lrc distill` prints at start-up (never raises: a forecast must not stop a run)."""
    try:
        p = plan_from_config(teacher_config, cfg, nproc=nproc, device=device, teacher_dtype=teacher_dtype)
    except Exception as e:  # noqa: BLE001
        return f"plan: unavailable ({type(e).__name__}: {e})"
    unit, div = ("GiB", GiB) if p.peak_bytes >= GiB else ("MiB", MiB)
    parts = ", ".join(f"{q.name} {q.bytes / div:.{2 if unit == 'GiB' else 0}f}" for q in p.memory
                      if q.bytes >= 0.01 * p.peak_bytes)
    return (f"plan: peak about {p.peak_bytes / div:.{2 if unit == 'GiB' else 0}f} {unit} per process at the "
            f"{p.peak_phase} ({parts} {unit}); {p.flops_per_token / 1e9:.3g} GFLOP per token; student "
            f"{p.student_shape}, {p.student_params:,} parameters ({p.student_share:.1%} of the teacher); "
            "`lrc plan` for details")
