"""The run directory and what it takes to open one: options and inputs checked, config stored, checkpoints.

Order of work (`prepare`): validate every option and input (teacher, tokenizer, data, sizes, the run
directory) before anything is written, so bad input leaves the directory as it was. `load_run` rebuilds a
run's method with its latest trained weights from nothing but the directory (its config.yaml names the
teacher and every option), for export and evaluation.

RUN_DIR/config.yaml      the resolved configuration
RUN_DIR/metrics.jsonl    one JSON record per log step and evaluation (`MetricsLog`)
RUN_DIR/checkpoints/     see `lrc.train.checkpoint`
RUN_DIR/chat_template.jinja  the --chat-template file the run trained with (when given)
RUN_DIR/commands.txt     each `lrc distill` command line that ran the run, one a line
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from lrc import log
from lrc.config import LR_OPTIONS, RESUMABLE_CHANGES, RunConfig, load_run_config, validate
from lrc.data import PackedDataset, build_packed_dataset, build_training_data, resolve_data_files, split_holdout
from lrc.data.sampler import Mixture
from lrc.data.sources import split_weights
from lrc.data.tokenizer import load_tokenizer
from lrc.errors import UserError
from lrc.methods.base import Method
from lrc.methods.direct import method_defaults, starts_from_lrc
from lrc.methods.registry import METHODS, build_method, check_parallel
from lrc.methods.switch import FREE, free_method
from lrc.model.teacher import load_empty_teacher, load_teacher, load_teacher_config
from lrc.optim.lr_rule import AUTO
from lrc.student.shape import check_shape, resolve_target
from lrc.train import checkpoint as ckpt
from lrc.train.tracking import WandbTracker, require_wandb

if TYPE_CHECKING:
    from transformers import PreTrainedModel


CHAT_TEMPLATE = "chat_template.jinja"
COMMANDS = "commands.txt"


@dataclass
class Prepared:
    cfg: RunConfig
    run_dir: Path
    teacher: PreTrainedModel
    tokenizer: object
    train: object  # PackedDataset, data.Mixture or data.stream.TokenStream (see data.make_batches)
    val: PackedDataset | Mixture | None
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
    if resume and not _is_run_dir(run_dir) and _holds_no_run_yet(run_dir):
        # --resume starts the run when there is none yet, so that one command starts and restarts it
        log.info(f"--resume: {run_dir} holds no run yet; starting it")
        return cfg, None
    if resume:
        if not _is_run_dir(run_dir):
            raise UserError(f"--resume: {run_dir} holds no run to continue (no config.yaml) and is not empty; "
                            "choose another --out")
        saved = load_run_config(run_dir)
        # resumes with the rates it chose when the run started (config.yaml stores the numbers)
        explicit = explicit - {k for k in LR_OPTIONS if cfg.get(k) == AUTO}
        clashes = [k for k in sorted(explicit) if k not in RESUMABLE_CHANGES
                   and cfg.get(k) != saved.get(k)]
        if clashes:
            k = clashes[0]
            raise UserError(
                f"--resume: --{k.replace('_', '-')} {cfg.get(k)!r} contradicts the saved run "
                f"({saved.get(k)!r}); drop it or start a new --out"
            )
        merged = saved.to_dict()
        merged.update({k: cfg.get(k) for k in explicit})
        cfg = RunConfig(**merged)
        return cfg, ckpt.latest_checkpoint(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if _is_run_dir(run_dir):
            raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose a new --out")
        raise UserError(f"{run_dir} exists and is not empty; choose a new --out")
    return cfg, None


_HELD: dict[Path, int] = {}  # run directories this process holds (`hold_run_dir`), with their descriptors


def hold_run_dir(run_dir: Path, is_main: bool) -> bool:
    """Hold RUN_DIR while this run writes into it (rank 0; an exclusive flock, which the kernel drops when the
    process ends, however it ends). False when another process holds it: a run already writing there, e.g. the
    workers of a torchrun that was killed alone, which outlive it. True where flock is unavailable."""
    if not is_main or not run_dir.is_dir() or run_dir in _HELD:
        return True
    try:
        import fcntl  # POSIX only (a platform module: Windows has none)
    except ImportError:  # not POSIX: no check
        return True
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _HELD[run_dir] = fd
    return True


def release_run_dirs() -> None:
    """Let go of what `hold_run_dir` holds (a run's end; in-process callers may start another on the folder)."""
    for fd in _HELD.values():
        os.close(fd)
    _HELD.clear()


def _holds_no_run_yet(run_dir: Path) -> bool:
    """Absent, empty, or holding only what a start killed before its config.yaml was complete leaves."""
    if not run_dir.exists():
        return True
    return run_dir.is_dir() and all(p.name == "config.tmp" for p in run_dir.iterdir())


def prepare(cfg: RunConfig, explicit: set[str], resume: bool,
            before_load: Callable[[RunConfig], None] | None = None) -> Prepared:
    """Every option and input checked, then the teacher, tokenizer and data loaded; `before_load(cfg)` runs
    just before the teacher's weights are read (the fit forecast of `lrc.plan.verdict`)."""
    cfg, resume_from = resolve_config(method_defaults(cfg, explicit), explicit, resume)
    if not cfg.teacher:
        raise UserError("--teacher is required: a Hugging Face model directory or hub id")
    if not cfg.data.files:
        raise UserError("--data is required: one or more text/jsonl/json/parquet files or folders")
    if cfg.student.target_params is not None:  # the shape from the teacher's config alone, before anything is read

        solved, _ = resolve_target(cfg, load_teacher_config(cfg.teacher, cfg.trust_remote_code))
        cfg.student = solved.student
    if cfg.student.hidden_size is None:
        raise UserError("--hidden-size is required: the student's hidden size, a positive integer at most the "
                        "teacher's (or --target-params N)")
    if cfg.train.max_steps is None and cfg.train.max_tokens is None:
        raise UserError("give a training budget: --max-steps N or --max-tokens N")
    validate(cfg)  # every numeric option inside its range (lrc.config.RANGES), before anything is read
    if cfg.train.wandb:
        require_wandb()
    if cfg.free_after is not None and (cfg.method != "lrc" or cfg.compute.parallel == "fsdp"):
        raise UserError("--free-after switches an lrc run to free weights (kd), under --parallel ddp only; "
                        f"drop it for --method {cfg.method}" if cfg.method != "lrc" else
                        "--free-after is not supported with --parallel fsdp yet (the free student is not sharded); "
                        "use --parallel ddp")
    if cfg.keep_clone_terms and not starts_from_lrc(cfg) and cfg.free_after is None:
        raise UserError("--keep-clone-terms is for free-weight students that come from LRC's start: --method kd "
                        "(with --init pca or refit) or --free-after; drop it")
    check_parallel(cfg.method, cfg.compute.parallel == "fsdp")
    if cfg.compute.recompute_targets and not (cfg.compute.grad_checkpointing and cfg.method == "lrc"):
        raise UserError("--recompute-targets recomputes LRC's clone targets with its checkpointed layers: add "
                        "--grad-checkpointing (and --method lrc), or drop it")
    clone_options = sorted(k for k in explicit if k.startswith("clone_"))
    if clone_options and METHODS[cfg.method].free_weights and not cfg.keep_clone_terms:
        flags = ", ".join("--" + k.replace("_", "-") for k in clone_options)
        raise UserError(f"{flags}: LRC's clone terms, which --method {cfg.method} does not use (kd is the default "
                        "method); add --method lrc for an LRC run, or --keep-clone-terms for a kd student that "
                        "keeps them")
    for paths, _ in split_weights(cfg.data.files):  # missing paths fail before the teacher is loaded
        resolve_data_files(paths, streaming=cfg.data.streaming)
    val_files = resolve_data_files(cfg.data.val_files) if cfg.data.val_files else None

    if before_load is not None:
        before_load(cfg)
    teacher = None
    if cfg.compute.parallel == "fsdp" and int(os.environ.get("WORLD_SIZE",
                                                             "1")) > 1:  # each rank reads its shards later
        teacher = load_empty_teacher(cfg.teacher, dtype=cfg.compute.teacher_dtype,
                                     trust_remote_code=cfg.trust_remote_code)
    if teacher is None:
        teacher = load_teacher(cfg.teacher, dtype=cfg.compute.teacher_dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.student.hidden_size > teacher.config.hidden_size:
        raise UserError(
            f"--hidden-size {cfg.student.hidden_size} is larger than the teacher's hidden size "
            f"{teacher.config.hidden_size}; choose at most that"
        )
    check_shape(cfg, teacher.config)  # --ffn-size, --layers, --drop-layers
    tokenizer = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    options: dict[str, Any] = dict(text_field=cfg.data.text_field, num_proc=cfg.data.num_proc,
                                   chat_template=cfg.data.chat_template, train_on=cfg.data.train_on)
    # progress: a bar on a terminal, plain lines in a log (lrc.data.tokenise.DataProgress)
    ds = build_training_data(cfg.data.files, tokenizer, cfg.data.seq_len, cache, streaming=cfg.data.streaming,
                             progress=True,
                             **options)
    train: Any
    val: Any
    if val_files:
        train, val = ds, build_packed_dataset(val_files, tokenizer, cfg.data.seq_len, cache_dir=cache, **options)
    elif cfg.data.val_fraction > 0 and cfg.data.streaming:  # the first sequences of the stream are held out
        train, val = ds, ds.head(cfg.train.eval_batches * cfg.train.batch_size, advance=True)
    elif cfg.data.val_fraction > 0 and isinstance(ds, Mixture):  # each source holds out its own share
        halves = [split_holdout(part, cfg.data.val_fraction) for part in ds.parts]
        train = Mixture([t for t, _ in halves], [w for _, w in split_weights(cfg.data.files)], ds.names)
        val = Mixture([v for _, v in halves], [w for _, w in split_weights(cfg.data.files)], ds.names)
    elif cfg.data.val_fraction > 0:
        train, val = split_holdout(ds, cfg.data.val_fraction)
    else:
        train, val = ds, None
    # cfg.out is set: resolve_config requires it
    return Prepared(cfg, Path(cast(str, cfg.out)), teacher, tokenizer, train, val, resume_from)


class MetricsLog:
    """metrics.jsonl (and TensorBoard when installed, and W&B with --wandb PROJECT), rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, truncate_after: int | None = None,
                 wandb_project: str | None = None, config: dict | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        self.wandb = None
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
            from torch.utils.tensorboard import SummaryWriter  # the optional [tensorboard] extra

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.tb = None
        if wandb_project:
            self.wandb = WandbTracker(wandb_project, run_dir, config or {})

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
        if self.wandb is not None:
            self.wandb.log(record)

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None


def find_checkpoint(run_dir: Path, step: int | None = None, path: str | Path | None = None) -> Path:
    """The run's checkpoint to read: `path`, the one of `step`, or (neither) the latest; UserError if absent."""
    kept = ckpt.checkpoint_dirs(run_dir)
    if path is not None:
        chosen = Path(path)
        if not (chosen / "state.json").is_file():
            raise UserError(f"--checkpoint {path} is not a checkpoint folder (no state.json); `lrc runs {run_dir}` "
                            "lists the run's checkpoints")
        return chosen
    if not kept:
        raise UserError(f"{run_dir} has no checkpoint yet; run `lrc distill` on it first")
    if step is None:
        return kept[-1]
    named = run_dir / "checkpoints" / f"{ckpt.PREFIX}{step:08d}"
    if named not in kept:
        steps = ", ".join(str(int(p.name[len(ckpt.PREFIX):])) for p in kept)
        raise UserError(f"{run_dir} keeps no checkpoint of step {step}; it keeps steps {steps} "
                        "(see `lrc runs`; --keep-checkpoints sets how many are kept)")
    return named


def load_run(run_dir: str | Path, device="cpu", checkpoint: Path | None = None
             ) -> tuple[RunConfig, Method, object, torch.nn.Module]:
    """(config, method with the trained weights of `checkpoint` (default: the latest), tokenizer, teacher) of a
    finished or running run."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    last = checkpoint or find_checkpoint(run_dir)
    teacher_id = cast(str, cfg.teacher)  # set: a run is only started with a teacher (see `prepare`)
    teacher = load_teacher(teacher_id, dtype=cfg.compute.teacher_dtype,
                           trust_remote_code=cfg.trust_remote_code).to(device)
    trainable, _, state = ckpt.load_checkpoint(last, torch.device(device))
    # after --free-after's switch a checkpoint holds the free student, not the clone
    method = free_method(cfg, teacher) if state.get(FREE) else build_method(cfg, teacher, calibration=None)[0]
    method.load_trainable_state_dict(trainable)
    tokenizer = load_tokenizer(teacher_id, trust_remote_code=cfg.trust_remote_code)
    stored = run_dir / CHAT_TEMPLATE
    if stored.is_file():  # the --chat-template FILE the run trained with, as it was then
        tokenizer.chat_template = stored.read_text(encoding="utf-8")  # type: ignore[attr-defined]
    return cfg, method.to(device), tokenizer, teacher


def store_run_inputs(run_dir: Path, cfg: RunConfig, command: str | None) -> None:
    """What the run directory keeps besides config.yaml: the --chat-template file's text (the export carries
    it) and each command line that ran the run (the model card shows them)."""
    if cfg.data.chat_template and Path(cfg.data.chat_template).is_file():  # (a resumed run may train on a prepared
        text = Path(cfg.data.chat_template).read_text(encoding="utf-8")  # folder after the file moved: keep the copy)
        (run_dir / (CHAT_TEMPLATE + ".tmp")).write_text(text, encoding="utf-8")
        (run_dir / (CHAT_TEMPLATE + ".tmp")).replace(run_dir / CHAT_TEMPLATE)
    if command:
        with (run_dir / COMMANDS).open("a") as f:
            f.write(command + "\n")
