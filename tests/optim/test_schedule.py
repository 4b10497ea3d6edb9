"""The learning-rate schedule against transformers' own: the same curve after warm-up, and a warm-up one step
ahead (ours never spends a step at learning rate 0)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from lrc.optim.schedule import lr_factor


def _library(kind: str, warmup: int, total: int, min_ratio: float):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if kind == "cosine":
        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=min_ratio)
    elif kind == "linear":
        sched = get_linear_schedule_with_warmup(opt, warmup, total)
    else:
        sched = get_constant_schedule_with_warmup(opt, warmup)
    return sched.lr_lambdas[0]


@pytest.mark.parametrize("kind,min_ratio", [("cosine", 0.0), ("cosine", 0.1), ("linear", 0.0), ("constant", 0.0)])
@pytest.mark.parametrize("warmup,total", [(0, 50), (5, 50), (10, 13)])
def test_the_schedule_is_transformers_with_a_warm_up_one_step_ahead(kind, min_ratio, warmup, total):
    theirs = _library(kind, warmup, total, min_ratio)
    for step in range(total):
        ours = lr_factor(step, total, warmup, kind, min_ratio)
        want = theirs(step + 1) if step < warmup else theirs(step)
        assert math.isclose(ours, want, rel_tol=1e-12, abs_tol=1e-15), (step, ours, want)
    assert lr_factor(0, total, warmup, kind, min_ratio) > 0  # the first step already learns
