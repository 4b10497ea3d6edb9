"""The ways to train a student, behind one interface: `lrc` and the baselines `kd`, `scratch`, `prune-kd`.

A `Method` is a module whose forward is the loss of one micro-batch (`LossOutput`). The trainer, `lrc bench`,
export and evaluation see only this surface:

* `forward(input_ids, labels, position_ids, attention_mask, loss_mask, *, step_tokens, step)`: the loss, with
  the token counts of the whole optimizer step for exact accumulation (`lrc.losses.TokenCounts`);
* `begin_step(micro_batches)` / `finish_step(step)`: work shared by a step's micro-batches (LRC generates the
  student once per optimizer step and sends the accumulated gradients back through the generation once);
* `prepare(tokens_per_micro_batch, reuse, sharded)`: choices that depend on the batch (LRC's generated or
  factored matrices), returning a note for the start-up line;
* `shard_trainables(device)`: under `--parallel fsdp`, shard what is trained over the processes (LRC: its
  layer projections, with FSDP2), returning a note for the start-up line;
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
from lrc.losses import (
    LossOutput,
    LossWeights,
    TokenCounts,
    kd_lm_loss,
    kl_positions,
    lrc_objective,
    next_token_labels,
    token_shares,
)
from lrc.refit import refit_projections
from lrc.sharding import Projections, gather, gathered, shard_projections
from lrc.weights import StepWeights, generate_weights

Batches = Callable[[], Iterable[dict]]


@dataclass
class Calibration:
    """Calibration batches, drawn with the run's seed from across the training data (every mixture source in
    its share) and never from the held-out split: `fit` for what is measured or fitted (pca, FFN channels,
    layers, pruning, refit), `check` (disjoint from `fit`) for judging a fit on tokens it did not see."""

    fit: Batches
    check: Batches | None = None


def _as_calibration(calibration: Calibration | Batches | None) -> Calibration | None:
    """A bare callable (tests, benchmarks) is fit batches with no check."""
    return calibration if calibration is None or isinstance(calibration, Calibration) else Calibration(calibration)


def export_dtype(cfg: RunConfig, teacher) -> torch.dtype:
    """The lowest precision the student will compute in: its export dtype (by default the teacher's storage
    dtype) or bf16 where training autocasts to it."""
    from lrc.precision import resolve_precision

    stored = next(teacher.parameters()).dtype
    device = next(teacher.parameters()).device
    if stored == torch.float32 and resolve_precision(cfg.precision, device) == "bf16":
        return torch.bfloat16
    return stored


class Method(nn.Module):
    """One way to train a student (see the module docstring); subclasses implement `forward`."""

    loss_weights: LossWeights

    def begin_step(self, micro_batches: int) -> Any:
        return None

    def finish_step(self, step: Any) -> None:
        pass

    def prepare(self, tokens_per_micro_batch: int, reuse: int, sharded: bool) -> str:
        return ""

    def shard_trainables(self, device: torch.device) -> str:
        return ""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def student_model(self, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        raise NotImplementedError


class _Generated:
    """Weights generated for one micro-batch, in the shape of `StepWeights` (the head generated in forward)."""

    head = None

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.weights = weights


class LRC(Method):
    """Low-Rank Clone: the student generated from the teacher by trainable projections (`LowRankClone`).

    With its layer projections sharded (`shard_trainables`), every generation runs inside the FSDP2 unit's
    forward (`lrc.sharding.Projections`): gathered there, kept gathered for the step, and reduce-scattered and
    resharded by FSDP2 after the backward through the generated weights (`finish_step`, or the micro-batch's
    backward when nothing is reused)."""

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
        self.__dict__["_projections"] = None  # the FSDP2 unit, outside the module tree (its modules are ours)

    @property
    def projections(self) -> Projections | None:
        return self.__dict__["_projections"]

    def shard_trainables(self, device: torch.device) -> str:
        unit, held, whole = shard_projections(self.clone.layers, device)
        self.__dict__["_projections"] = unit
        return f"layer projections sharded (FSDP2): {held / 2**20:.4g} MiB of {whole / 2**20:.4g} MiB on each"

    def _generate(self) -> _Generated | None:
        """The clone's weights for one micro-batch, generated inside the FSDP2 unit when it is sharded."""
        unit = self.projections
        if unit is None:
            return None

        def generate():
            weights = generate_weights(self.clone)
            return _Generated(weights), [w for w in weights.values() if w.requires_grad and not w.is_leaf]

        return unit(generate)[0]

    def forward(self, input_ids, labels=None, position_ids=None, attention_mask=None, loss_mask=None, *,
                step_tokens: TokenCounts | None = None, step: StepWeights | None = None) -> LossOutput:
        w = self.loss_weights
        if labels is None:
            labels = next_token_labels(input_ids, position_ids, attention_mask)
        ce_den, kl_scale, clone_scale = token_shares(step_tokens, labels, attention_mask, loss_mask)
        weights = step if step is not None else self._generate()
        fwd = self.clone(input_ids, position_ids, attention_mask, terms=w.clone_terms(), teacher_logits=w.kl != 0.0,
                         step=cast(StepWeights, weights))
        if self.projections is not None and not torch.is_grad_enabled():
            gather(self.projections, False)  # evaluation: no backward will reshard it
        return lrc_objective(fwd.hidden, fwd.head, fwd.teacher_hidden, fwd.teacher_head, fwd.clone_errors,
                             labels.reshape(-1), kl_positions(labels, attention_mask, loss_mask), w,
                             ce_denominator=ce_den, kl_scale=kl_scale, clone_scale=clone_scale,
                             chunk_size=self.chunk_size, fused=self.fused_loss)

    def begin_step(self, micro_batches: int) -> StepWeights | None:
        # One micro-batch gains nothing from keeping the generated weights as separate leaves.
        if micro_batches <= 1 or not self.reuse_weights:
            return None
        if self.clone.grad_checkpointing and self.projections is None:
            # regenerated per micro-batch inside each checkpointed layer: one layer's weights alive at a time
            # (kept for the step they would be every layer's, the memory checkpointing is there to save)
            return None
        if self.projections is None:
            return StepWeights(self.clone)

        def generate():
            step = StepWeights(self.clone)
            return step, step.generated

        return self.projections(generate)[0]

    def finish_step(self, step: StepWeights | None) -> None:
        if step is not None:
            step.finish()

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
        unit = self.projections
        if unit is None:
            return build_student_model(self.clone, dtype)
        gather(unit, True)
        try:
            return build_student_model(self.clone, dtype)
        finally:
            gather(unit, False)


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


# ------------------------------------------------------------------------------------------- registry


def _kept_layers(cfg: RunConfig, teacher, calibration: Calibration | None) -> tuple[int, ...] | None:
    """The teacher layers the student keeps (None: all). `--layers K` alone measures them on the calibration
    batches and records them in cfg.drop_layers: the run's config.yaml is written after the method is built,
    so export and --resume rebuild this very student without calibration."""
    from lrc.sizing import kept_layers, needs_layer_choice

    n = teacher.config.num_hidden_layers
    if needs_layer_choice(cfg):
        if calibration is None:
            raise UserError("--layers needs calibration data to choose the layers; give --drop-layers instead")
        from lrc.structure import choose_layers

        kept = choose_layers(teacher, calibration.fit(), cast(int, cfg.layers))
        cfg.drop_layers = ",".join(str(i) for i in range(n) if i not in kept)
    return kept_layers(cfg, n)


def _build_lrc(cfg: RunConfig, teacher, calibration: Calibration | None) -> tuple[Method, dict]:
    from lrc.init import init_pca, init_random
    from lrc.structure import select_ffn_channels

    # cfg.hidden_size is set: run.prepare requires it before a method is built
    clone = LowRankClone(teacher, cast(int, cfg.hidden_size), rms_norm_eps=cfg.rms_norm_eps,
                         ffn_size=cfg.ffn_size, kept_layers=_kept_layers(cfg, teacher, calibration))
    info: dict = {}
    if calibration is not None:
        if cfg.init in ("pca", "refit"):
            info = dict(init_pca(clone, calibration.fit()))
            info.update(select_ffn_channels(clone, calibration.fit()))
            if cfg.init == "refit":  # after the FFN channels are chosen: it fits the student as it will train
                check = calibration.check() if calibration.check is not None else None
                info.update(refit_projections(clone, calibration.fit(), check, dtype=export_dtype(cfg, teacher)))
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
    layers = _kept_layers(cfg, teacher, calibration)
    if cfg.method == "prune-kd" and calibration is not None:
        student, kept = pruned_student(teacher, hidden_size, calibration.fit(), cfg.ffn_size, layers)
        info = {"kept_channels": len(kept)}
    else:
        student = random_student(teacher, hidden_size, cfg.seed, cfg.ffn_size, layers)
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


def _choose_layers(cfg: RunConfig) -> bool:
    from lrc.sizing import needs_layer_choice

    return needs_layer_choice(cfg)


METHODS: dict[str, MethodSpec] = {
    "lrc": MethodSpec(_build_lrc, needs_calibration=lambda cfg: cfg.init in ("pca", "refit") or _choose_layers(cfg),
                      shards_teacher=True),
    "kd": MethodSpec(_build_direct, needs_calibration=_choose_layers),
    "scratch": MethodSpec(_build_direct, needs_calibration=_choose_layers),
    "prune-kd": MethodSpec(_build_direct, needs_calibration=lambda cfg: True),
}


def build_method(cfg: RunConfig, teacher, calibration: Calibration | Batches | None = None) -> tuple[Method, dict]:
    """The trainable object for cfg.method, initialised from `calibration` batches where it needs them."""
    return METHODS[cfg.method].build(cfg, teacher, _as_calibration(calibration))
