"""The start-up summary `lrc distill` prints once everything is loaded: teacher, student, initialisation, data,
budget, learning rate, memory forecast, one labelled line each, in words (no Python reprs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def plural(n: int, word: str) -> str:
    """'1 step', '2 steps', '12,000 steps'."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _number(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def describe_init(method: str, init: str, info: dict) -> str:
    """The initialisation in words: LRC's pca/refit figures, prune-kd's kept channels; "" when nothing to say.

    Known keys get sentences; any other key (a later initialiser's) is shown as "key value"."""
    if not info:
        return ""
    info = dict(info)
    said = []
    if "energy_kept" in info:
        said.append(f"{float(info.pop('energy_kept')):.1%} of the teacher's residual-stream energy kept")
    if "heldout_kl_pca" in info and "heldout_kl_refit" in info:
        kept = info.pop("refit_kept", None)
        tokens = info.pop("heldout_tokens", None)
        info.pop("ridge", None)
        said.append(f"KL to the teacher on {_number(tokens)} held-out calibration tokens "
                    f"{_number(info.pop('heldout_kl_pca'))} after pca, {_number(info.pop('heldout_kl_refit'))} "
                    "after refit"
                    + ("" if kept is None else " (refit kept)" if kept else " (refit discarded: pca kept)"))
    if "refit_skipped" in info:
        info.pop("refit_kept", None)
        said.append(f"refit skipped: {info.pop('refit_skipped')}")
    if "kept_channels" in info:
        said.append(f"kept the teacher's {_number(info.pop('kept_channels'))} most important hidden channels")
    said += [f"{k.replace('_', ' ')} {_number(v)}" for k, v in info.items()]
    label = f"{init}: " if method in ("lrc", "kd") else "pruned: " if method == "prune-kd" else ""
    return label + "; ".join(said)


@dataclass
class Startup:
    """What the summary states (gathered by `lrc.train.trainer.setup`)."""

    method: str
    teacher: str
    teacher_config: Any
    teacher_params: int
    teacher_dtype: str
    student: str  # `lrc.student.shape.describe`
    trainable: int
    init: str  # `describe_init`
    data: str
    steps: int
    tokens_per_step: int
    processes: int
    device: str
    precision: str
    lr: str
    forecast: str  # `lrc.plan.report.startup_summary` ("" for a method the plan does not model)
    extra: str = ""  # the method's own note (e.g. which products run factored)


def format_startup(s: Startup) -> str:
    c = s.teacher_config
    rows = [
        ("teacher", f"{s.teacher} ({c.model_type}, hidden {c.hidden_size}, FFN {c.intermediate_size}, "
                    f"{plural(c.num_hidden_layers, 'layer')}, {s.teacher_params:,} parameters, {s.teacher_dtype})"),
        ("student", f"{s.method}, {s.student}; {s.trainable:,} trainable parameters"
                    + (f"; {s.extra}" if s.extra else "")),
    ]
    if s.init:
        rows.append(("init", s.init))
    rows += [
        ("data", s.data),
        ("budget", f"{plural(s.steps, 'step')} on {s.processes} x {s.device}, {s.tokens_per_step:,} tokens each = "
                   f"{s.steps * s.tokens_per_step:,} tokens; precision {s.precision}"),
        ("lr", s.lr),
    ]
    if s.forecast:
        rows.append(("memory", s.forecast.removeprefix("plan: ")))
    width = max(len(k) for k, _ in rows)
    return "\n".join(["start-up:"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def describe_data(train: Any, val: Any, seq_len: int) -> str:
    """'1,204 training sequences of 512 tokens; 24 held out' (a mixture names its sources, a stream says so)."""
    if hasattr(train, "__len__"):
        text = f"{plural(len(train), 'training sequence')} of {seq_len} tokens"
    else:
        text = f"streamed, sequences of {seq_len} tokens"
    if hasattr(train, "describe"):
        text += f" ({train.describe()})"
    if val is not None and hasattr(val, "__len__"):
        text += f"; {len(val):,} held out"
    return text
