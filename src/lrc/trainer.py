"""The training loop behind `lrc distill`: one process or many under torchrun, with exact resume.

Order of work in `distill`: validate every input (teacher, data, sizes, run directory) before anything is
written; then create the run directory, store the resolved config, initialise (or restore) and train.
Each optimizer step draws its micro-batches from a `SequenceSampler` whose position is part of every
checkpoint, so an interrupted run resumed from its last checkpoint sees the same batches, the same
optimizer state and therefore produces the same losses and weights as a run that never stopped.

Loss normalisation across micro-batches and ranks is exact: the CE sum is divided by the number of
labelled tokens of the whole optimizer step (all ranks), and the per-token means of KL and clone terms by
the number of micro-batches; DDP's gradient averaging over ranks completes the mean.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lrc import checkpoint as ckpt
from lrc.config import RESUMABLE_CHANGES, RunConfig, load_run_config, save_config, validate
from lrc.data import (
    PackedDataset,
    SequenceSampler,
    build_packed_dataset,
    collate,
    resolve_data_files,
    split_holdout,
)
from lrc.distributed import (
    DistInfo,
    all_reduce_sum,
    average_gradients,
    broadcast_from_rank0,
    cleanup,
    init_distributed,
    wrap_data_parallel,
)
from lrc.errors import UserError
from lrc.losses import IGNORE_INDEX
from lrc.precision import autocast, compute_dtype
from lrc.schedule import lr_factor


def print0(info: DistInfo, *args, **kw):
    if info.is_main:
        print(*args, **kw, flush=True)


class RunInterrupted(Exception):
    """SIGINT/SIGTERM: the step was finished and a checkpoint saved; the CLI exits with 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops and its last good checkpoint is kept."""


@dataclass
class Prepared:
    cfg: RunConfig
    run_dir: Path
    teacher: torch.nn.Module
    tokenizer: object
    train: PackedDataset
    val: PackedDataset | None
    resume_from: Path | None


def default_cache_dir() -> Path:
    return Path(os.environ.get("LRC_CACHE", Path.home() / ".cache" / "lrc")) / "tokens"


def _is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file()


def resolve_config(cfg: RunConfig, explicit: set[str], resume: bool) -> tuple[RunConfig, Path | None]:
    """Check the options and the run directory; with --resume, merge onto the saved run's config."""
    if not cfg.out:
        raise UserError("--out RUN_DIR is required: the folder for checkpoints and metrics")
    run_dir = Path(cfg.out)
    if resume:
        if not _is_run_dir(run_dir):
            raise UserError(
                f"--resume: {run_dir} holds no run to continue (no config.yaml); drop --resume to start one")
        saved = load_run_config(run_dir)
        clashes = [k for k in sorted(explicit) if k not in RESUMABLE_CHANGES
                   and getattr(cfg, k) != getattr(saved, k)]
        if clashes:
            k = clashes[0]
            raise UserError(
                f"--resume: --{k.replace('_', '-')} {getattr(cfg, k)!r} contradicts the saved run "
                f"({getattr(saved, k)!r}); drop it or start a new --out"
            )
        merged = saved.to_dict()
        merged.update({k: getattr(cfg, k) for k in explicit})
        cfg = RunConfig(**merged)
        return cfg, ckpt.latest_checkpoint(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if _is_run_dir(run_dir):
            raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose a new --out")
        raise UserError(f"{run_dir} exists and is not empty; choose a new --out")
    return cfg, None


def prepare(cfg: RunConfig, explicit: set[str], resume: bool) -> Prepared:
    cfg, resume_from = resolve_config(cfg, explicit, resume)
    if not cfg.teacher:
        raise UserError("--teacher is required: a Hugging Face model directory or hub id")
    if not cfg.data:
        raise UserError("--data is required: one or more text/jsonl/json/parquet files or folders")
    if cfg.hidden_size is None:
        raise UserError("--hidden-size is required: the student's hidden size, a positive integer at most the "
                        "teacher's")
    if cfg.max_steps is None and cfg.max_tokens is None:
        raise UserError("give a training budget: --max-steps N or --max-tokens N")
    validate(cfg)  # every numeric option inside its range (lrc.config.RANGES), before anything is read
    if cfg.parallel == "fsdp" and cfg.method != "lrc":
        raise UserError("--parallel fsdp shards the teacher for --method lrc only; use --parallel ddp for baselines")
    train_files = resolve_data_files(cfg.data)
    val_files = resolve_data_files(cfg.val_data) if cfg.val_data else None

    from lrc.students import load_teacher, load_tokenizer

    teacher = load_teacher(cfg.teacher, dtype=cfg.teacher_dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.hidden_size > teacher.config.hidden_size:
        raise UserError(
            f"--hidden-size {cfg.hidden_size} is larger than the teacher's hidden size "
            f"{teacher.config.hidden_size}; choose at most that"
        )
    tokenizer = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    ds = build_packed_dataset(train_files, tokenizer, cfg.seq_len, cache_dir=cache,
                              text_field=cfg.text_field)
    if val_files:
        train, val = ds, build_packed_dataset(val_files, tokenizer, cfg.seq_len,
                                              cache_dir=cache, text_field=cfg.text_field)
    elif cfg.val_fraction > 0:
        train, val = split_holdout(ds, cfg.val_fraction)
    else:
        train, val = ds, None
    return Prepared(cfg, Path(cfg.out), teacher, tokenizer, train, val, resume_from)


def build_method(cfg: RunConfig, teacher, calibration=None):
    """The trainable object for cfg.method: an LRC clone or a direct student (baselines)."""
    from lrc.clone import LowRankClone
    from lrc.init import init_pca, init_random
    from lrc.students import DirectStudent, pruned_student, random_student

    weights = cfg.loss_weights()
    info: dict = {}
    if cfg.method == "lrc":
        model = LowRankClone(teacher, cfg.hidden_size, rms_norm_eps=cfg.rms_norm_eps, loss_weights=weights,
                             chunk_size=cfg.chunk_size)
        if calibration is not None:
            if cfg.init == "pca":
                info = init_pca(model, calibration())
            else:
                init_random(model, generator=torch.Generator().manual_seed(cfg.seed))
        if cfg.grad_checkpointing:
            model.enable_gradient_checkpointing()
        return model, info
    weights.clone = 0.0
    if cfg.method == "scratch":
        weights.kl = 0.0
    if cfg.method == "prune-kd" and calibration is not None:
        student, kept = pruned_student(teacher, cfg.hidden_size, calibration())
        info = {"kept_channels": len(kept)}
    else:
        student = random_student(teacher, cfg.hidden_size, cfg.seed)
    if cfg.grad_checkpointing:
        student.gradient_checkpointing_enable({"use_reentrant": False})
    return DirectStudent(student, teacher=None if cfg.method == "scratch" else teacher, loss_weights=weights,
                         chunk_size=cfg.chunk_size), info


def total_steps(cfg: RunConfig, world: int) -> int:
    per_step = cfg.batch_size * cfg.grad_accum * world * cfg.seq_len
    limits = []
    if cfg.max_steps is not None:
        limits.append(cfg.max_steps)
    if cfg.max_tokens is not None:
        limits.append(math.ceil(cfg.max_tokens / per_step))
    return max(0, min(limits))


def _autocast(cfg: RunConfig, device: torch.device):
    return autocast(cfg.precision, device)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def eval_batches(n: int, batch_size: int, max_batches: int, info: DistInfo, lockstep: bool = False):
    """(sequence indices, counted) of this rank's held-out batches: every world_size-th sequence from its
    rank, at most max_batches batches. lockstep: pad with uncounted repeats up to rank 0's count."""
    def share(rank):
        return list(range(rank, n, info.world_size))[: max_batches * batch_size]

    indices = share(info.rank)
    batches = [(indices[s:s + batch_size], True) for s in range(0, len(indices), batch_size)]
    if lockstep:
        most = math.ceil(len(share(0)) / batch_size)
        batches += [(share(0)[:batch_size], False)] * (most - len(batches))
    return batches


@torch.no_grad()
def evaluate(method, val: PackedDataset, cfg: RunConfig, device, info: DistInfo, max_batches: int,
             lockstep: bool = False) -> dict:
    """Held-out CE (nats/token) and KL of the student, over this rank's share, averaged over ranks.

    lockstep: every rank runs as many forwards as rank 0 (which has the most), repeating a batch without
    counting it, because a sharded teacher's forward is a collective operation."""
    if val is None or len(val) == 0:
        return {}
    method.eval()
    ce_sum = torch.zeros((), dtype=torch.float64)
    kl_sum = torch.zeros((), dtype=torch.float64)
    n_lab = torch.zeros((), dtype=torch.float64)
    n_tok = torch.zeros((), dtype=torch.float64)
    for chosen, counted in eval_batches(len(val), cfg.batch_size, max_batches, info, lockstep):
        batch = _to(collate([val.get(i) for i in chosen]), device)
        with _autocast(cfg, device):
            out = method(**batch)
        if not counted:
            continue
        labels = (batch["labels"] != IGNORE_INDEX).sum().double().cpu()
        ce_sum += out.terms["ce"].double().cpu() * labels
        kl_sum += out.terms["kl"].double().cpu() * batch["input_ids"].numel()
        n_lab += labels
        n_tok += batch["input_ids"].numel()
    tot = all_reduce_sum(torch.stack([ce_sum, kl_sum, n_lab, n_tok]).to(device), info).cpu()
    method.train()
    ce = float(tot[0] / tot[2].clamp_min(1))
    return {"loss": ce, "perplexity": math.exp(min(ce, 50.0)), "kl": float(tot[1] / tot[3].clamp_min(1)),
            "tokens": int(tot[3])}


@torch.no_grad()
def teacher_val_loss(teacher, val: PackedDataset, cfg: RunConfig, device, max_batches: int) -> dict:
    from lrc.evaluate import model_loss

    return model_loss(teacher, val, batch_size=cfg.batch_size, device=device, max_batches=max_batches,
                      precision=cfg.precision)


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


class MetricsLog:
    """metrics.jsonl (and TensorBoard when installed), rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, truncate_after: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if truncate_after is not None and self.path.exists():
            # Records past the checkpoint we resume from would be written again: drop them, and a last
            # line torn by a kill mid-write.
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= truncate_after:
                        kept.append(line)
                except ValueError:
                    continue
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            split = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "split"):
                    self.tb.add_scalar(f"{split}/{k}", v, record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def distill(cfg: RunConfig, explicit: set[str] | None = None, resume: bool = False) -> Path:
    """Run (or continue) a distillation; returns the run directory."""
    explicit = explicit or set()
    info = init_distributed(cfg.device)
    try:
        return _distill(cfg, explicit, resume, info)
    finally:
        cleanup(info)


def _distill(cfg: RunConfig, explicit: set[str], resume: bool, info: DistInfo) -> Path:
    prep = prepare(cfg, explicit, resume)
    cfg, run_dir, device = prep.cfg, prep.run_dir, info.device
    # fsdp: the teacher (loaded on the CPU) is sharded and only each rank's shard moves to the device.
    sharded = cfg.parallel == "fsdp" and info.enabled
    if sharded:
        from lrc.sharding import shard_teacher

        held, whole = shard_teacher(prep.teacher, device, compute_dtype(cfg.precision, device))
        print0(info, f"teacher sharded over {info.world_size} processes (FSDP2): {held / 2**20:.4g} MiB of "
                     f"{whole / 2**20:.4g} MiB of its weights on each")
    else:
        prep.teacher.to(device)
    steps = total_steps(cfg, info.world_size)
    torch.manual_seed(cfg.seed)

    calib = None
    if prep.resume_from is None and (cfg.method == "prune-kd" or (cfg.method == "lrc" and cfg.init == "pca")):
        def calib():
            # Global batches, as in training: W ranks with --batch-size b calibrate (each, identically) on
            # the same sequences as one process with --batch-size W*b.
            n = min(len(prep.train), cfg.calib_batches * cfg.batch_size * info.world_size)
            for s in range(0, n, cfg.batch_size):
                yield _to(collate([prep.train.get(i) for i in range(s, min(n, s + cfg.batch_size))]), device)
    method, init_info = build_method(cfg, prep.teacher, calibration=calib)
    method.to(device)

    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, eps=1e-8)
    warmup = int(round(cfg.warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, warmup, cfg.schedule, cfg.min_lr_ratio))
    sampler = SequenceSampler(len(prep.train), seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    step, tokens, elapsed_before = 0, 0, 0.0
    if prep.resume_from is not None:
        trainable, opt_state, state = ckpt.load_checkpoint(prep.resume_from, device)
        method.load_trainable_state_dict(trainable)
        optimizer.load_state_dict(opt_state["optimizer"])
        sched.load_state_dict(opt_state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        step, tokens, elapsed_before = state["step"], state["tokens"], state.get("elapsed", 0.0)
        print0(info, f"resuming {run_dir} from step {step} ({tokens:,} tokens)")
    elif resume:
        print0(info, f"resuming {run_dir}: no checkpoint yet, starting from step 0")
    # Write into RUN_DIR only now: every input, the checkpoint included, has been read and checked (a bad
    # one leaves the directory as it was), and every rank has passed `resolve_config`'s check of RUN_DIR.
    all_reduce_sum(torch.zeros((), device=device), info)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    log = MetricsLog(run_dir, info.is_main, truncate_after=step if resume else None)
    # LRC generates the student once per optimizer step and reuses it across micro-batches, so gradients
    # reach the projections only when the step's last backward has run: DDP's per-backward hooks cannot
    # serve, and `average_gradients` averages them over ranks instead (ddp and fsdp alike). The baselines
    # are ordinary models under DDP.
    from lrc.clone import LowRankClone

    is_lrc = isinstance(method, LowRankClone)
    model = method if is_lrc else wrap_data_parallel(method, info)
    if is_lrc:
        broadcast_from_rank0(params, info)
    plan = None
    if is_lrc and not sharded:  # factored roles would hold whole teacher matrices
        plan = method.plan_projections(cfg.batch_size * cfg.seq_len, reuse=cfg.grad_accum)
    n_params = sum(p.numel() for p in params)
    print0(info, f"method {cfg.method}: teacher {cfg.teacher} (hidden {prep.teacher.config.hidden_size}) -> "
                 f"hidden {cfg.hidden_size}; {n_params:,} trainable parameters; {len(prep.train):,} training "
                 f"sequences of {cfg.seq_len}; {steps} steps on {info.world_size} x {device}"
                 + (f"; init {cfg.init}: {init_info}" if init_info else "")
                 + (f"; factored: {', '.join(r for r, m in plan.items() if m == 'factored')}"
                    if plan and "factored" in plan.values() else ""))

    def save(at_step: int):
        if not info.is_main:
            return
        state = {"step": at_step, "tokens": tokens, "sampler": sampler.state_dict(),
                 "elapsed": elapsed_before + time.time() - t0}
        ckpt.save_checkpoint(run_dir, at_step, method.trainable_state_dict(),
                             {"optimizer": optimizer.state_dict(), "scheduler": sched.state_dict()},
                             state, keep=cfg.keep_checkpoints)

    t0 = time.time()
    if prep.val is not None and (info.is_main or sharded) and prep.resume_from is None and step == 0:
        tv = teacher_val_loss(prep.teacher, prep.val, cfg, device, cfg.eval_batches)
        log.write({"split": "val_teacher", "step": 0, **tv, "eval_tokens": tv["tokens"], "tokens": 0})
        print0(info, f"teacher held-out loss {tv['loss']:.4f} (ppl {tv['perplexity']:.2f})")
    if prep.val is not None and step == 0 and prep.resume_from is None:
        ev = evaluate(method, prep.val, cfg, device, info, cfg.eval_batches, lockstep=sharded)
        log.write({"split": "val", "step": 0, **ev, "eval_tokens": ev["tokens"], "tokens": 0})
        print0(info, f"step 0 held-out loss {ev['loss']:.4f} (ppl {ev['perplexity']:.2f})")
    if steps == 0 and prep.resume_from is None:
        save(0)  # --max-steps 0: initialise and save
    start_step, window_t, window_tok = step, time.time(), 0
    status = "done"
    with _StopFlag() as stop:
        while step < steps:
            micro = [collate([prep.train.get(i) for i in sampler.next_indices(cfg.batch_size)])
                     for _ in range(cfg.grad_accum)]
            n_lab_local = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)
            n_lab = float(all_reduce_sum(torch.tensor(float(n_lab_local), device=device), info))
            sums: dict[str, float] = {}
            extra, finish = {}, None
            if is_lrc and len(micro) > 1:
                with _autocast(cfg, device):
                    weights, head, finish = method.step_weights()
                extra = {"student_weights": weights, "student_head": head}
            for j, b in enumerate(micro):
                b = _to(b, device)
                sync = contextlib.nullcontext()
                if model is not method and j < len(micro) - 1:
                    sync = model.no_sync()
                with sync:
                    with _autocast(cfg, device):
                        out = model(**b, ce_denominator=n_lab / info.world_size, scale=1.0 / len(micro),
                                    **extra)
                    out.loss.backward()
                n_b = float((b["labels"] != IGNORE_INDEX).sum())
                for k, v in out.terms.items():
                    w = n_b if k == "ce" else 1.0 / len(micro)
                    sums[k] = sums.get(k, 0.0) + float(v) * w
            if finish is not None:
                finish()
            if is_lrc:
                average_gradients(params, info)
            keys = sorted(sums)
            vec = all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device), info)
            terms = {k: float(vec[i]) / (n_lab if k == "ce" else info.world_size) for i, k in enumerate(keys)}
            w = cfg.loss_weights()
            loss = w.ce * terms.get("ce", 0) + w.kl * terms.get("kl", 0) + w.clone * terms.get("clone", 0)
            if cfg.grad_clip > 0:
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            else:
                gnorm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                last = ckpt.latest_checkpoint(run_dir)
                raise TrainingDiverged(
                    f"non-finite loss ({loss}) or gradient norm ({gnorm}) at step {step + 1}; stopped without "
                    f"saving. Last good checkpoint: {last or 'none'}. Lower --lr or check the data."
                )
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.step()
            sched.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_tokens = sum(b["input_ids"].numel() for b in micro) * info.world_size
            tokens += step_tokens
            window_tok += step_tokens
            if step % cfg.log_every == 0 or step == steps:
                now = time.time()
                tps = window_tok / max(1e-9, now - window_t)
                rate = (now - t0) / max(1, step - start_step)
                record = {"split": "train", "step": step, "tokens": tokens, "loss": loss, **terms, "lr": lr_now,
                          "grad_norm": gnorm, "tokens_per_s": tps, "elapsed": elapsed_before + now - t0}
                log.write(record)
                shown = " ".join(f"{k} {v:.4f}" for k, v in terms.items() if "/" not in k)
                print0(info, f"step {step}/{steps} | tok {tokens:,} | loss {loss:.4f} ({shown}) | lr {lr_now:.2e} "
                             f"| gnorm {gnorm:.3f} | {tps:,.0f} tok/s | ETA {_fmt_time(rate * (steps - step))}")
                window_t, window_tok = now, 0
            if prep.val is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == steps):
                eval_start = time.time()
                ev = evaluate(method, prep.val, cfg, device, info, cfg.eval_batches, lockstep=sharded)
                window_t += time.time() - eval_start  # tokens/s counts training time only
                log.write({"split": "val", "step": step, **ev, "eval_tokens": ev["tokens"], "tokens": tokens})
                print0(info, f"step {step} held-out loss {ev['loss']:.4f} (ppl {ev['perplexity']:.2f})")
            stopping = stop.signal is not None
            if info.enabled:
                flag = all_reduce_sum(torch.tensor(float(stopping), device=device), info)
                stopping = bool(flag > 0)
            if step == steps or step % cfg.save_every == 0 or stopping:
                save(step)
            if stopping:
                status = "interrupted"
                received = stop.signal or signal.SIGTERM  # another rank's signal under torchrun
                break
    log.close()
    if status == "interrupted":
        print0(info, f"interrupted at step {step}: checkpoint saved; continue with "
                     f"`lrc distill --out {run_dir} --resume`")
        raise RunInterrupted(int(received))
    else:
        print0(info, f"done: {step} steps, {tokens:,} tokens. Export with `lrc export {run_dir} --out MODEL_DIR`")
    return run_dir


def load_run(run_dir: str | Path, device="cpu"):
    """(config, method with the latest trained weights, tokenizer, teacher) of a finished or running run."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    last = ckpt.latest_checkpoint(run_dir)
    if last is None:
        raise UserError(f"{run_dir} has no checkpoint yet; run `lrc distill` on it first")
    from lrc.students import load_teacher, load_tokenizer

    teacher = load_teacher(cfg.teacher, dtype=cfg.teacher_dtype, trust_remote_code=cfg.trust_remote_code).to(device)
    method, _ = build_method(cfg, teacher, calibration=None)
    trainable, _, _ = ckpt.load_checkpoint(last, torch.device(device))
    method.load_trainable_state_dict(trainable)
    tokenizer = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    return cfg, method.to(device), tokenizer, teacher
