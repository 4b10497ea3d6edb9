"""The ways to train a student, behind one interface: `lrc` and the baselines `kd`, `scratch`, `prune-kd`.

A `Method` is a module whose forward is the loss of one micro-batch (`LossOutput`). The trainer, `lrc bench`,
export and evaluation see only this surface:

* `forward(input_ids, labels, position_ids, attention_mask, *, ce_denominator, scale, step)`: the loss, with
  the caller's normalisers for exact accumulation (see `lrc.losses.kd_lm_loss`);
* `begin_step(micro_batches)` / `finish_step(step)`: work shared by a step's micro-batches (LRC generates the
  student once per optimizer step and sends the accumulated gradients back through the generation once);
* `prepare(tokens_per_micro_batch, reuse, sharded)`: choices that depend on the batch (LRC's generated or
  factored matrices), returning a note for the start-up line;
* `trainable_state_dict` / `load_trainable_state_dict`: what a checkpoint holds;
* `student_model(dtype)`: the student as an ordinary Hugging Face model (export, evaluation).

`METHODS` maps each `--method` name to how it is built and what it needs (calibration batches, whether it can
run on a sharded teacher), so no code outside this module asks which method it has.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from lrc.clone import LowRankClone
from lrc.config import RunConfig
from lrc.errors import UserError
from lrc.export import build_student_model
from lrc.families import family_for
from lrc.losses import LossOutput, LossWeights, kd_lm_loss, lrc_objective, next_token_labels
from lrc.sharding import gathered
from lrc.weights import StepWeights

Calibration = Callable[[], Iterable[dict]]


def _kl_mask(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is not None:
        return attention_mask.bool().reshape(-1)
    return torch.ones(labels.numel(), dtype=torch.bool, device=labels.device)


class Method(nn.Module):
    """One way to train a student (see the module docstring); subclasses implement `forward`."""

    loss_weights: LossWeights

    def begin_step(self, micro_batches: int) -> Any:
        return None

    def finish_step(self, step: Any) -> None:
        pass

    def prepare(self, tokens_per_micro_batch: int, reuse: int, sharded: bool) -> str:
        return ""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def student_model(self, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        raise NotImplementedError


class LRC(Method):
    """Low-Rank Clone: the student generated from the teacher by trainable projections (`LowRankClone`)."""

    def __init__(self, clone: LowRankClone, loss_weights: LossWeights | None = None, *, chunk_size: int = 0,
                 fused_loss: bool = True, reuse_weights: bool = True):
        super().__init__()
        self.clone = clone
        self.loss_weights = loss_weights or LossWeights()
        self.chunk_size = chunk_size
        # False: full-vocabulary logits through plain autograd, and every matrix generated per micro-batch
        # (the naive path, for benchmarks and tests)
        self.fused_loss = fused_loss
        self.reuse_weights = reuse_weights

    def forward(self, input_ids, labels=None, position_ids=None, attention_mask=None, *,
                ce_denominator: float | None = None, scale: float = 1.0,
                step: StepWeights | None = None) -> LossOutput:
        w = self.loss_weights
        if labels is None:
            labels = next_token_labels(input_ids, position_ids, attention_mask)
        fwd = self.clone(input_ids, position_ids, attention_mask, terms=w.clone_terms(), teacher_logits=w.kl != 0.0,
                         step=step)
        return lrc_objective(fwd.hidden, fwd.head, fwd.teacher_hidden, fwd.teacher_head, fwd.clone_errors,
                             labels.reshape(-1), _kl_mask(labels, attention_mask), w, ce_denominator=ce_denominator,
                             scale=scale, chunk_size=self.chunk_size, fused=self.fused_loss)

    def begin_step(self, micro_batches: int) -> StepWeights | None:
        # One micro-batch gains nothing from keeping the generated weights as separate leaves.
        return StepWeights(self.clone) if micro_batches > 1 and self.reuse_weights else None

    def finish_step(self, step: StepWeights | None) -> None:
        if step is not None:
            step.finish()

    def prepare(self, tokens_per_micro_batch: int, reuse: int, sharded: bool) -> str:
        if sharded:  # factored roles would hold whole teacher matrices
            return ""
        plan = self.clone.plan_projections(tokens_per_micro_batch, reuse=reuse)
        factored = [r for r, how in plan.items() if how == "factored"]
        return f"factored: {', '.join(factored)}" if factored else ""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.clone.trainable_state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.clone.load_trainable_state_dict(state)

    def student_model(self, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        return build_student_model(self.clone, dtype)


class Direct(Method):
    """An ordinary Hugging Face model trained weight by weight with the same chunked CE (+ KL to an optional
    frozen teacher): `scratch` (random init, CE only; also the demo's teacher trainer), `kd` (random init,
    CE + KL) and `prune-kd` (Minitron-style width pruning, then CE + KL)."""

    def __init__(self, model: PreTrainedModel, teacher: PreTrainedModel | None = None,
                 loss_weights: LossWeights | None = None, chunk_size: int = 0):
        super().__init__()
        self.model = model
        self.family = family_for(model.config)
        self.loss_weights = loss_weights or LossWeights(kl=0.0, clone=0.0)
        if teacher is None:
            self.loss_weights.kl = 0.0
        else:
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.eval()
        self.teacher = teacher
        self.chunk_size = chunk_size
        self.config = model.config

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:  # frozen: dropout stays off, also while the student trains
            self.teacher.eval()
        return self

    def forward(self, input_ids, labels=None, position_ids=None, attention_mask=None, *,
                ce_denominator: float | None = None, scale: float = 1.0, step: Any = None) -> LossOutput:
        w = self.loss_weights
        if labels is None:
            labels = next_token_labels(input_ids, position_ids, attention_mask)
        kw = dict(position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
        h = self.model.get_submodule(self.family.base)(input_ids=input_ids, **kw).last_hidden_state
        t_hidden = t_head = None
        if w.kl != 0.0 and self.teacher is not None:
            t_fam = family_for(self.teacher.config)
            with torch.no_grad():
                t_hidden = self.teacher.get_submodule(t_fam.base)(input_ids=input_ids, **kw).last_hidden_state
            t_hidden = t_hidden.reshape(-1, t_hidden.shape[-1])
            t_head = gathered(cast(nn.Linear, self.teacher.get_submodule(t_fam.head)).weight)
        # gathered: a sharded teacher evaluated as a model (its held-out loss) keeps its head in shards
        head = gathered(cast(nn.Linear, self.model.get_submodule(self.family.head)).weight)
        loss, ce, kl = kd_lm_loss(
            h.reshape(-1, h.shape[-1]), head, t_hidden, t_head,
            labels.reshape(-1), _kl_mask(labels, attention_mask), ce_weight=w.ce, kl_weight=w.kl,
            temperature=w.kl_temperature, chunk_size=self.chunk_size, ce_denominator=ce_denominator,
            kl_scale=scale,
        )
        return LossOutput(loss=loss, terms={"ce": ce, "kl": kl})

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight") or not self.config.tie_word_embeddings]
        if missing or unexpected:
            raise UserError(f"checkpoint does not match this student (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")

    def student_model(self, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        # transformers' @wraps-decorated PreTrainedModel.to is typed as if unbound (self expected first)
        model = self.model if dtype == torch.float32 else copy.deepcopy(self.model).to(dtype)  # type: ignore[arg-type]
        return model.eval()


# ------------------------------------------------------------------------------------------- registry


def _build_lrc(cfg: RunConfig, teacher, calibration: Calibration | None) -> tuple[Method, dict]:
    from lrc.init import init_pca, init_random

    # cfg.hidden_size is set: run.prepare requires it before a method is built
    clone = LowRankClone(teacher, cast(int, cfg.hidden_size), rms_norm_eps=cfg.rms_norm_eps)
    info: dict = {}
    if calibration is not None:
        if cfg.init in ("pca", "refit"):
            info = init_pca(clone, calibration())
            if cfg.init == "refit":
                from lrc.refit import refit_projections

                info |= refit_projections(clone, calibration())
        else:
            init_random(clone, generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.grad_checkpointing:
        clone.enable_gradient_checkpointing()
    return LRC(clone, cfg.loss_weights(), chunk_size=cfg.chunk_size), info


def _build_direct(cfg: RunConfig, teacher, calibration: Calibration | None) -> tuple[Method, dict]:
    from lrc.students import pruned_student, random_student

    weights = cfg.loss_weights()
    weights.clone = 0.0
    if cfg.method == "scratch":
        weights.kl = 0.0
    info: dict = {}
    hidden_size = cast(int, cfg.hidden_size)  # set: run.prepare requires it before a method is built
    if cfg.method == "prune-kd" and calibration is not None:
        student, kept = pruned_student(teacher, hidden_size, calibration())
        info = {"kept_channels": len(kept)}
    else:
        student = random_student(teacher, hidden_size, cfg.seed)
    if cfg.grad_checkpointing:
        student.gradient_checkpointing_enable({"use_reentrant": False})
    return Direct(student, teacher=None if cfg.method == "scratch" else teacher, loss_weights=weights,
                  chunk_size=cfg.chunk_size), info


@dataclass(frozen=True)
class MethodSpec:
    build: Callable[[RunConfig, Any, Calibration | None], tuple[Method, dict]]
    """(config, teacher, calibration batches or None when restoring a checkpoint) -> (method, init info)."""
    needs_calibration: Callable[[RunConfig], bool]
    """Whether a new run of this method reads calibration batches (pca init, pruning)."""
    shards_teacher: bool = False
    """Runs with the teacher sharded over processes (`--parallel fsdp`)."""


METHODS: dict[str, MethodSpec] = {
    "lrc": MethodSpec(_build_lrc, needs_calibration=lambda cfg: cfg.init in ("pca", "refit"), shards_teacher=True),
    "kd": MethodSpec(_build_direct, needs_calibration=lambda cfg: False),
    "scratch": MethodSpec(_build_direct, needs_calibration=lambda cfg: False),
    "prune-kd": MethodSpec(_build_direct, needs_calibration=lambda cfg: True),
}


def build_method(cfg: RunConfig, teacher, calibration: Calibration | None = None) -> tuple[Method, dict]:
    """The trainable object for cfg.method, initialised from `calibration` batches where it needs them."""
    return METHODS[cfg.method].build(cfg, teacher, calibration)
