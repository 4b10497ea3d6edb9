"""`lrc plan`: what an `lrc distill` run will cost, from the teacher's config.json alone.

Nothing is loaded: the teacher and the exported student are built on the meta device (no memory) to count
their parameters, and everything else follows from the shapes and the run's options. `lrc distill` prints
the same forecast in one line at start-up (`startup_summary`).

The parts: `shape` (the teacher and student counted on the meta device), `memory` (what is alive per
process), `flops` (per trained token), `verdict` (whether it fits N GPUs, and the smallest change that does),
`report` (the words and JSON).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from lrc.config import RunConfig, validate
from lrc.distributed.processes import device_kind
from lrc.errors import UserError
from lrc.methods.direct import free_loss_weights
from lrc.methods.registry import METHODS, check_parallel
from lrc.model.families import family_for
from lrc.model.losses import auto_chunk_size
from lrc.model.precision import resolve_precision
from lrc.model.teacher import load_teacher_config
from lrc.plan.flops import DEFAULT_MFU, flops_per_token, free_flops_per_token
from lrc.plan.memory import DTYPE_BYTES, GiB, Part, activation_bytes, memory_phases, total_bytes
from lrc.plan.shape import (
    Shape,
    choose_roles,
    param_counts,
    shape_of,
    teacher_dtype_name,
    trainable_params,
)
from lrc.student.shape import check_shape, describe, kept_layers, resolve_target, student_layers


@dataclass
class Plan:
    teacher: str
    method: str
    family: str
    shape: Shape
    teacher_params: int
    student_params: int
    trainable_params: int
    student_shape: str
    """The student's shape in words (`lrc.student.shape.describe`)."""
    teacher_dtype: str
    precision: str
    device: str
    nproc: int
    parallel: str
    sharded: bool
    batch_size: int
    seq_len: int
    grad_accum: int
    chunk_size: int
    grad_checkpointing: bool
    roles: dict[str, str]
    memory: list[Part]
    """The parts alive at the peak (what `peak_bytes` sums)."""
    peak_bytes: int
    peak_phase: str
    phases: dict[str, int]
    """Modelled total of every phase (see the module docstring)."""
    activations: dict[str, int]
    """Activation bytes (student + teacher) without and with --grad-checkpointing."""
    peak_other_checkpointing: int
    """The peak with --grad-checkpointing toggled (the other setting than this run's)."""
    flops: dict[str, float]
    """FLOPs per trained token, by part (per process; multiply by tokens for a step)."""
    flops_per_token: float
    device_tflops: float | None = None
    mfu: float = DEFAULT_MFU
    tokens_per_s: float | None = None
    """Per process; the whole run processes nproc times as many."""
    notes: list[str] = field(default_factory=list)
    budget_tokens: int | None = None
    """The run's training tokens (--max-tokens, or --max-steps x tokens per step; the smaller), None without
    a budget."""
    hours: float | None = None
    """budget_tokens at tokens_per_s on all processes, in hours (None without both)."""

    @property
    def student_share(self) -> float:
        return self.student_params / self.teacher_params

    def to_dict(self) -> dict:
        d = asdict(self)
        d["student_share"] = self.student_share
        d["tokens_per_s_all_processes"] = None if self.tokens_per_s is None else self.tokens_per_s * self.nproc
        return d


# Options of `lrc distill` that change nothing `lrc plan` models (memory, FLOPs, shape, time): accepted by
# `lrc plan` (a distill command line or run.yaml plans as it is) but not listed in its --help.
NOT_PLANNED = frozenset({
    "data", "text_field", "num_proc", "streaming", "chat_template", "train_on", "out", "init", "calib_batches", "lr",
    "schedule", "warmup_ratio", "min_lr_ratio", "weight_decay", "adam_beta1", "adam_beta2", "grad_clip", "seed",
    "ce_weight", "kl_temperature", "log_every", "eval_every", "eval_batches", "save_every", "keep_checkpoints",
    "wandb", "cache_dir"})


def plan_from_config(teacher_config, cfg: RunConfig, *, nproc: int = 1, device: str | None = None,
                     device_tflops: float | None = None, mfu: float = DEFAULT_MFU,
                     teacher_dtype: str | None = None, heap_slack: bool | None = None) -> Plan:
    """The plan of `lrc distill` with `cfg` for a teacher with this config. device: "cpu" / "cuda" (default:
    resolved from cfg.compute.device as distill does); teacher_dtype: the storage dtype when already known;
    heap_slack: count glibc's heap slack (default: on CPU under glibc unless MALLOC_MMAP_THRESHOLD_ is set)."""
    validate(cfg)
    cfg, _ = resolve_target(cfg, teacher_config)
    if cfg.student.hidden_size is None:
        raise UserError("--hidden-size is required: the student's hidden size, a positive integer at most the "
                        "teacher's (or --target-params N)")
    check_shape(cfg, teacher_config)
    if nproc < 1:
        raise UserError(f"--nproc must be a positive integer (got {nproc})")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1] (got {mfu})")
    if device_tflops is not None and not device_tflops > 0:
        raise UserError(f"--device-tflops must be positive (got {device_tflops})")
    device = "cuda" if (device or device_kind(cfg.compute.device)).startswith("cuda") else "cpu"
    precision = resolve_precision(cfg.compute.precision, torch.device(device))
    dtype = teacher_dtype or teacher_dtype_name(teacher_config, cfg.compute.teacher_dtype)

    n_layers = student_layers(cfg, teacher_config.num_hidden_layers)
    # which layers --layers keeps is measured at run time; any K of them have the same parameters
    kept = kept_layers(cfg, teacher_config.num_hidden_layers) or (
        tuple(range(n_layers)) if n_layers < teacher_config.num_hidden_layers else None)
    teacher_count, student_count, tied = param_counts(teacher_config, cfg.student.hidden_size, cfg.student.rms_norm_eps,
                                                       cfg.student.ffn_size, kept)
    shape = shape_of(teacher_config, cfg.student.hidden_size, tied, cfg.student.ffn_size, n_layers)
    sharded = cfg.compute.parallel == "fsdp" and nproc > 1
    tokens = cfg.train.batch_size * cfg.data.seq_len
    free = METHODS[cfg.method].free_weights
    check_parallel(cfg.method, sharded)
    # under checkpointing, and with the projections sharded per layer, every micro-batch generates again
    reuse = 1 if cfg.compute.grad_checkpointing or sharded else cfg.train.grad_accum
    roles = {r: "generated" for r in shape.role_outs} if free else choose_roles(shape, tokens, reuse, sharded)
    weights = free_loss_weights(cfg) if free else cfg.loss  # the terms the method computes
    terms = set(weights.clone_terms())
    kl = weights.kl != 0.0
    chunk = cfg.compute.chunk_size
    if chunk <= 0:
        chunk = auto_chunk_size(shape.vocab)
    n_train = student_count if free else trainable_params(shape)

    recompute = cfg.compute.recompute_targets and not free

    def phases_with(grad_checkpointing: bool, shard_trainables: bool = True) -> dict[str, list[Part]]:
        return memory_phases(
            shape, teacher_params=teacher_count, teacher_bytes_per_param=DTYPE_BYTES[dtype], trainable=n_train,
            roles=roles, precision=precision, batch=cfg.train.batch_size, seq_len=cfg.data.seq_len,
                             grad_accum=cfg.train.grad_accum,
            chunk=chunk, kl=kl, terms=terms, grad_checkpointing=grad_checkpointing, nproc=nproc, sharded=sharded,
            device=device, evaluates=cfg.data.val_fraction > 0 or bool(cfg.data.val_files), heap_slack=heap_slack,
            shard_trainables=shard_trainables, free=free, recompute_targets=recompute)

    phases = phases_with(cfg.compute.grad_checkpointing)
    totals = {k: total_bytes(v) for k, v in phases.items()}
    peak_phase = max(totals, key=lambda k: totals[k])
    other = phases_with(not cfg.compute.grad_checkpointing)
    acts = {
        "without_checkpointing": sum(activation_bytes(shape, cfg.train.batch_size, cfg.data.seq_len, precision,
                                                      roles, terms,
                                                      False).values()),
        "with_checkpointing": sum(activation_bytes(shape, cfg.train.batch_size, cfg.data.seq_len, precision, roles,
                                                   terms,
                                                   True, recompute_targets=recompute).values()),
    }
    projected = len(terms & {"attn_out", "ffn_out"})
    if free:
        flops = free_flops_per_token(shape, cfg.data.seq_len, teacher_runs=kl or bool(terms), kl=kl,
                                     projected_terms=projected)
    else:
        flops = flops_per_token(shape, roles, tokens, reuse, cfg.data.seq_len, kl=kl, projected_terms=projected,
                                gate_up_terms=tuple(sorted(terms & {"gate", "up"})),
                                recompute_teacher=cfg.compute.grad_checkpointing and recompute and bool(terms))
    per_token = sum(flops.values())
    tps = device_tflops * 1e12 * mfu / per_token if device_tflops else None
    per_step = tokens * cfg.train.grad_accum * nproc
    budgets = [b for b in (cfg.train.max_tokens,
                           None if cfg.train.max_steps is None else cfg.train.max_steps * per_step)
               if b is not None]
    budget = min(budgets) if budgets else None
    notes = []
    if sharded:
        whole = max(total_bytes(v) for v in phases_with(cfg.compute.grad_checkpointing,
                                                        shard_trainables=False).values())
        notes.append(f"fsdp: the layer projections, their gradients and AdamW state are sharded too (peak "
                     f"{whole / GiB:.2f} GiB per process if they were not); each process reads only its own "
                     "shards of the teacher from its safetensors files (host memory: about one teacher per node)")
    if free:
        notes.append(f"--method {cfg.method} trains an ordinary student: its memory follows the same model as lrc's, "
                     "calibrated on lrc runs only")
    if precision == "fp32" and DTYPE_BYTES[dtype] < 4:
        notes.append(f"{dtype} teacher under fp32: each teacher matrix is cast to fp32 only while it is used")
    return Plan(
        teacher=str(cfg.teacher), method=cfg.method, family=family_for(teacher_config).model_type, shape=shape,
        teacher_params=teacher_count, student_params=student_count, trainable_params=n_train,
        student_shape=describe(cfg, teacher_config),
        teacher_dtype=dtype, precision=precision, device=device, nproc=nproc, parallel=cfg.compute.parallel,
        sharded=sharded, batch_size=cfg.train.batch_size, seq_len=cfg.data.seq_len, grad_accum=cfg.train.grad_accum,
        chunk_size=chunk, grad_checkpointing=cfg.compute.grad_checkpointing, roles=roles, memory=phases[peak_phase],
        peak_bytes=totals[peak_phase], peak_phase=peak_phase, phases=totals, activations=acts,
        peak_other_checkpointing=max(total_bytes(v) for v in other.values()), flops=flops, flops_per_token=per_token,
        device_tflops=device_tflops, mfu=mfu, tokens_per_s=tps, notes=notes, budget_tokens=budget,
        hours=budget / (tps * nproc) / 3600 if budget is not None and tps else None,
    )


def require_teacher(cfg: RunConfig) -> str:
    if not cfg.teacher:
        raise UserError("--teacher is required: a Hugging Face model directory or hub id")
    return cfg.teacher


def plan_run(cfg: RunConfig, **kw) -> Plan:
    """`plan_from_config` for cfg.teacher, reading its config.json only."""
    return plan_from_config(load_teacher_config(require_teacher(cfg), cfg.trust_remote_code), cfg, **kw)
