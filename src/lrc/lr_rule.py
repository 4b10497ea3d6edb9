"""`--lr auto`: the peak learning rate chosen from the student's width and the batch, by a rule fitted on
measurements (BENCHMARKS.md, "Learning rate x student width"; `benchmarks/lr_sweep.py`).

    lr = LR_AT_HALF * (2 d_S / d_T) ** WIDTH_EXPONENT * (tokens per optimizer step / REF_TOKENS) ** BATCH_EXPONENT

with d_S the student's and d_T the teacher's hidden size: the shape of every projection P (d_T x d_S).

The rule is a pure function of the config, so it is deterministic and costs nothing; the value it gives is
written into the run's config.yaml as the run's `lr`, so `--resume`, `export` and `eval` read the number,
never the rule. An explicit `--lr` wins.
"""

from __future__ import annotations

AUTO = "auto"

# Fitted on the sweep (`lr_sweep.py fit`): the best learning rate of 2 teachers x 3 widths (d_S / d_T from
# 1/4 to 1/2, hidden 48-128, 40-49 steps). Narrower students want *smaller* steps: they start close to the
# teacher after `--init refit` and a large step undoes that. Outside that range the rule extrapolates.
LR_AT_HALF = 1.5e-3
WIDTH_EXPONENT = 1.4
REF_TOKENS = 1024  # the sweep's tokens per optimizer step (batch 8 x 128)
BATCH_EXPONENT = 0.0  # at batch 16 (same tokens, half the steps) the best lr of one cell did not move


def parse_lr(value) -> float | str:
    """`auto` or a number (argparse type and YAML coercion of --lr); ValueError otherwise."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, bool):
        raise ValueError(value)
    return float(value)


def auto_lr(hidden_size: int, teacher_hidden_size: int, tokens_per_step: int) -> float:
    """The peak learning rate `--lr auto` gives a student of width `hidden_size` cloned from a teacher of width
    `teacher_hidden_size`, trained on `tokens_per_step` tokens per optimizer step (all processes and
    micro-batches)."""
    lr = LR_AT_HALF * (2 * hidden_size / teacher_hidden_size) ** WIDTH_EXPONENT
    lr *= (tokens_per_step / REF_TOKENS) ** BATCH_EXPONENT
    return float(f"{lr:.3g}")  # three digits: what the log line and config.yaml show is what runs
