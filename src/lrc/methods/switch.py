"""LRC, then free weights, in one run (`--free-after F`): LRC trains for the first F of the run's steps, then
its student is multiplied out and every weight trains freely by KD (CE + KL; with `--keep-clone-terms` also the
clone terms, compared through the projections the clone had at the switch: `lrc.model.alignment.AlignmentMaps`)
on the same learning-rate schedule, from the free weights' own peak (`--free-lr`).

The switch is a change of method at one step: what follows is `kd` started from LRC's student at that step
instead of LRC's initial one. A checkpoint written after it says so (`FREE` in its state), so a resumed run,
`lrc export` and `lrc eval` rebuild the free student, not the clone.
"""

from __future__ import annotations

from typing import cast

from lrc.config import RunConfig
from lrc.methods.base import Method, kept_layers_of
from lrc.methods.direct import Direct, checkpoint_layers, free_loss_weights
from lrc.methods.lrc import LRC
from lrc.model.alignment import AlignmentMaps
from lrc.student.baselines import random_student

FREE = "free_weights"  # checkpoint state.json: True once the run trains free weights


def switch_step(cfg: RunConfig, steps: int) -> int | None:
    """The step after which the run trains free weights (None: never)."""
    if cfg.method != "lrc" or cfg.free_after is None:
        return None
    return int(round(cfg.free_after * steps))


def _direct(student, cfg: RunConfig, teacher, alignment: AlignmentMaps | None) -> Direct:
    if cfg.compute.grad_checkpointing:
        checkpoint_layers(student)
    return Direct(student, teacher=teacher, loss_weights=free_loss_weights(cfg), chunk_size=cfg.compute.chunk_size,
                  alignment=alignment)


def to_free_weights(method: Method, cfg: RunConfig, teacher) -> Direct:
    """LRC's student as it is now, multiplied out into ordinary fp32 weights that train from here on."""
    assert isinstance(method, LRC)
    student = method.student_model().train()
    for p in student.parameters():
        p.requires_grad_(True)
    alignment = AlignmentMaps.of_clone(method.clone) if cfg.keep_clone_terms and cfg.loss.clone_terms() else None
    return _direct(student, cfg, teacher, alignment)


def free_method(cfg: RunConfig, teacher) -> Direct:
    """The free student's shape, for a checkpoint written after the switch to load into (with its maps)."""
    layers = kept_layers_of(cfg, teacher, None)
    hidden = cast(int, cfg.student.hidden_size)  # set: run.prepare requires it before a method is built
    student = random_student(teacher, hidden, cfg.seed, cfg.student.ffn_size, layers)
    return _direct(student, cfg, teacher, None)
