"""The free-weight methods: an ordinary Hugging Face student trained weight by weight (`scratch`, `kd`,
`prune-kd`), by CE, KL to the teacher and, for a student that starts from LRC's with `--keep-clone-terms`, the
activation-clone terms through the maps LRC's start defines (`lrc.model.alignment.AlignmentMaps`)."""

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
from lrc.model.alignment import AlignmentMaps, module_output, teacher_activations, term_modules
from lrc.model.export import build_student_model
from lrc.model.families import family_for
from lrc.model.losses import LossOutput, LossWeights, TokenCounts, kl_positions, lrc_objective, masked_mse, token_shares
from lrc.student.baselines import pruned_student, random_student

ALIGNMENT = "alignment."  # checkpoint keys of the clone terms' maps (`AlignmentMaps`)


class Direct(Method):
    """An ordinary Hugging Face model trained weight by weight with the same chunked CE (+ KL to an optional
    frozen teacher): `scratch` (random init, CE only; also the demo's teacher trainer), `kd` (CE + KL, from
    LRC's start or at random) and `prune-kd` (Minitron-style width pruning, then CE + KL).

    With `alignment` (the maps of the LRC clone the student was multiplied out of) and a clone weight, the
    student's activations are also compared with the teacher's, term by term as LRC compares them; without
    maps there are no clone terms."""

    def __init__(self, model: PreTrainedModel, teacher: PreTrainedModel | None = None,
                 loss_weights: LossWeights | None = None, chunk_size: int = 0,
                 alignment: AlignmentMaps | None = None):
        super().__init__()
        self.model = model
        self.family = family_for(model.config)
        self.loss_weights = loss_weights or LossWeights(kl=0.0, clone=0.0)
        self.alignment = alignment
        # whether layers re-run in backward (`checkpoint_layers`, called before this): asked once, not per step
        self.recomputes = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
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

    def _clone_terms(self) -> dict[str, float]:
        return self.loss_weights.clone_terms() if self.alignment is not None and self.teacher is not None else {}

    def forward(self, input_ids, labels=None, position_ids=None, attention_mask=None, loss_mask=None, *,
                step_tokens: TokenCounts | None = None, step: Any = None) -> LossOutput:
        w = self.loss_weights
        if labels is None:
            labels = next_token_labels(input_ids, position_ids, attention_mask)
        ce_den, kl_scale, clone_scale = token_shares(step_tokens, labels, attention_mask, loss_mask)
        kw = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask)
        terms = tuple(self._clone_terms())
        t_hidden = t_head = None
        t_acts: dict[tuple[int, str], torch.Tensor] = {}
        if (w.kl != 0.0 or terms) and self.teacher is not None:
            t_fam = family_for(self.teacher.config)
            kept = self.alignment.kept_layers.tolist() if self.alignment is not None and terms else []
            t_hidden, t_acts = teacher_activations(self.teacher.get_submodule(t_fam.base), t_fam, kept, terms, **kw)
            t_hidden = t_hidden.reshape(-1, t_hidden.shape[-1])
            t_head = gathered(cast(nn.Linear, self.teacher.get_submodule(t_fam.head)).weight)
        errors: dict[tuple[int, str], torch.Tensor] = {}
        self._drop_hooks()
        handles = self._clone_hooks(terms, t_acts, errors, attention_mask)
        try:
            h = self.model.get_submodule(self.family.base)(use_cache=False, **kw).last_hidden_state
        finally:
            if self.recomputes and torch.is_grad_enabled():
                # the layers re-run in backward must meet the same hooks (the same clone-loss ops)
                self.__dict__["_live_hooks"] = handles
            else:
                for handle in handles:
                    handle.remove()
        # gathered: a sharded teacher evaluated as a model (its held-out loss) keeps its head in shards
        head = gathered(cast(nn.Linear, self.model.get_submodule(self.family.head)).weight)
        return lrc_objective(h.reshape(-1, h.shape[-1]), head, t_hidden, t_head, errors, labels.reshape(-1),
                             kl_positions(labels, attention_mask, loss_mask), w, ce_denominator=ce_den,
                             kl_scale=kl_scale, clone_scale=clone_scale, chunk_size=self.chunk_size)

    def _clone_hooks(self, terms, t_acts, errors, attention_mask) -> list:
        if not terms:
            return []
        maps = cast(AlignmentMaps, self.alignment)
        valid = attention_mask.bool() if attention_mask is not None else None
        base = self.model.get_submodule(self.family.base)

        def hook_for(i, term):
            def hook(module, args, output):
                # assigned, not accumulated: a checkpointed layer runs it again in backward
                errors[(i, term)] = masked_mse(module_output(output), maps.target(i, term, t_acts[(i, term)]), valid)

            return hook

        return [module.register_forward_hook(hook_for(i, term))
                for i in range(len(maps.layers))
                for term, module in term_modules(base.get_submodule(f"{self.family.layers}.{i}"), self.family, terms)]

    def _drop_hooks(self) -> None:
        for handle in self.__dict__.pop("_live_hooks", []):
            handle.remove()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        state = dict(self.model.state_dict())
        if self.alignment is not None:  # not trained, but a resumed run needs the same targets
            state.update(self.alignment.state_dict(prefix=ALIGNMENT))
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        maps = {k[len(ALIGNMENT):]: v for k, v in state.items() if k.startswith(ALIGNMENT)}
        state = {k: v for k, v in state.items() if not k.startswith(ALIGNMENT)}
        # a checkpoint without maps was written by a run without clone terms: it goes on without them
        self.alignment = AlignmentMaps.from_state_dict(maps).to(self.model.device) if maps else None
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight") or not self.config.tie_word_embeddings]
        if missing or unexpected:
            raise UserError(f"checkpoint does not match this student (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")

    def student_model(self, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        self._drop_hooks()  # the clone terms' hooks of the last training forward
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


# kd from LRC's start trains on KL + FREE_CE_WEIGHT x CE unless --ce-weight is given. Measured on the budget
# curves' teachers (BENCHMARKS.md, "The CE weight of a student from LRC's start"; two seeds per cell): CE at 1 pulls
# a student that starts close to the teacher away from it on short budgets (benchmark teacher, half width, 1% of
# its tokens: +0.79% of the teacher's loss at 1, +0.32% at 0, +0.48% at 0.25), while CE at 0 loses on long ones
# (30%: +0.01% at 1, +0.42% at 0) and where the student can pass an undertrained teacher (demo teacher, 30%: -0.29%
# at 1, +0.03% at 0, -0.24% at 0.25); 0.25 is within 0.3% of the best weight in every measured cell.
FREE_CE_WEIGHT = 0.25
# and ends its schedule at FREE_MIN_LR_RATIO of the peak unless --min-lr-ratio is given: on the same cells the
# floor took the benchmark teacher's quarter width at 10% from +2.01% to +1.81% and helped or tied elsewhere
# (same section of BENCHMARKS.md)
FREE_MIN_LR_RATIO = 0.1


def method_defaults(cfg: RunConfig, explicit: set[str]) -> RunConfig:
    """`cfg` with the defaults that depend on the method: kd from LRC's start weighs CE by FREE_CE_WEIGHT and
    ends its schedule at FREE_MIN_LR_RATIO unless --ce-weight / --min-lr-ratio were given (`explicit`: the
    options the user set). config.yaml stores the values, so a resumed run keeps what it started with."""
    if not starts_from_lrc(cfg):
        return cfg
    own = {"ce_weight": FREE_CE_WEIGHT, "min_lr_ratio": FREE_MIN_LR_RATIO}
    return cfg.replace(**{k: v for k, v in own.items() if k not in explicit})


def free_loss_weights(cfg: RunConfig) -> LossWeights:
    """The terms a free-weight student trains on (a copy of cfg.loss with the others off): CE; KL unless scratch;
    the clone terms only with --keep-clone-terms for a student from LRC's start (kd with pca/refit, or LRC's own
    after --free-after), since their maps come from that start. `lrc plan` counts the same terms."""
    weights = replace(cfg.loss)
    if not (cfg.keep_clone_terms and (starts_from_lrc(cfg) or cfg.free_after is not None)):
        weights.clone = 0.0
    if cfg.method == "scratch":
        weights.kl = 0.0
    return weights


def build_direct(cfg: RunConfig, teacher, calibration: Calibration | None) -> tuple[Method, dict]:
    weights = free_loss_weights(cfg)
    info: dict = {}
    alignment = None
    hidden_size = cast(int, cfg.student.hidden_size)  # set: run.prepare requires it before a method is built
    layers = kept_layers_of(cfg, teacher, calibration)
    if cfg.method == "prune-kd" and calibration is not None:
        student, kept = pruned_student(teacher, hidden_size, calibration.fit(), cfg.student.ffn_size, layers)
        info = {"kept_channels": len(kept)}
    elif starts_from_lrc(cfg) and calibration is not None:
        # LRC's teacher-aware start (pca, refit) multiplied out into ordinary weights, then trained freely
        clone, info = lrc_start(cfg, teacher, calibration)
        student = build_student_model(clone).train()
        if weights.clone_terms():
            alignment = AlignmentMaps.of_clone(clone)
        del clone
    else:
        student = random_student(teacher, hidden_size, cfg.seed, cfg.student.ffn_size, layers)
    if cfg.compute.grad_checkpointing:
        checkpoint_layers(student)
    return Direct(student, teacher=None if cfg.method == "scratch" else teacher, loss_weights=weights,
                  chunk_size=cfg.compute.chunk_size, alignment=alignment), info
