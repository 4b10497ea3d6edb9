"""Learning-rate schedules (linear warm-up, then cosine, linear or constant) and the steps a run takes."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lrc.config import RunConfig


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def total_steps(cfg: RunConfig, world: int) -> int:
    """Optimizer steps of a run: --max-steps, or --max-tokens over the tokens of one step (all processes),
    whichever is fewer."""
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world * cfg.data.seq_len
    limits = []
    if cfg.train.max_steps is not None:
        limits.append(cfg.train.max_steps)
    if cfg.train.max_tokens is not None:
        limits.append(math.ceil(cfg.train.max_tokens / per_step))
    return max(0, min(limits))
