"""LRC as a method: the student generated from the teacher by trainable projections (`LowRankClone`), built
with its initialisation (pca, FFN channel choice, refit)."""

from __future__ import annotations

from dataclasses import replace
from typing import cast

import torch
from transformers import PreTrainedModel

from lrc.config import RunConfig
from lrc.data.batch import next_token_labels
from lrc.distributed.fsdp import gather
from lrc.methods.base import Calibration, Method, export_dtype, kept_layers_of
from lrc.model.clone import LowRankClone
from lrc.model.export import build_student_model
from lrc.model.losses import LossOutput, LossWeights, TokenCounts, kl_positions, lrc_objective, token_shares
from lrc.model.weights import StepWeights
from lrc.student.init import init_pca, init_random
from lrc.student.refit import refit_projections
from lrc.student.select import select_ffn_channels


class LRC(Method):
    """Low-Rank Clone: the student generated from the teacher by trainable projections (`LowRankClone`).

    With its layer projections sharded (`shard_trainables`), each layer generates its weights when it runs,
    inside its own FSDP2 unit (`lrc.distributed.fsdp`): gathered there and reduce-scattered and resharded by
    FSDP2 after that layer's backward, in every micro-batch (nothing is reused over a step)."""

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

    def shard_trainables(self, device: torch.device) -> str:
        held, whole = self.clone.shard_layers(device)
        return (f"layer projections sharded (FSDP2): {held / 2**20:.4g} MiB of {whole / 2**20:.4g} MiB on each, "
                "gathered one layer at a time")

    def forward(self, input_ids, labels=None, position_ids=None, attention_mask=None, loss_mask=None, *,
                step_tokens: TokenCounts | None = None, step: StepWeights | None = None) -> LossOutput:
        w = self.loss_weights
        if labels is None:
            labels = next_token_labels(input_ids, position_ids, attention_mask)
        ce_den, kl_scale, clone_scale = token_shares(step_tokens, labels, attention_mask, loss_mask)
        fwd = self.clone(input_ids, position_ids, attention_mask, terms=w.clone_terms(), teacher_logits=w.kl != 0.0,
                         step=step)
        return lrc_objective(fwd.hidden, fwd.head, fwd.teacher_hidden, fwd.teacher_head, fwd.clone_errors,
                             labels.reshape(-1), kl_positions(labels, attention_mask, loss_mask), w,
                             ce_denominator=ce_den, kl_scale=kl_scale, clone_scale=clone_scale,
                             chunk_size=self.chunk_size, fused=self.fused_loss)

    def begin_step(self, micro_batches: int) -> StepWeights | None:
        # One micro-batch gains nothing from keeping the generated weights as separate leaves.
        if micro_batches <= 1 or not self.reuse_weights:
            return None
        if self.clone.grad_checkpointing or self.clone.sharded:
            # regenerated per micro-batch in each layer: one layer's weights alive at a time under
            # checkpointing, one layer's projections gathered under fsdp (kept for the step they would be
            # every layer's, the memory these options are there to save)
            return None
        return StepWeights(self.clone)

    def finish_step(self, step: StepWeights | None) -> None:
        if step is not None:
            step.finish()
        self.clone.forget_forward()  # every micro-batch's backward has run: nothing recomputes any more

    def prepare(self, tokens_per_micro_batch: int, reuse: int, sharded: bool) -> str:
        if sharded:  # factored roles would hold whole teacher matrices
            return ""
        if self.clone.grad_checkpointing:  # generated again per micro-batch (`begin_step`): nothing reused
            reuse = 1
        plan = self.clone.plan_projections(tokens_per_micro_batch, reuse=reuse)
        factored = [r for r, how in plan.items() if how == "factored"]
        return f"factored: {', '.join(factored)}" if factored else ""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.clone.trainable_state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.clone.load_trainable_state_dict(state)

    def student_model(self, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        if not self.clone.sharded:
            return build_student_model(self.clone, dtype)
        gather(self.clone.layers, True)
        try:
            return build_student_model(self.clone, dtype)
        finally:
            gather(self.clone.layers, False)


def lrc_start(cfg: RunConfig, teacher, calibration: Calibration | None) -> tuple[LowRankClone, dict]:
    """LRC's student before training: the clone with its projections initialised by cfg.student.init (pca and
    refit measure and fit on the calibration batches; none when restoring a checkpoint)."""
    # cfg.student.hidden_size is set: run.prepare requires it before a method is built
    clone = LowRankClone(teacher, cast(int, cfg.student.hidden_size), rms_norm_eps=cfg.student.rms_norm_eps,
                         ffn_size=cfg.student.ffn_size, kept_layers=kept_layers_of(cfg, teacher, calibration))
    info: dict = {}
    if calibration is not None:
        if cfg.student.init in ("pca", "refit"):
            info = dict(init_pca(clone, calibration.fit()))
            info.update(select_ffn_channels(clone, calibration.fit()))
            if cfg.student.init == "refit":  # after the FFN channels are chosen: it fits the student as it will train
                check = calibration.check() if calibration.check is not None else None
                info.update(refit_projections(clone, calibration.fit(), check, dtype=export_dtype(cfg, teacher)))
        else:
            init_random(clone, generator=torch.Generator().manual_seed(cfg.seed))
    return clone, info


def build_lrc(cfg: RunConfig, teacher, calibration: Calibration | None) -> tuple[Method, dict]:
    clone, info = lrc_start(cfg, teacher, calibration)
    if cfg.compute.grad_checkpointing:
        clone.enable_gradient_checkpointing()
        clone.recompute_targets = cfg.compute.recompute_targets
    return LRC(clone, replace(cfg.loss), chunk_size=cfg.compute.chunk_size), info
