"""The free-weight methods: an ordinary Hugging Face student trained weight by weight (`scratch`, `kd`,
`prune-kd`)."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from lrc.config import RunConfig
from lrc.data.batch import next_token_labels
from lrc.distributed.fsdp import gathered
from lrc.errors import UserError
from lrc.methods.base import Calibration, Method, kept_layers_of
from lrc.methods.lrc import lrc_start
from lrc.model.export import build_student_model
from lrc.model.families import family_for
from lrc.model.losses import LossOutput, LossWeights, TokenCounts, kd_lm_loss, kl_positions, token_shares
from lrc.student.baselines import pruned_student, random_student


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

    def forward(self, input_ids, labels=None, position_ids=None, attention_mask=None, loss_mask=None, *,
                step_tokens: TokenCounts | None = None, step: Any = None) -> LossOutput:
        w = self.loss_weights
        if labels is None:
            labels = next_token_labels(input_ids, position_ids, attention_mask)
        ce_den, kl_scale, _ = token_shares(step_tokens, labels, attention_mask, loss_mask)
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
            labels.reshape(-1), kl_positions(labels, attention_mask, loss_mask), ce_weight=w.ce, kl_weight=w.kl,
            temperature=w.kl_temperature, chunk_size=self.chunk_size, ce_denominator=ce_den, kl_scale=kl_scale,
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


def checkpoint_layers(student: PreTrainedModel) -> None:
    """Gradient checkpointing of the student's layers (--grad-checkpointing)."""
    # transformers 5 renamed it (the old name warns, and goes in 6); 4.x has only the old one
    enable = getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def starts_from_lrc(cfg: RunConfig) -> bool:
    """`--method kd --init pca|refit`: the student starts as LRC's does (its initial projections multiplied
    out), not from transformers' random initialisation (`--init random`). scratch always starts at random,
    prune-kd from the pruned teacher."""
    return cfg.method == "kd" and cfg.student.init in ("pca", "refit")


def build_direct(cfg: RunConfig, teacher, calibration: Calibration | None) -> tuple[Method, dict]:
    weights = replace(cfg.loss)  # a copy: the baselines switch terms off
    weights.clone = 0.0
    if cfg.method == "scratch":
        weights.kl = 0.0
    info: dict = {}
    hidden_size = cast(int, cfg.student.hidden_size)  # set: run.prepare requires it before a method is built
    layers = kept_layers_of(cfg, teacher, calibration)
    if cfg.method == "prune-kd" and calibration is not None:
        student, kept = pruned_student(teacher, hidden_size, calibration.fit(), cfg.student.ffn_size, layers)
        info = {"kept_channels": len(kept)}
    elif starts_from_lrc(cfg) and calibration is not None:
        # LRC's teacher-aware start (pca, refit) multiplied out into ordinary weights, then trained freely
        clone, info = lrc_start(cfg, teacher, calibration)
        student = build_student_model(clone).train()
        del clone
    else:
        student = random_student(teacher, hidden_size, cfg.seed, cfg.student.ffn_size, layers)
    if cfg.compute.grad_checkpointing:
        checkpoint_layers(student)
    return Direct(student, teacher=None if cfg.method == "scratch" else teacher, loss_weights=weights,
                  chunk_size=cfg.compute.chunk_size), info
