"""`--lr auto`: the peak learning rate chosen from the teacher's width and the student's share of it, by a
rule fitted on measurements and checked against the paper's published peaks (BENCHMARKS.md, "Learning rate x
student width"; `benchmarks/lr_sweep.py`).

    lr = LR_AT_REF * (REF_WIDTH / d_T) * min(1, 2 d_S / d_T) ** WIDTH_EXPONENT

with d_T the teacher's and d_S the student's hidden size, the shape of every projection P (d_T x d_S).

Why 1 / d_T: Adam moves every entry of P by about the learning rate, whatever its size, and each student
weight W_T P sums d_T of those moves, so the change one step makes to the student's function grows with d_T
(the argument of muP for Adam on hidden matrices). A rule fitted on teachers of width 256-512 alone (the
previous one, `1.5e-3 * (2 d_S / d_T) ** 1.4`) gave 15-28x the paper's peaks at d_T = 2-3.5K, and at
d_T = 1024 one Adam step at its value already doubled the KL.

Why the share term: at a fixed teacher, narrower students want smaller steps (measured from a quarter to a
half of d_T: they start close to the teacher after `--init refit` and a large step undoes that). Above half
width nothing was measured, so the term stops at 1 rather than extrapolate upwards.

At the paper's shapes the rule gives 8.3e-5 (Llama-3.2-3B -> 1536; paper 1e-4), 1.25e-4 (Qwen2.5-3B -> 1200;
paper 6.7e-5, lowered from 1e-4 after loss spikes) and 7.1e-5 (Qwen2.5-7B -> 2048; paper 1e-4): within 2x of
each. The batch term is 0: at batch 16 (same tokens, half the steps) the best lr of one cell did not move.

The rule is a pure function of the config, so it is deterministic and costs nothing; the value it gives is
written into the run's config.yaml as the run's `lr`, so `--resume`, `export` and `eval` read the number,
never the rule. An explicit `--lr` wins. A learning rate that is still too high is caught by the trainer's
`--stop-on-rise` within the first steps.

Free weights (`kd`, `prune-kd`, `scratch`, and LRC's student after `--free-after`) follow their own rule:

    lr = FREE_LR_AT_REF * FREE_REF_WIDTH / d_S                                   (prune-kd, scratch)
    lr = FREE_LR_AT_REF * FREE_REF_WIDTH / d_S * (4 s) ** -FREE_SHARE_EXPONENT    (from LRC's start)

with s = d_S / d_T held within [1/4, 1/2], the range measured.

Why 1 / d_S: an ordinary student's hidden matrices take d_S inputs (muP for Adam: the step that changes the
function by a fixed amount scales as 1 / fan-in); the teacher's width no longer enters (nothing is multiplied
by a teacher matrix). Fitted on the benchmark teacher (`lrc.train.teacher.STRONG`, d_T 256) at 10% of its
tokens, kd from LRC's start: at d_S 64 the held-out loss falls from +5.8% of the teacher's at LRC's rule
(3.8e-4) to +3.2% at 1.6e-3 and +2.3% at 3.2e-3, then rises (+2.8% at 6.4e-3); at d_S 128 it is flat from
5e-4 to 2e-3 (+0.41%, +0.37%, +0.39%). At real sizes it gives 1.0e-4 at d_S 2048 and 6.7e-5 at 3072 (the
Minitron recipe, a width-pruned 8B -> 4B with hidden 3072 distilled by KD, used 1e-4). LRC's projection rule
would give a free student 4-10x too small a step at a quarter of the teacher's width (BENCHMARKS.md, "Learning
rate of free weights").

Why the share term, for students from LRC's start only: such a student starts close to the teacher (+0.9% of
its loss at half width on that teacher, +20% at a quarter), and a large step first undoes what the start gives.
At half width 1/d_S alone (1.6e-3) ended at +1.5% / +1.3% of the teacher's loss at 1% / 3% of the teacher's
tokens (two seeds each), worse than the start itself, and 5e-4 at +0.8% / +0.6%; at a quarter the start is
far and 3.2e-3 is best at every budget. The fitted exponent makes half width 5e-4 (d_T 256). At real sizes:
3.1e-5 for Llama-3.1-8B -> 2048 (a fine-tuning-sized step: the student starts near the teacher), 2.0e-4 at a
quarter (-> 1024). A pruned or random start is far at every width, so prune-kd and scratch keep 1/d_S alone.

The width share is only a proxy for how close the start is, and a poor one across teachers: a quarter-width
student of the undertrained demo teacher starts at KL 0.011 (+0.3% of its loss) where the benchmark teacher's
starts at 0.83 (+17%), and 3.2e-3 left it at +2.5% / +1.7% / +0.8% at 1% / 3% / 10% of the teacher's tokens
against +0.2% / +0.2% / +0.1% at 5e-4 (two seeds). So when the start was measured (`--init refit`, the default,
measures its KL on held-out calibration tokens), `free_lr_from_start` sets the lr from that KL instead:
sqrt(KL / 0.83) of the quarter width's step, at least 0.15 of it. The square root is the fit between the
benchmark teacher's two starts (KL 0.084 -> 5e-4 at d_S 128, 0.83 -> 3.2e-3 at d_S 64, with 1/d_S); the floor
is the demo teacher's quarter width (5e-4 measured good at d_S 64). The share rule above is the fallback where
no KL was measured (`--init pca`, a skipped refit) and what `lrc plan` shows before anything is measured.
"""

from __future__ import annotations

AUTO = "auto"

LR_AT_REF = 1e-3  # a half-width student of a teacher REF_WIDTH wide
REF_WIDTH = 256
WIDTH_EXPONENT = 1.4  # of the student's share of the teacher's width, below half
REF_TOKENS = 1024  # the sweep's tokens per optimizer step (batch 8 x 128)
BATCH_EXPONENT = 0.0

FREE_LR_AT_REF = 3.2e-3  # a free student FREE_REF_WIDTH wide
FREE_REF_WIDTH = 64
# from LRC's start: the lr falls with the student's share of the teacher's width, measured from a quarter (the
# reference) to a half (6.4x smaller in all, 2x of it from 1 / d_S); held at the ends outside that range
FREE_SHARE_RANGE = (0.25, 0.5)
FREE_SHARE_EXPONENT = 1.68
# from a measured start (free_lr_from_start): the start's KL at which FREE_LR_AT_REF holds (the benchmark
# teacher's quarter-width start), and the smallest share of it given (where the demo teacher's start was measured)
FREE_KL_AT_REF = 0.83
FREE_KL_FLOOR = 0.15


def free_lr_from_start(hidden_size: int, start_kl: float, tokens_per_step: int) -> float:
    """`--lr auto` for a free student that starts as LRC's when its start was measured: `start_kl`, its KL to the
    teacher per token on the held-out calibration tokens (`lrc.student.refit`), sets how far it may step.

        lr = FREE_LR_AT_REF * FREE_REF_WIDTH / d_S * clamp(sqrt(start_kl / FREE_KL_AT_REF), FREE_KL_FLOOR, 1)"""
    closeness = min(1.0, max(FREE_KL_FLOOR, (max(start_kl, 0.0) / FREE_KL_AT_REF) ** 0.5))
    lr = FREE_LR_AT_REF * FREE_REF_WIDTH / hidden_size * closeness
    lr *= (tokens_per_step / REF_TOKENS) ** BATCH_EXPONENT
    return float(f"{lr:.3g}")


def parse_lr(value) -> float | str:
    """`auto` or a number (argparse type and YAML coercion of --lr); ValueError otherwise."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, bool):
        raise ValueError(value)
    return float(value)


def auto_lr(hidden_size: int, teacher_hidden_size: int, tokens_per_step: int, free: bool = False,
            from_lrc_start: bool = False) -> float:
    """The peak learning rate `--lr auto` gives a student of width `hidden_size` cloned from a teacher of width
    `teacher_hidden_size` (`free`: a student whose weights train directly; `from_lrc_start`: one that starts as
    LRC's student, so the share term applies), trained on `tokens_per_step` tokens per optimizer step (all
    processes and micro-batches)."""
    if free:
        lr = FREE_LR_AT_REF * FREE_REF_WIDTH / hidden_size
        if from_lrc_start:
            share = min(max(hidden_size / teacher_hidden_size, FREE_SHARE_RANGE[0]), FREE_SHARE_RANGE[1])
            lr *= (share / FREE_SHARE_RANGE[0]) ** -FREE_SHARE_EXPONENT
    else:
        share = min(1.0, 2 * hidden_size / teacher_hidden_size)
        lr = LR_AT_REF * (REF_WIDTH / teacher_hidden_size) * share ** WIDTH_EXPONENT
    lr *= (tokens_per_step / REF_TOKENS) ** BATCH_EXPONENT
    return float(f"{lr:.3g}")  # three digits: what the log line and config.yaml show is what runs
