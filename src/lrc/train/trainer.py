"""The training loop behind `lrc distill`: one process or many under torchrun, with exact resume.

`distill` = `setup` (inputs checked and loaded by `lrc.train.run.prepare`, the teacher placed or sharded, the method
built or restored, the run directory written) then `fit` (the loop). `train_step` is one optimizer step of
any method; `lrc bench` times the same function.

Each optimizer step draws its micro-batches from a `SequenceSampler` whose position is part of every
checkpoint, so an interrupted run resumed from its last checkpoint sees the same batches, the same optimizer
state and therefore produces the same losses and weights as a run that never stopped.

Loss normalisation across micro-batches and ranks is exact and owned here: every term is a mean over the
tokens of the whole optimizer step, all micro-batches and ranks (`lrc.model.losses.TokenCounts`: labelled tokens
for CE, KL positions for KL, valid tokens for the clone terms, passed to the method as `step_tokens`), and
averaging the gradients over ranks (`average_gradients`, once per step, for every method) completes the
mean. So `--grad-accum 4 --batch-size 2` and `--batch-size 8` give the same step, however unevenly the
micro-batches' masks fill them.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from lrc import log
from lrc.config import RunConfig, save_config
from lrc.data import calibration_order, collate, make_batches
from lrc.data.batch import Batch, to_device
from lrc.distributed.fsdp import held_bytes, is_sharded
from lrc.distributed.processes import (
    DistInfo,
    all_reduce_sum,
    average_gradients,
    broadcast_from_rank0,
    cleanup,
    clip_gradients,
    init_distributed,
)
from lrc.errors import UserError
from lrc.methods.base import Calibration, Method
from lrc.methods.registry import METHODS, build_method, lr_rule_options
from lrc.methods.switch import FREE, free_method, switch_step, to_free_weights
from lrc.model.losses import TokenCounts, total_loss
from lrc.model.precision import autocast, compute_dtype, dtype_name, resolve_precision
from lrc.model.teacher import is_empty, load_teacher_config, shard_teacher
from lrc.optim.lr_rule import AUTO, auto_lr, free_lr_from_start
from lrc.optim.schedule import lr_factor, total_steps
from lrc.plan.report import startup_summary
from lrc.plan.verdict import check_before_load
from lrc.student.refit import calibration_sequences
from lrc.student.shape import describe
from lrc.train import checkpoint as ckpt
from lrc.train.heldout import heldout_loss, model_loss
from lrc.train.run import MetricsLog, Prepared, hold_run_dir, prepare, release_run_dirs, store_run_inputs
from lrc.train.summary import Startup, describe_data, describe_init, format_startup, plural


class RunInterrupted(Exception):
    """SIGINT/SIGTERM: the step was finished and a checkpoint saved; the CLI exits with 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient, or a loss climbing far above its start: the run stops and its last good
    checkpoint is kept."""


RISE_WINDOW = 5  # steps whose mean loss is compared with the first step's


class RiseWatch:
    """Stops a run whose loss climbs well above where it started, which a learning rate far too high for the
    student does within a few steps (a run from a teacher-aware start begins near its teacher, and one Adam
    step of the wrong size undoes that); without it the only stop is a non-finite loss, days later or never.
    The first step's loss is part of the checkpoint, so a resumed run keeps comparing with it."""

    def __init__(self, rise: float, first: float | None = None):
        self.rise, self.first = rise, first
        self.recent: list[float] = []

    def check(self, loss: float, step: int, lr: float, how: str) -> None:
        if self.first is None:
            self.first = loss
        self.recent = (self.recent + [loss])[-RISE_WINDOW:]
        mean = sum(self.recent) / len(self.recent)
        if self.rise > 0 and len(self.recent) == RISE_WINDOW and mean > (1 + self.rise) * self.first:
            raise TrainingDiverged(
                f"the loss rose from {self.first:.4f} at the first step to {mean:.4f} (mean of steps "
                f"{step - RISE_WINDOW + 1}-{step}), more than {self.rise:.0%} above it: the peak learning rate "
                f"{lr:.3g} ({how}) is too high for this student; rerun with a lower --lr (e.g. {lr / 4:.2g}), or "
                "--stop-on-rise 0 to train on")


# ------------------------------------------------------------------------------------------- one step


@dataclass
class StepResult:
    loss: float
    """The weighted total of the step's terms (global means)."""
    terms: dict[str, float]
    """ce, kl, clone and clone/<term>: means over the step's tokens (all micro-batches and ranks)."""
    grad_norm: float
    tokens: int
    """Input tokens of the step, all ranks."""


def _count_of(term: str, counts: TokenCounts) -> float:
    """The tokens a logged term (ce, kl, clone, clone/<name>) is a mean over."""
    return counts.ce if term == "ce" else counts.kl if term == "kl" else counts.clone


def train_step(method: Method, micro: list[Batch], optimizer: torch.optim.Optimizer, *, device, precision: str,
               info: DistInfo, grad_clip: float = 0.0) -> StepResult:
    """One optimizer step over `micro` (the step's micro-batches on this rank): forward and backward of each,
    gradients averaged over ranks, clipped, and `optimizer.step()`. Raises TrainingDiverged (before the update)
    when the loss or the gradient norm is not finite."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    counts = [TokenCounts.of_batch(b["labels"], b.get("attention_mask"), b.get("loss_mask")) for b in micro]
    local = [sum(c.ce for c in counts), sum(c.kl for c in counts), sum(c.clone for c in counts)]
    total = TokenCounts(*all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=device), info).tolist())
    per_rank = TokenCounts(total.ce / info.world_size, total.kl / info.world_size, total.clone / info.world_size)
    sums: dict[str, float] = {}
    with autocast(precision, device):
        step = method.begin_step(len(micro))
    for b, n_b in zip(micro, counts):
        b = to_device(b, device, non_blocking=True)
        with autocast(precision, device):
            out = method(**b, step_tokens=per_rank, step=step)
        out.loss.backward()
        for k, v in out.terms.items():  # local means -> token-weighted sums
            sums[k] = sums.get(k, 0.0) + float(v) * _count_of(k, n_b)
    method.finish_step(step)
    average_gradients(params, info)
    keys = sorted(sums)
    vec = all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device), info)
    terms = {k: float(vec[i]) / max(1.0, _count_of(k, total)) for i, k in enumerate(keys)}
    loss = total_loss(terms, method.loss_weights)
    gnorm = clip_gradients(params, grad_clip, info)
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        raise TrainingDiverged(f"non-finite loss ({loss}) or gradient norm ({gnorm}); lower --lr or check the data")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(b["input_ids"].numel() for b in micro) * info.world_size
    return StepResult(loss=loss, terms=terms, grad_norm=gnorm, tokens=tokens)


# ------------------------------------------------------------------------------------------- set-up


@dataclass
class Session:
    """Everything the loop works with; `state` is what a checkpoint restores besides weights."""

    cfg: RunConfig
    run_dir: Path
    info: DistInfo
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: Any  # data.Batches or data.stream.TokenStream: next(batch_size), state_dict, load_state_dict
    train: Any
    val: Any
    teacher: torch.nn.Module
    sharded: bool
    steps: int
    log: MetricsLog
    step: int = 0
    tokens: int = 0
    first_loss: float | None = None  # the first step's loss (`RiseWatch`)
    lr_how: str = "--lr"  # where the peak learning rate came from, for messages
    elapsed_before: float = 0.0
    started: float = field(default_factory=time.time)
    fresh: bool = True  # not resumed from a checkpoint
    switch_at: int | None = None  # --free-after: the step after which free weights train (`methods.switch`)
    free: bool = False  # the method trains free weights since the switch

    @property
    def device(self) -> torch.device:
        return self.info.device


def _place_teacher(prep: Prepared, info: DistInfo, sharded: bool) -> None:
    """fsdp: the teacher (loaded on the CPU) is sharded and only each rank's shard moves to the device."""
    cfg, device = prep.cfg, info.device
    if not sharded:
        # transformers' @wraps-decorated PreTrainedModel.to is typed as if unbound (self expected first)
        prep.teacher.to(device)  # type: ignore[arg-type]
        return
    own_shards = is_empty(prep.teacher)
    held, whole = shard_teacher(prep.teacher, device, compute_dtype(cfg.compute.precision, device))
    log.info(f"teacher sharded over {info.world_size} processes (FSDP2): {held / 2**20:.4g} MiB of "
             f"{whole / 2**20:.4g} MiB of its weights on each"
             + (", each read from the files by its own process" if own_shards else ""))


def _calibration(prep: Prepared, info: DistInfo) -> Calibration | None:
    """Fit and check batches (`lrc.methods.base.Calibration`), sized by
    `lrc.student.refit.calibration_sequences`: drawn with the run's seed from across the training data (a
    mixture's sources in their shares), never from the held-out split; a stream calibrates on its next
    sequences."""
    cfg = prep.cfg
    if prep.resume_from is not None or not METHODS[cfg.method].needs_calibration(cfg):
        return None
    # Global batches, as in training: W ranks with --batch-size b calibrate (each, identically) on the same
    # sequences as one process with --batch-size W*b.
    fit, check = calibration_sequences(prep.teacher.config.hidden_size, cfg.data.seq_len,
                                       cfg.train.batch_size * info.world_size, cfg.student.calib_batches)
    if hasattr(prep.train, "head"):
        data = prep.train.head(fit + check, advance=False)
        order = list(range(len(data)))
    else:
        data, order = prep.train, calibration_order(cast(Any, prep.train), fit + check, cfg.seed)
    cut = min(fit, max(1, len(order) - check)) if len(order) > 1 else len(order)

    def batches(indices: list[int]):
        def draw():
            for s in range(0, len(indices), cfg.train.batch_size):
                chosen = indices[s:s + cfg.train.batch_size]
                yield to_device(collate([data.get(i) for i in chosen]), info.device, non_blocking=True)
        return draw

    return Calibration(fit=batches(order[:cut]), check=batches(order[cut:]) if order[cut:] else None)


def _optimizer(cfg: RunConfig, params: list, steps: int, device: torch.device
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `params` and the run's learning-rate schedule (a factor of the peak per optimizer step)."""
    optimizer = torch.optim.AdamW(params, lr=float(cfg.optim.lr), betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
                                  weight_decay=cfg.optim.weight_decay, eps=1e-8, fused=device.type == "cuda" or None)
    warmup = int(round(cfg.optim.warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, warmup, cfg.optim.schedule, cfg.optim.min_lr_ratio))
    return optimizer, sched


def _switch_to_free_weights(s: Session) -> None:
    """--free-after: from this step on, LRC's student multiplied out trains as kd, with a fresh AdamW at the free
    weights' own peak (--free-lr) and the schedule's shape carried on where it is (every rank converts the same
    weights: nothing to broadcast)."""
    s.method = to_free_weights(s.method, s.cfg, s.teacher).to(s.device)
    factor = s.optimizer.param_groups[0]["lr"] / float(s.cfg.optim.lr)
    state = s.scheduler.state_dict()
    free_cfg = s.cfg.replace(lr=s.cfg.optim.free_lr)
    s.optimizer, s.scheduler = _optimizer(free_cfg, s.method.trainable_parameters(), s.steps, s.device)
    s.scheduler.load_state_dict(state)  # the step count, so the schedule goes on from this step
    s.scheduler.base_lrs = [float(s.cfg.optim.free_lr)] * len(s.optimizer.param_groups)  # from the free peak
    for group in s.optimizer.param_groups:
        group["lr"] = factor * float(s.cfg.optim.free_lr)
    s.free = True
    s.log.write({"split": "switch", "step": s.step, "to": "free weights (kd)"})
    log.info(f"step {s.step}: --free-after {s.cfg.free_after}: LRC's student multiplied out; every weight trains "
             f"freely (kd) from here, at peak {float(s.cfg.optim.free_lr):.3g} on the same schedule")


def _warn_if_it_does_not_fit(cfg: RunConfig, info: DistInfo) -> None:
    """Rank 0, before any weights load: the plan's peak against this device's memory (`lrc.plan.verdict`)."""
    if not info.is_main:
        return

    local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    warning = check_before_load(load_teacher_config(cast(str, cfg.teacher), cfg.trust_remote_code), cfg,
                                info.world_size, info.device.type, local)
    if warning:
        log.logger.warning(warning)


def setup(cfg: RunConfig, explicit: set[str], resume: bool, info: DistInfo, command: str | None = None) -> Session:
    """Check and load every input, build (or restore) the method and optimizer, then write the run directory."""
    prep = prepare(cfg, explicit, resume, before_load=lambda c: _warn_if_it_does_not_fit(c, info))
    _hold(prep.run_dir, info)  # before its checkpoint is read
    cfg, device = prep.cfg, info.device
    sharded = cfg.compute.parallel == "fsdp" and info.enabled
    _place_teacher(prep, info, sharded)
    steps = total_steps(cfg, info.world_size)
    lr_how = "--lr auto" if cfg.optim.lr == AUTO else "--lr"
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * info.world_size * cfg.data.seq_len
    _warn_long_sequences(cfg, prep.teacher.config)
    torch.manual_seed(cfg.seed)
    free = prep.resume_from is not None and bool(ckpt.read_state(prep.resume_from).get(FREE))
    method: Method
    init_info: dict
    if free:  # a checkpoint written after --free-after's switch holds the free student
        method, init_info = free_method(cfg, prep.teacher), {}
    else:
        method, init_info = build_method(cfg, prep.teacher, calibration=_calibration(prep, info))
    cfg, chosen = _choose_lrs(cfg, prep.teacher.config.hidden_size, tokens_per_step, init_info, info)
    prep.cfg = cfg
    lr_note = chosen or ("as given" if prep.resume_from is None else "the run's")
    method.to(device)
    if sharded:  # every rank cuts its shards from rank 0's tensors
        broadcast_from_rank0(method.trainable_parameters(), info)
        note = method.shard_trainables(device)
        if note:
            log.info(note)
    params = method.trainable_parameters()
    # after the switch the peak is the free weights' (the checkpoint's optimizer and schedule state say so too)
    optimizer, sched = _optimizer(cfg.replace(lr=cfg.optim.free_lr) if free else cfg, params, steps, device)
    batches = make_batches(prep.train, cfg.seed, info.rank, info.world_size)
    step, tokens, elapsed, first_loss = _restore(prep, resume, info, method, optimizer, sched, batches)
    # Write into RUN_DIR only now: every input, the checkpoint included, has been read and checked (a bad
    # one leaves the directory as it was), and every rank has passed `resolve_config`'s check of RUN_DIR.
    all_reduce_sum(torch.zeros((), device=device), info)
    if info.is_main:
        prep.run_dir.mkdir(parents=True, exist_ok=True)
    _hold(prep.run_dir, info)  # a new run: now that its folder exists
    if info.is_main:
        save_config(cfg, prep.run_dir / "config.yaml")
        store_run_inputs(prep.run_dir, cfg, command)
    # A resumed run drops the records past its checkpoint; one with no checkpoint yet (killed before its
    # first) starts afresh, so it drops them all
    truncate = (step if prep.resume_from is not None else -1) if resume else None
    metrics = MetricsLog(prep.run_dir, info.is_main, truncate_after=truncate,
                         wandb_project=cfg.train.wandb, config=cfg.to_dict())
    s = Session(cfg, prep.run_dir, info, method, optimizer, sched, batches, prep.train, prep.val, prep.teacher,
                sharded, steps, metrics, step=step, tokens=tokens, first_loss=first_loss, lr_how=lr_how,
                elapsed_before=elapsed,
                fresh=prep.resume_from is None, switch_at=switch_step(cfg, steps), free=free)
    if init_info and s.fresh:  # how the run started (e.g. whether the refit was kept, by how much): kept on disk
        metrics.write({"split": "init", "step": 0, **init_info})
    broadcast_from_rank0(params, info)  # every rank starts from rank 0's weights, for every method
    note = method.prepare(cfg.train.batch_size * cfg.data.seq_len, reuse=cfg.train.grad_accum, sharded=sharded)
    if info.is_main:
        log.info(_startup_text(prep, s, init_info, note, tokens_per_step, lr_note))
    return s


def _choose_lrs(cfg: RunConfig, d_t: int, tokens_per_step: int, init_info: dict,
                info: DistInfo) -> tuple[RunConfig, str | None]:
    """`--lr auto` and `--free-lr auto` resolved once the start is built (a resumed run reads the numbers its
    config.yaml stored), with the start-up note on how --lr was chosen (None: it was given). A free student from
    LRC's start (kd, or LRC's after --free-after) steps by how close its measured start is to the teacher."""
    d_s = cast(int, cfg.student.hidden_size)
    rule = lr_rule_options(cfg)
    lr_auto = cfg.optim.lr == AUTO
    free_lr_auto = cfg.free_after is not None and cfg.optim.free_lr == AUTO
    start_kl = _start_kl(init_info, info) if (lr_auto and rule["from_lrc_start"]) or free_lr_auto else None
    note = None
    if lr_auto and rule["from_lrc_start"] and start_kl is not None:
        cfg = cfg.replace(lr=free_lr_from_start(d_s, start_kl, tokens_per_step))
        note = (f"chosen by --lr auto from hidden size {d_s} and the start's KL to the teacher {start_kl:.3g} "
                "(lrc.optim.lr_rule.free_lr_from_start), stored in config.yaml")
    elif lr_auto:
        cfg = cfg.replace(lr=auto_lr(d_s, d_t, tokens_per_step, **rule))
        kind = ", free weights from LRC's start" if rule["from_lrc_start"] else ", free weights" if rule["free"] else ""
        note = (f"chosen by --lr auto from hidden size {d_s} of the teacher's {d_t} and {tokens_per_step:,} "
                f"tokens per step (lrc.optim.lr_rule{kind}), stored in config.yaml")
    if free_lr_auto:
        cfg = cfg.replace(free_lr=free_lr_from_start(d_s, start_kl, tokens_per_step) if start_kl is not None
                          else auto_lr(d_s, d_t, tokens_per_step, free=True, from_lrc_start=True))
    return cfg, note


def _start_kl(init_info: dict, info: DistInfo) -> float | None:
    """The KL to the teacher of the start the run keeps (refit's or pca's, `lrc.student.refit`), rank 0's value
    on every rank (one learning rate for all); None where the start was not measured."""
    if "heldout_kl_refit" not in init_info:
        return None
    kl = init_info["heldout_kl_refit" if init_info.get("refit_kept", True) else "heldout_kl_pca"]
    value = torch.tensor([float(kl)], dtype=torch.float64, device=info.device)
    broadcast_from_rank0([value], info)
    return float(value)


def _hold(run_dir: Path, info: DistInfo) -> None:
    """Rank 0 holds RUN_DIR (`lrc.train.run.hold_run_dir`); if another process does, every rank stops with one line."""
    held = hold_run_dir(run_dir, info.is_main)
    if info.enabled:
        held = not bool(all_reduce_sum(torch.tensor(float(not held), device=info.device), info) > 0)
    if not held:
        raise UserError(f"{run_dir} is in use by another lrc process (a run still writing there, e.g. the workers of "
                        "a torchrun that was killed alone); stop it, then run the command again")


def _warn_long_sequences(cfg: RunConfig, teacher_config) -> None:
    """A warning when --seq-len is longer than the teacher was trained for (its positions past that are
    extrapolated: the teacher's targets there are worse, and so is what the student learns from them)."""
    limit = getattr(teacher_config, "max_position_embeddings", None)
    if limit and cfg.data.seq_len > limit:
        log.warning(f"--seq-len {cfg.data.seq_len} is longer than the teacher's max_position_embeddings ({limit}); "
                    f"positions past {limit} are outside what it was trained on: choose --seq-len {limit} or less")


def _startup_text(prep: Prepared, s: Session, init_info: dict, note: str, tokens_per_step: int,
                  lr_note: str) -> str:
    """`lrc.train.summary.format_startup` of this run, with the forecast of `lrc plan` from the loaded teacher."""

    cfg, teacher, device = s.cfg, prep.teacher, s.device
    dtype = dtype_name(next(teacher.parameters()).dtype)
    lr = (f"{float(cfg.optim.lr):.3g} peak, {lr_note}; {cfg.optim.schedule} schedule, "
          f"{plural(round(cfg.optim.warmup_ratio * s.steps), 'warm-up step')}")
    return format_startup(Startup(
        method=cfg.method, teacher=str(cfg.teacher), teacher_config=teacher.config,
        teacher_params=sum(p.numel() for p in teacher.parameters()), teacher_dtype=dtype,
        student=describe(cfg, teacher.config), trainable=sum(p.numel() for p in s.method.trainable_parameters()),
        init=describe_init(cfg.method, cfg.student.init, init_info), data=describe_data(prep.train, prep.val,
                                                                                        cfg.data.seq_len),
        steps=s.steps, tokens_per_step=tokens_per_step, processes=s.info.world_size, device=str(device),
        precision=resolve_precision(cfg.compute.precision, device), lr=lr, extra=note,
        forecast=startup_summary(teacher.config, cfg, s.info.world_size, device.type, dtype)))


def _restore(prep: Prepared, resume: bool, info: DistInfo, method: Method, optimizer, scheduler,
             batches) -> tuple[int, int, float, float | None]:
    """Load the checkpoint to resume from into the method, optimizer, schedule and sampler; returns (step,
    tokens, elapsed seconds, first step's loss) of the run so far ((0, 0, 0.0, None) for a new run)."""
    if prep.resume_from is None:
        if resume:
            log.info(f"resuming {prep.run_dir}: no checkpoint yet, starting from step 0")
        return 0, 0, 0.0, None
    sharded = _has_sharded_trainables(method)
    ckpt.check_resumable(prep.resume_from, info.world_size, sharded)
    if sharded:
        sched_state, state = ckpt.restore_sharded(prep.resume_from, method, optimizer, info.device)
        scheduler.load_state_dict(sched_state)
    else:
        trainable, opt_state, state = ckpt.load_checkpoint(prep.resume_from, info.device)
        method.load_trainable_state_dict(trainable)
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
    batches.load_state_dict(state["sampler"])
    log.info(f"resuming {prep.run_dir} from step {state['step']} ({state['tokens']:,} tokens)")
    return state["step"], state["tokens"], state.get("elapsed", 0.0), state.get("first_loss")


# ------------------------------------------------------------------------------------------- the loop


def _has_sharded_trainables(method: Method) -> bool:
    return any(is_sharded(p) for p in method.trainable_parameters())


def _save(s: Session) -> None:
    state = {"step": s.step, "tokens": s.tokens, "sampler": s.batches.state_dict(),
             "elapsed": s.elapsed_before + time.time() - s.started, "first_loss": s.first_loss, FREE: s.free}
    if _has_sharded_trainables(s.method):  # every process writes its own shards
        ckpt.save_sharded_checkpoint(s.run_dir, s.step, s.method, s.optimizer, s.scheduler.state_dict(), state,
                                     s.cfg.train.keep_checkpoints, s.info.rank, s.info.world_size)
        return
    error = None
    if s.info.is_main:
        try:
            ckpt.save_checkpoint(s.run_dir, s.step, s.method.trainable_state_dict(),
                                 {"optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict()},
                                 state, keep=s.cfg.train.keep_checkpoints)
        except UserError as e:  # disk full: raised below, after telling the other processes
            error = e
    failed = error is not None
    if s.info.enabled:  # every process stops at the same step, instead of waiting for rank 0 in the next one
        failed = bool(all_reduce_sum(torch.tensor(float(failed), device=s.device), s.info) > 0)
    if error is not None:
        raise error
    if failed:
        raise UserError(f"saving checkpoint step {s.step} failed in process 0 (its error is printed there); the "
                        "previous checkpoint is intact; free space and continue with --resume")


def _evaluate(s: Session, split: str = "val") -> None:
    """Held-out loss of the student ("val") or, at the start of a run, of the teacher ("val_teacher")."""
    if s.val is None:
        return
    cfg = s.cfg
    if split == "val_teacher":
        r = model_loss(s.teacher, s.val, batch_size=cfg.train.batch_size, device=s.device,
                       precision=cfg.compute.precision,
                       max_batches=cfg.train.eval_batches, info=s.info, lockstep=s.sharded)
        log.info(f"teacher held-out loss {r['loss']:.4f} (ppl {r['perplexity']:.2f})")
    else:
        r = heldout_loss(s.method, s.val, batch_size=cfg.train.batch_size, device=s.device,
                         precision=cfg.compute.precision,
                         info=s.info, max_batches=cfg.train.eval_batches, lockstep=s.sharded)
        r.pop("labels")
        log.info(f"step {s.step} held-out loss {r['loss']:.4f} (ppl {r['perplexity']:.2f})")
    s.log.write({"split": split, "step": s.step, **r, "eval_tokens": r["tokens"], "tokens": s.tokens})


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class _Progress:
    """tokens/s over the window since the last line (training time only) and the ETA of the run."""

    def __init__(self, s: Session):
        self.start_step, self.window_t, self.window_tok = s.step, time.time(), 0

    def report(self, s: Session, r: StepResult, lr: float) -> None:
        self.window_tok += r.tokens
        if s.step % s.cfg.train.log_every and s.step != s.steps:
            return
        now = time.time()
        tps = self.window_tok / max(1e-9, now - self.window_t)
        rate = (now - s.started) / max(1, s.step - self.start_step)
        s.log.write({"split": "train", "step": s.step, "tokens": s.tokens, "loss": r.loss, **r.terms, "lr": lr,
                     "grad_norm": r.grad_norm, "tokens_per_s": tps, "elapsed": s.elapsed_before + now - s.started})
        shown = " ".join(f"{k} {v:.4f}" for k, v in r.terms.items() if "/" not in k)
        log.info(f"step {s.step}/{s.steps} | tok {s.tokens:,} | loss {r.loss:.4f} ({shown}) | lr {lr:.2e} "
                 f"| gnorm {r.grad_norm:.3f} | {tps:,.0f} tok/s | ETA {_fmt_time(rate * (s.steps - s.step))}")
        self.window_t, self.window_tok = now, 0

    def pause(self, seconds: float) -> None:
        self.window_t += seconds  # held-out evaluation does not count as training time


class _StopFlag:
    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _stop_requested(s: Session, stop: _StopFlag) -> bool:
    stopping = stop.signal is not None
    if s.info.enabled:  # any rank's signal stops all of them at the same step
        stopping = bool(all_reduce_sum(torch.tensor(float(stopping), device=s.device), s.info) > 0)
    return stopping


def fit(s: Session) -> Path:
    """Train from `s.step` to `s.steps`, evaluating, logging and saving on the way; returns the run directory."""
    cfg = s.cfg
    s.started = time.time()
    if s.fresh and s.step == 0:
        _evaluate(s, "val_teacher")
        _evaluate(s)
        if s.steps == 0:
            _save(s)  # --max-steps 0: initialise and save
    progress = _Progress(s)
    rise = RiseWatch(cfg.train.stop_on_rise, s.first_loss)
    with _StopFlag() as stop:
        while s.step < s.steps:
            if s.switch_at is not None and s.step >= s.switch_at and not s.free:
                _switch_to_free_weights(s)
            micro = [s.batches.next(cfg.train.batch_size) for _ in range(cfg.train.grad_accum)]
            lr = s.optimizer.param_groups[0]["lr"]
            try:
                r = train_step(s.method, micro, s.optimizer, device=s.device, precision=cfg.compute.precision,
                               info=s.info,
                               grad_clip=cfg.optim.grad_clip)
                rise.check(r.loss, s.step + 1, float(cfg.optim.lr), s.lr_how)
            except TrainingDiverged as e:
                raise TrainingDiverged(f"step {s.step + 1}: {e}. Stopped without saving; last good checkpoint: "
                                       f"{ckpt.latest_checkpoint(s.run_dir) or 'none'}") from None
            s.first_loss = rise.first
            s.scheduler.step()
            s.step += 1
            s.tokens += r.tokens
            progress.report(s, r, lr)
            if (cfg.train.eval_every and s.step % cfg.train.eval_every == 0) or s.step == s.steps:
                t0 = time.time()
                _evaluate(s)
                progress.pause(time.time() - t0)
            stopping = _stop_requested(s, stop)
            if s.step == s.steps or s.step % cfg.train.save_every == 0 or stopping:
                _save(s)
            if stopping:
                s.log.close()
                log.info(f"interrupted at step {s.step}: checkpoint saved; continue with "
                         f"`lrc distill --out {s.run_dir} --resume`")
                raise RunInterrupted(int(stop.signal or signal.SIGTERM))  # or another rank's signal
    if _has_sharded_trainables(s.method):
        _log_held(s)
    s.log.close()
    log.info(f"done: {plural(s.step, 'step')}, {s.tokens:,} tokens. Export with `lrc export {s.run_dir} --out "
             "MODEL_DIR`")
    return s.run_dir


def _log_held(s: Session) -> None:
    """What each process holds of the trainables and their optimizer state (the largest over processes)."""
    held = held_bytes(s.method.trainable_parameters(), s.optimizer)
    keys = sorted(held)
    mine = torch.tensor([held[k][0] for k in keys], dtype=torch.float64, device=s.device)
    torch.distributed.all_reduce(mine, op=torch.distributed.ReduceOp.MAX)
    shown = ", ".join(f"{k} {float(v) / 2**20:.4g} MiB of {held[k][1] / 2**20:.4g} MiB" for k, v in zip(keys, mine))
    log.info(f"held per process (largest): {shown}")


def distill(cfg: RunConfig, explicit: set[str] | None = None, resume: bool = False,
            command: str | None = None) -> Path:
    """Run (or continue) a distillation; returns the run directory. `command`: the command line, kept in
    RUN_DIR/commands.txt for the model card."""
    info = init_distributed(cfg.compute.device)
    log.configure(info.rank)
    finished = False
    try:
        run_dir = fit(setup(cfg, explicit or set(), resume, info, command))
        finished = True
        return run_dir
    finally:
        release_run_dirs()
        cleanup(info, finished)
