"""`--method` names and how each is built: `METHODS` says what each needs (calibration batches) and whether it
runs on a sharded teacher, so no code outside this module asks which method it has."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lrc.config import RunConfig
from lrc.errors import UserError
from lrc.methods.base import Batches, Calibration, Method, as_calibration
from lrc.methods.direct import build_direct, starts_from_lrc
from lrc.methods.lrc import build_lrc
from lrc.student.shape import needs_layer_choice


@dataclass(frozen=True)
class MethodSpec:
    build: Callable[[RunConfig, Any, Calibration | None], tuple[Method, dict]]
    """(config, teacher, calibration batches or None when restoring a checkpoint) -> (method, init info)."""
    needs_calibration: Callable[[RunConfig], bool]
    """Whether a new run of this method reads calibration batches (pca init, pruning)."""
    shards_teacher: bool = False
    """Runs with the teacher sharded over processes (`--parallel fsdp`)."""
    free_weights: bool = True
    """Trains an ordinary student's weights directly (`--lr auto` takes the free-weight rule, lrc.optim.lr_rule)."""


def _choose_layers(cfg: RunConfig) -> bool:
    return needs_layer_choice(cfg)


METHODS: dict[str, MethodSpec] = {
    "lrc": MethodSpec(build_lrc, shards_teacher=True, free_weights=False,
                      needs_calibration=lambda cfg: cfg.student.init in ("pca", "refit") or _choose_layers(cfg)),
    "kd": MethodSpec(build_direct, needs_calibration=lambda cfg: starts_from_lrc(cfg) or _choose_layers(cfg)),
    "scratch": MethodSpec(build_direct, needs_calibration=_choose_layers),
    "prune-kd": MethodSpec(build_direct, needs_calibration=lambda cfg: True),
}


def lr_rule_options(cfg: RunConfig) -> dict[str, bool]:
    """Which `--lr auto` rule the method's trainables take (`lrc.optim.lr_rule.auto_lr`'s flags): LRC's
    projections, free weights, or free weights that start as LRC's student."""
    return {"free": METHODS[cfg.method].free_weights, "from_lrc_start": starts_from_lrc(cfg)}


def check_parallel(method: str, sharded: bool) -> None:
    """A sharded teacher (`--parallel fsdp` over several processes) runs only with a method that shards it."""
    if sharded and not METHODS[method].shards_teacher:
        sharding = ", ".join(name for name, spec in METHODS.items() if spec.shards_teacher)
        raise UserError(f"--parallel fsdp shards the teacher for --method {sharding} only (--method {method} trains "
                        f"a whole student on every process); add --method {sharding}, or use --parallel ddp")


def build_method(cfg: RunConfig, teacher, calibration: Calibration | Batches | None = None) -> tuple[Method, dict]:
    """The trainable object for cfg.method, initialised from `calibration` batches where it needs them."""
    return METHODS[cfg.method].build(cfg, teacher, as_calibration(calibration))
