"""One typed configuration for a run, in sections that mirror the package; YAML files and the command line are
two flat views of it.

`RunConfig` holds what names the run (teacher, out, method, seed, trust_remote_code) and one section per
part of the package that reads it: `data` (`lrc.data`), `student` (`lrc.student`: shape and initialisation),
`optim` (`lrc.optim`: the learning rate and AdamW), `train` (`lrc.train`: budget, batches, logging,
checkpoints), `loss` (`lrc.model.losses.LossWeights` itself) and `compute` (precision, device, parallelism).

Every option has one flat name, its command-line flag and its YAML key (`--hidden-size`, `hidden_size:`),
listed in `FIELDS` with the section attribute it sets; a run directory stores the resolved config in that
flat form (`RUN_DIR/config.yaml`, the same keys as ever), so `lrc export`, `lrc eval` and `--resume` need no
repeated flags. `RunConfig(**flat_options)` builds one; `cfg.replace(**flat_options)` a changed copy.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, cast, get_args, get_origin

import yaml

from lrc.errors import UserError
from lrc.model.losses import LossWeights
from lrc.model.precision import DTYPES
from lrc.optim.lr_rule import AUTO, parse_lr


def opt(default, help: str, choices=None, **kw):
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class DataConfig:
    """What is read and how it is tokenised and packed (`lrc.data`)."""

    files: list[str] = opt([], "training data: text/.md files, .jsonl/.json/.parquet (text or chat messages), "
                                  "save_to_disk folders, folders of them, an `lrc prepare` folder, or, when online, a "
                                  "hub dataset [owner/]name[:config][@split]; PATH:WEIGHT items make a mixture "
                                  "sampled in proportion to the weights, e.g. web/:0.6 code.jsonl:0.4")
    val_files: list[str] = opt([], "held-out data (default: hold out --val-fraction of --data)")
    val_fraction: float = opt(0.02, "share of the training sequences held out when --val-data is not given")
    text_field: str = opt("text", "field holding the text in .jsonl/.json/.parquet/datasets data")
    num_proc: int = opt(1, "processes tokenising the data (datasets' map num_proc)")
    streaming: bool = opt(False, "read and tokenise --data on the fly, in order, with the stream position in "
                          "every checkpoint (for corpora larger than the disk)")
    chat_template: str | None = opt(None, "Jinja chat template file for chat rows (default: the tokenizer's own)")
    train_on: str = opt("all", "which tokens of chat rows the losses count: all, or only the assistant's",
                        choices=("all", "assistant"))
    seq_len: int = opt(512, "tokens per training sequence")
    cache_dir: str | None = opt(None, "token cache folder "
                                "(default: $LRC_CACHE/tokens, else ~/.cache/lrc/tokens)")


@dataclass
class StudentConfig:
    """The student's shape and starting point (`lrc.student`; docs/student-shape.md)."""

    hidden_size: int | None = opt(None, "student hidden size d_S (at most the teacher's)")
    ffn_size: int | None = opt(None, "student FFN width M (at most the teacher's intermediate size), through a "
                               "trainable projection of the intermediate side (default: the teacher's, no "
                               "projection)")
    layers: int | None = opt(None, "student depth K: keep the K teacher layers that change their input most on "
                             "calibration data (default: all)")
    drop_layers: str | None = opt(None, "comma-separated teacher layers to drop, e.g. 2,5 (instead of choosing "
                                  "them by importance; a run's config.yaml records the ones --layers chose)")
    target_params: str | None = opt(None, "solve the student's shape for about this many exported parameters: a "
                                    "count (1.5B, 350M, 120000000) or a share of the teacher's (35%%)")
    target_dims: str = opt("hidden", "what --target-params solves, comma-separated: hidden, ffn, layers (shrunk "
                           "by one common factor, multiples of 64/128 where the teacher is that wide); the rest "
                           "stays as given")
    init: str = opt("refit", "the student's start: refit (pca, then each layer's projections fitted by least "
                    "squares to the teacher's layer outputs on the calibration batches), pca (teacher-aware) or "
                    "random (lrc: the official N(0, 0.02) projections; kd: transformers' random weights); kd with "
                    "pca or refit starts from LRC's initial student multiplied out", choices=("refit", "pca", "random"))
    calib_batches: int = opt(8, "calibration batches (of --batch-size x processes sequences) for --init "
                             "refit/pca and prune-kd")
    rms_norm_eps: float | None = opt(None, "student RMSNorm epsilon (default: the teacher's)")


@dataclass
class OptimConfig:
    """The learning rate and its schedule, and AdamW (`lrc.optim`)."""

    lr: float | str = opt("auto", "peak learning rate, or auto: chosen from the student's hidden size and the "
                          "tokens per step by a rule fitted on measurements (lrc.optim.lr_rule; the value is "
                          "printed and stored in the run's config.yaml)")
    free_lr: float | str = opt("auto", "--free-after: peak learning rate of the free weights after the switch "
                               "(the schedule's shape carries on), or auto: the free-weight rule (lrc.optim.lr_rule)")
    schedule: str = opt("cosine", "learning-rate schedule after warm-up", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = opt(0.05, "share of the steps spent warming up linearly")
    min_lr_ratio: float = opt(0.0, "final learning rate as a share of --lr (cosine/linear; --method kd from LRC's "
                              "start: 0.1 unless given, lrc.methods.direct.FREE_MIN_LR_RATIO)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")


@dataclass
class TrainConfig:
    """The budget, the batches, and what a run records on the way (`lrc.train`)."""

    max_steps: int | None = opt(None, "optimizer steps to run (0: initialise and save only)")
    max_tokens: int | None = opt(None, "stop after this many training tokens (whichever of the two comes first)")
    batch_size: int = opt(4, "sequences per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    stop_on_rise: float = opt(0.5, "stop the run when the mean loss of the last 5 steps is more than this share "
                              "above the first step's (a learning rate far too high); 0: never")
    log_every: int = opt(10, "steps between progress lines and metrics.jsonl records")
    eval_every: int = opt(200, "steps between held-out evaluations (0: only at the end)")
    eval_batches: int = opt(16, "held-out micro-batches per evaluation")
    save_every: int = opt(500, "steps between checkpoints (one is always written at the end)")
    keep_checkpoints: int = opt(3, "checkpoints kept; older ones are deleted")
    wandb: str | None = opt(None, "also log metrics.jsonl's records to this Weights & Biases project (needs "
                            "wandb: pip install 'lowrankclone[wandb]'; WANDB_MODE=offline logs without network)")


@dataclass
class ComputeConfig:
    """Where and in what precision the run computes (`lrc.model.precision`, `lrc.distributed`)."""

    precision: str = opt("auto", "bf16 autocast (fp32 master weights), fp32, or auto: bf16 on CUDA and on "
                         "CPUs with bf16 matrix instructions (AMX / AVX512-BF16), else fp32",
                         choices=("auto", "bf16", "fp32"))
    teacher_dtype: str = opt("auto", "dtype the teacher's weights are stored in: auto (the checkpoint's own, "
                             "e.g. bfloat16 for published models), float32, bfloat16 or float16; under --precision "
                             "fp32 a lower-precision teacher still computes in fp32",
                             choices=("auto", *DTYPES))
    grad_checkpointing: bool = opt(False, "recompute student layers in backward to save activation memory")
    recompute_targets: bool = opt(False, "with --grad-checkpointing, lrc: compute each layer's clone targets with "
                                  "it from the teacher layer's recorded input instead of keeping every layer's "
                                  "(less memory; each kept teacher layer runs twice more per step)")
    chunk_size: int = opt(0, "tokens per chunk of the vocabulary-wide CE/KL (0: auto, about 64 MiB of fp32 logits)")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    parallel: str = opt("ddp", "under torchrun: ddp (every process holds the whole teacher) or fsdp (the teacher "
                        "is sharded over the processes with FSDP2, for teachers too big for one device; "
                        "--method lrc only)",
                        choices=("ddp", "fsdp"))


@dataclass
class RunScope:
    """What names the run: the teacher, the run directory, the method and its seed."""

    teacher: str | None = opt(None, "teacher model: a local Hugging Face directory or a hub id")
    out: str | None = opt(None, "run directory (checkpoints, metrics.jsonl, config.yaml)")
    method: str = opt("kd", "kd: an ordinary student started from LRC's start (--init) and trained by KD, the best "
                      "student in our budget curves (BENCHMARKS.md); lrc: the low-rank clone itself (the only one "
                      "under --parallel fsdp); scratch or prune-kd: baselines on the same architecture",
                      choices=("kd", "lrc", "scratch", "prune-kd"))
    seed: int = opt(0, "seed for init and data order")
    free_after: float | None = opt(None, "lrc only: after this share of the run's steps (e.g. 0.5), multiply the "
                                   "student out and train every weight freely by kd (KL + CE) on the same "
                                   "learning-rate schedule at --free-lr (default: LRC to the end)")
    keep_clone_terms: bool = opt(False, "a free-weight student (kd from LRC's start, or after --free-after) keeps "
                                 "LRC's clone terms, compared through the maps of the clone it came from (off: "
                                 "measured to cost kd 4.5 points at a quarter of the teacher's width)")
    trust_remote_code: bool = opt(False, "allow model code from the hub (off unless you trust it)")


# The loss section is LossWeights itself; its fields' flags and help (defaults are LossWeights' own).
_LOSS_OPTIONS = {
    "ce_weight": ("ce", "weight of the next-token cross-entropy (--method kd from LRC's start: 0.25 unless given, "
                        "lrc.methods.direct.FREE_CE_WEIGHT)"),
    "kl_weight": ("kl", "weight of KL(teacher || student), averaged per token"),
    "kl_temperature": ("kl_temperature", "KL temperature tau"),
    "clone_weight": ("clone", "alpha: weight of the activation-clone sum (0: no clone loss)"),
    "clone_q": ("q", "clone term weight: q projection"),
    "clone_k": ("k", "clone term weight: k projection"),
    "clone_v": ("v", "clone term weight: v projection"),
    "clone_attn_out": ("attn_out", "clone term weight: attention output"),
    "clone_gate": ("gate", "clone term weight: gate projection"),
    "clone_up": ("up", "clone term weight: up projection"),
    "clone_ffn_out": ("ffn_out", "clone term weight: FFN output"),
}
SECTIONS: dict[str, type] = {"data": DataConfig, "student": StudentConfig, "optim": OptimConfig,
                             "train": TrainConfig, "loss": LossWeights, "compute": ComputeConfig}
# Options that take a number or `auto` (a rule resolves it when the run starts and config.yaml stores the number)
LR_OPTIONS = ("lr", "free_lr")
# Flat names that are not the section attribute's own
_RENAMED = {"data": ("data", "files"), "val_data": ("data", "val_files"),
            **{flat: ("loss", attr) for flat, (attr, _) in _LOSS_OPTIONS.items()}}
# The flat order: --help's, and config.yaml's keys (as written by every earlier version)
_ORDER = ("teacher", "data", "val_data", "val_fraction", "text_field", "num_proc", "streaming", "chat_template",
          "train_on", "hidden_size", "ffn_size", "layers", "drop_layers", "target_params", "target_dims", "out",
          "method", "init", "calib_batches", "max_steps", "max_tokens", "batch_size", "grad_accum", "seq_len", "lr",
          "schedule", "warmup_ratio", "min_lr_ratio", "weight_decay", "adam_beta1", "adam_beta2", "grad_clip",
          "stop_on_rise", "seed", *_LOSS_OPTIONS, "rms_norm_eps", "precision", "teacher_dtype",
          "grad_checkpointing", "recompute_targets", "chunk_size", "device", "parallel", "trust_remote_code",
          "log_every", "eval_every",
          "eval_batches", "save_every", "keep_checkpoints", "wandb", "cache_dir", "free_after", "free_lr",
          "keep_clone_terms")


@dataclass(frozen=True)
class Option:
    """One flat option: the section it lives in (None: the run's own scope) and the attribute there."""

    name: str
    section: str | None
    attr: str
    type: Any
    """The annotation (a string: the dataclasses are `from __future__ import annotations`)."""
    default: Any
    help: str
    choices: tuple[str, ...] | None


def _options() -> dict[str, Option]:
    found: dict[str, Option] = {}
    where: dict[str, tuple[str | None, str]] = {
        attr: (section, attr) for section, cls in SECTIONS.items() for attr in (f.name for f in fields(cls))}
    where.update({f.name: (None, f.name) for f in fields(RunScope)})
    by_attr: dict[tuple[str | None, str], str] = {v: k for k, v in _RENAMED.items()}
    for flat in _ORDER:
        section, attr = _RENAMED.get(flat) or where[flat]
        assert (section, attr) not in by_attr or by_attr[(section, attr)] == flat, flat
        cls = SECTIONS[section] if section else RunScope
        f = next(f for f in fields(cls) if f.name == attr)
        default = f.default if f.default is not MISSING else cast(Callable[[], Any], f.default_factory)()
        help_text = _LOSS_OPTIONS[flat][1] if section == "loss" else f.metadata["help"]
        found[flat] = Option(flat, section, attr, f.type, default, help_text, f.metadata.get("choices"))
    every = {(s, f.name) for s, cls in SECTIONS.items() for f in fields(cls)} | \
        {(None, f.name) for f in fields(RunScope)}
    assert every == {(o.section, o.attr) for o in found.values()}, every ^ {(o.section, o.attr) for o in found.values()}
    return found


class RunConfig:
    """A run's options: the run's own (teacher, out, method, seed, trust_remote_code) and one section per part
    of the package (`data`, `student`, `optim`, `train`, `loss`, `compute`).

    Built from flat options, `RunConfig(hidden_size=256, data=["a.txt"])`, every other option its default."""

    teacher: str | None
    out: str | None
    method: str
    seed: int
    free_after: float | None
    keep_clone_terms: bool
    trust_remote_code: bool
    data: DataConfig
    student: StudentConfig
    optim: OptimConfig
    train: TrainConfig
    loss: LossWeights
    compute: ComputeConfig

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(FIELDS))
        if unknown:
            raise TypeError(f"RunConfig got unknown options: {', '.join(unknown)}")
        for name, cls in SECTIONS.items():
            setattr(self, name, cls())
        for f in fields(RunScope):
            setattr(self, f.name, copy.deepcopy(FIELDS[f.name].default))
        for name, value in options.items():
            self.set(name, value)

    def get(self, name: str) -> Any:
        """The value of flat option `name`."""
        o = FIELDS[name]
        return getattr(getattr(self, o.section) if o.section else self, o.attr)

    def set(self, name: str, value: Any) -> None:
        o = FIELDS[name]
        setattr(getattr(self, o.section) if o.section else self, o.attr, value)

    def replace(self, **options: Any) -> RunConfig:
        """A copy with these flat options changed."""
        new = copy.deepcopy(self)
        for name, value in options.items():
            new.set(name, value)
        return new

    def to_dict(self) -> dict[str, Any]:
        """The flat view: every option by its flat name, in --help's order (config.yaml, W&B)."""
        return {name: copy.deepcopy(self.get(name)) for name in FIELDS}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclasses it holds

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.to_dict().items() if v != FIELDS[k].default}
        return f"RunConfig({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


FIELDS: dict[str, Option] = _options()


# Options that may differ when resuming a run; everything else must match the saved run.
RESUMABLE_CHANGES = {"max_steps", "max_tokens", "log_every", "eval_every", "eval_batches", "save_every",
                     "keep_checkpoints", "device", "parallel", "out", "cache_dir", "data", "val_data", "num_proc",
                     "wandb", "stop_on_rise"}


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric option: a finite number between `lo` and `hi` (None: unbounded), each
    bound included unless `lo_open` / `hi_open`."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def describe(self, integer: bool = False) -> str:
        if integer and self.lo == 1 and not self.lo_open and self.hi is None:
            return "a positive integer"
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


def _at_least(lo) -> Range:
    return Range(lo=lo)


def _above(lo) -> Range:
    return Range(lo=lo, lo_open=True)


# The valid range of every numeric option, checked by `validate` before a run loads or writes anything.
# Every int/float field of RunConfig must have an entry (tests/cli/test_cli_errors.py checks); None, where a
# field allows it (max_steps, max_tokens, rms_norm_eps; hidden_size is required elsewhere), is not checked.
RANGES: dict[str, Range] = {
    "val_fraction": Range(0, 1, hi_open=True),
    "hidden_size": _at_least(1),
    "ffn_size": _at_least(1),
    "layers": _at_least(1),
    "num_proc": _at_least(1),
    "calib_batches": _at_least(1),
    "max_steps": _at_least(0),
    "max_tokens": _at_least(0),
    "batch_size": _at_least(1),
    "grad_accum": _at_least(1),
    "seq_len": _at_least(2),  # a sequence of one token has nothing to predict
    "lr": _above(0),
    "free_lr": _above(0),
    "warmup_ratio": Range(0, 1),
    "min_lr_ratio": Range(0, 1),
    "weight_decay": _at_least(0),
    "adam_beta1": Range(0, 1, hi_open=True),
    "adam_beta2": Range(0, 1, hi_open=True),
    "grad_clip": _at_least(0),  # 0: off
    "stop_on_rise": _at_least(0),  # 0: off
    "seed": Range(0, 2**64 - 1),  # numpy and torch generators take non-negative 64-bit seeds
    "ce_weight": _at_least(0),
    "kl_weight": _at_least(0),
    "kl_temperature": _above(0),
    "clone_weight": _at_least(0),
    "clone_q": _at_least(0),
    "clone_k": _at_least(0),
    "clone_v": _at_least(0),
    "clone_attn_out": _at_least(0),
    "clone_gate": _at_least(0),
    "clone_up": _at_least(0),
    "clone_ffn_out": _at_least(0),
    "rms_norm_eps": _above(0),
    "chunk_size": _at_least(0),  # 0: auto
    "log_every": _at_least(1),
    "eval_every": _at_least(0),  # 0: only at the end
    "eval_batches": _at_least(1),
    "save_every": _at_least(1),
    "keep_checkpoints": _at_least(0),  # 0: keep all
    "free_after": Range(0, 1, hi_open=True),  # 0: kd from LRC's start
}


def check_option(name: str, value, flag: str | None = None) -> None:
    """UserError unless `value` is valid for option `name` (RunConfig field or an eval option with the same
    meaning): the right type and inside RANGES[name]. `flag` names the option in the message."""
    flag = flag or "--" + name.replace("_", "-")
    integer = _parse_type(name) is int if name in FIELDS else isinstance(value, int)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise UserError(f"{flag} must be {'an integer' if integer else 'a number'} (got {value!r})")
    allowed = RANGES[name]
    if value not in allowed:
        finite = "" if integer or allowed.hi is not None or math.isfinite(value) else "a finite number "
        raise UserError(f"{flag} must be {finite}{allowed.describe(integer)} (got {value!r})")


def validate(cfg: RunConfig) -> None:
    """Check every numeric option against RANGES; UserError (one line) naming the first one out of range."""
    for name in RANGES:
        value = cfg.get(name)
        if value is not None and not (name in LR_OPTIONS and value == AUTO):
            check_option(name, value)


def _base_type(tp):
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) is list or tp is list:
        return list
    if args:
        return _base_type(args[0])
    return tp


def _parse_type(name: str):
    # a str: `from __future__ import annotations` leaves every field's annotation unevaluated
    tp = FIELDS[name].type
    if isinstance(tp, str):
        tp = eval(tp, {"str": str, "int": int, "float": float, "bool": bool, "list": list})
    return _base_type(tp)


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (),
                         hidden: frozenset[str] = frozenset()) -> None:
    """One `--kebab-name` option per RunConfig field; defaults stay unset so we know what the user gave.
    `hidden` options are accepted but not listed in --help (e.g. `lrc plan` takes a distill command line whole
    but lists only what changes a plan)."""
    for f in FIELDS.values():
        if f.name in skip:
            continue
        tp = _parse_type(f.name)
        help_text = f.help
        if "(default:" not in help_text:  # some fields describe their default in words
            help_text += f" (default: {f.default})"
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS,
                                  help=argparse.SUPPRESS if f.name in hidden else help_text)
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif tp is list:
            parser.add_argument(flag, nargs="+", metavar="PATH", **kw)
        else:
            if f.choices:
                kw["choices"] = f.choices
            if f.name in LR_OPTIONS:  # a number or `auto`
                tp = _lr_type
            parser.add_argument(flag, type=tp, metavar=f.name.upper() if "choices" not in kw else None, **kw)


def _lr_type(text: str) -> float | str:
    try:
        return parse_lr(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or auto (got {text!r})") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"config file {path} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise UserError(f"unknown option '{key}' in {path}; see `lrc distill --help` for the options")
        out[name] = _coerce(name, value, str(path))
    return out


def _coerce(name: str, value, where: str):
    tp = _parse_type(name)
    if value is None:
        return None
    try:
        if name in LR_OPTIONS:
            return parse_lr(value)
        if tp is list:
            return [str(v) for v in value] if isinstance(value, list) else [str(value)]
        if tp is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if tp is float and isinstance(value, str):
            return float(value)
        return tp(value)
    except (TypeError, ValueError):
        raise UserError(f"option '{name}' in {where} must be a {tp.__name__}, got {value!r}") from None


def build_config(values: dict[str, Any]) -> RunConfig:
    cfg = RunConfig(**values)
    for name, f in FIELDS.items():
        if f.choices and cfg.get(name) not in f.choices:
            raise UserError(f"option {name} must be one of {', '.join(f.choices)}, got {cfg.get(name)!r}")
    return cfg


def save_config(cfg: RunConfig, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not an lrc run directory (no config.yaml); pass the --out of `lrc distill`")
    return build_config(read_yaml(path))
