"""The Low-Rank Clone model: trainable projections, and the student they generate run beside its teacher.

`LowRankClone` owns only what is trained: one (d_T x d_S) projection per weight role and layer, the
embedding projection (and, for an untied teacher, the head projection) and the student's RMSNorm gains.
The teacher is held by reference and never copied or changed. The student itself is a Hugging Face model
of the teacher's family built on the meta device (no memory); it runs through `torch.func.functional_call`
with weights from `lrc.model.weights.generate_weights`, the one generator that training and export share. So the
in-training student *is* the exported architecture, and attention masks, packed sequences, RoPE scaling,
sliding windows and the attention backend are transformers' own.

`forward` runs teacher and student on one batch and returns what the objective needs (`CloneForward`): the
student's final hidden states with the head they meet, the teacher's, and the activation-clone errors per
layer and term. It does not weigh or normalise losses (`lrc.model.losses.lrc_objective`), count steps, log,
choose devices or know about ranks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, PreTrainedModel

from lrc.distributed.fsdp import gathered, shard_projections
from lrc.errors import UserError
from lrc.model.alignment import (
    module_output,
    teacher_activations,
    teacher_layer_activations,
    term_modules,
    to_student_space,
)
from lrc.model.costs import choose_projections, role_outs
from lrc.model.families import INPUT_SIDE, ROLES, family_for
from lrc.model.losses import CLONE_TERMS, masked_mse
from lrc.model.meta import tied_head
from lrc.model.precision import for_product
from lrc.model.weights import FactoredLinear, StepWeights, generate_layer_weights, generate_weights, student_head


@dataclass
class CloneForward:
    """What one forward of teacher and student gives the objective (N = tokens of the batch)."""

    hidden: torch.Tensor
    """(N, d) student final hidden states; d = d_S, or d_T when the head is applied factored ((h P^T) H_T^T)."""
    head: torch.Tensor
    """(V, d) the head `hidden` meets: the generated student head, or the teacher's when factored."""
    teacher_hidden: torch.Tensor | None
    """(N, d_T) teacher final hidden states, when teacher logits are wanted (KL)."""
    teacher_head: torch.Tensor | None
    """(V, d_T) teacher head (the embedding when tied), when teacher logits are wanted."""
    clone_errors: dict[tuple[int, str], torch.Tensor]
    """Masked MSE of each requested clone term per layer: {(layer, term): scalar}."""


@dataclass
class ForwardState:
    """What one forward of the clone leaves for its student layers, read when each layer runs: in the forward,
    and again in the backward's recompute under gradient checkpointing. Set at each forward, dropped once the
    step's backward is done (`LowRankClone.forget_forward`)."""

    per_layer: bool = False
    """Each layer generates its own weights when it runs (`LowRankClone.generate_per_layer`)."""
    teacher_acts: dict = field(default_factory=dict)
    """The teacher's clone targets by (layer, term), in the teacher's space."""
    terms: tuple[str, ...] = ()
    """The clone terms this forward compares."""
    mapped: dict = field(default_factory=dict)
    """Sharded layers: their targets mapped into the student's space inside each layer's FSDP2 unit."""
    calls: dict | None = None
    """--recompute-targets: each kept teacher layer's recorded input, to run it again with its student layer."""


def teacher_head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def student_config(teacher: PreTrainedModel, hidden_size: int, rms_norm_eps: float | None = None,
                   ffn_size: int | None = None, kept_layers: Sequence[int] | None = None):
    """`student_config_for` the teacher's config, tied as the teacher is."""
    return student_config_for(teacher.config, tied_head(teacher), hidden_size, rms_norm_eps, ffn_size, kept_layers)


def student_config_for(teacher_config, tied: bool, hidden_size: int, rms_norm_eps: float | None = None,
                       ffn_size: int | None = None, kept_layers: Sequence[int] | None = None):
    """The student's config: the teacher's, with hidden_size = d_S, an explicit head_dim, tied only when the
    teacher's head is its embedding, and the student RMSNorm epsilon (default: the teacher's); with
    intermediate_size = ffn_size and only the teacher layers `kept_layers` (their per-layer attention types
    with them) when given.

    The one architecture every method trains (lrc exports it; kd/scratch/prune-kd train it directly)."""
    cfg = copy.deepcopy(teacher_config)
    cfg.head_dim = teacher_head_dim(teacher_config)
    cfg.hidden_size = hidden_size
    if ffn_size is not None:
        cfg.intermediate_size = ffn_size
    if kept_layers is not None:
        cfg.num_hidden_layers = len(kept_layers)
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types is not None:  # sliding or full attention per layer (Qwen2/3): each kept layer keeps its own
            cfg.layer_types = [layer_types[i] for i in kept_layers]
        if hasattr(cfg, "max_window_layers"):  # unused once layer_types is explicit; kept consistent anyway
            cfg.max_window_layers = sum(1 for i in kept_layers if i < cfg.max_window_layers)
    cfg.tie_word_embeddings = tied
    cfg.rms_norm_eps = float(rms_norm_eps if rms_norm_eps is not None else teacher_config.rms_norm_eps)
    return cfg


class LayerProjections(nn.Module):
    """Trainable parts of one student layer: seven projections and two RMSNorm gains, and with a narrower FFN
    (`ffn` = (d_ff_T, M)) the intermediate projection Q: gate/up = Q^T W_T P, down = P^T W_T Q."""

    ffn: nn.Parameter | None
    o: nn.Parameter  # set with the other roles in __init__
    down: nn.Parameter

    def __init__(self, d_t: int, d_s: int, ffn: tuple[int, int] | None = None):
        super().__init__()
        for role in ROLES:
            setattr(self, role, nn.Parameter(torch.empty(d_t, d_s)))
        self.ffn = nn.Parameter(torch.empty(*ffn)) if ffn is not None else None
        self.input_norm = nn.Parameter(torch.ones(d_s))
        self.post_attention_norm = nn.Parameter(torch.ones(d_s))

    def forward(self, hidden: torch.Tensor, generate: Callable[[], tuple[dict, dict]]):
        """Under --parallel fsdp, where this is the layer's FSDP2 unit (`lrc.distributed.fsdp.shard_projections`):
        `generate()` runs while this layer's projections are gathered and returns (its weights, its clone
        targets), none of them a parameter itself (a parameter's storage goes when the unit reshards).
        `hidden`, the layer's input, passes through, so that FSDP2's post-backward hook (reduce-scatter,
        reshard) fires once the layer's backward has reached its input, after every gradient of these weights."""
        weights, targets = generate()
        return hidden, weights, targets


# roles whose student matrix also goes through the FFN projection Q (intermediate side)
FFN_ROLES = ("gate", "up", "down")


class LowRankClone(nn.Module):
    """A student of width `hidden_size` cloned from `teacher` (any supported `*ForCausalLM`).

    `ffn_size` M (default: none, the teacher's FFN width without a projection): the student's FFN is M wide,
    through one trainable (d_ff_T x M) projection Q per layer. `kept_layers` (default: all): the teacher
    layers the student keeps, in order; student layer i is generated from, and cloned against, teacher
    layer kept_layers[i]."""

    _shell: PreTrainedModel  # set by _build_shell, in __dict__ (outside the module tree)

    def __init__(
        self,
        teacher: PreTrainedModel,
        hidden_size: int,
        *,
        rms_norm_eps: float | None = None,
        ffn_size: int | None = None,
        kept_layers: Sequence[int] | None = None,
    ):
        super().__init__()
        cfg = teacher.config
        self.family = family_for(cfg)
        d_t = cfg.hidden_size
        if not 0 < hidden_size <= d_t:
            raise UserError(
                f"--hidden-size {hidden_size} is out of range: it must be between 1 and the teacher's "
                f"hidden size {d_t}"
            )
        if ffn_size is not None and not 0 < ffn_size <= cfg.intermediate_size:
            raise UserError(f"--ffn-size {ffn_size} is out of range: it must be between 1 and the teacher's "
                            f"intermediate size {cfg.intermediate_size}")
        kept = tuple(range(cfg.num_hidden_layers)) if kept_layers is None else tuple(kept_layers)
        if not kept or list(kept) != sorted(set(kept)) or not all(0 <= i < cfg.num_hidden_layers for i in kept):
            raise UserError(f"kept layers {list(kept)} must be distinct teacher layers in order, between 0 and "
                            f"{cfg.num_hidden_layers - 1}")
        self.d_t, self.d_s = d_t, hidden_size
        self.d_ff_t, self.ffn_size = cfg.intermediate_size, ffn_size
        self.kept_layers = kept
        self.num_layers = len(kept)
        self.tied = tied_head(teacher)
        self.rms_norm_eps = float(rms_norm_eps if rms_norm_eps is not None else cfg.rms_norm_eps)
        if self.family.qk_norms and self.rms_norm_eps != cfg.rms_norm_eps:
            # The exported config has one rms_norm_eps for every norm, the teacher's frozen q/k norms included:
            # a student epsilon would change those too (and the student would no longer equal its export).
            raise UserError(
                f"--rms-norm-eps cannot differ from the teacher's ({cfg.rms_norm_eps}) for a {cfg.model_type} "
                "teacher: its frozen q/k norms share the one rms_norm_eps of the exported config; drop the option"
            )
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        # Registered so that .to(device) moves it, but never saved: see trainable_state_dict().
        self.teacher = teacher

        ffn = (cfg.intermediate_size, ffn_size) if ffn_size is not None else None
        self.layers = nn.ModuleList(LayerProjections(d_t, hidden_size, ffn) for _ in range(self.num_layers))
        self.embed = nn.Parameter(torch.empty(d_t, hidden_size))
        self.head = None if self.tied else nn.Parameter(torch.empty(d_t, hidden_size))
        self.final_norm = nn.Parameter(torch.ones(hidden_size))
        with torch.no_grad():
            for _, p in self.named_projections():
                p.normal_(0.0, 0.02)

        self.config = self.student_config()
        self.factored: frozenset[str] = frozenset()
        self.grad_checkpointing = False
        self.recompute_targets = False  # under checkpointing: clone targets computed with their layer
        self.sharded = False  # each layer's projections its own FSDP2 unit (`shard_layers`)
        self._build_shell()

    def _build_shell(self) -> None:
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(self.config)
        base = shell.get_submodule(self.family.base)
        for i in range(self.num_layers):
            layer = base.get_submodule(f"{self.family.layers}.{i}")
            for role in self.factored - {"head"}:
                block, name = self.family.linear_path(role).split(".")
                has_bias = self.teacher_weight(i, role).bias is not None
                setattr(layer.get_submodule(block), name,
                        FactoredLinear("input" if role in INPUT_SIDE else "output", has_bias))
        if self.grad_checkpointing or self.sharded:
            for i in range(self.num_layers):
                _own_weights_layer(base.get_submodule(f"{self.family.layers}.{i}"), self._layer_generator(i),
                                   self.grad_checkpointing)
        shell.train(self.training)
        # Kept out of the module tree: it lives on the meta device and only lends its forward().
        self.__dict__["_shell"] = shell

    def train(self, mode: bool = True):
        """The student shell follows `mode` (dropout, where the config has any); the frozen teacher stays in
        eval mode always, so its logits and activations (the targets) carry no dropout noise."""
        super().train(mode)
        self.teacher.eval()
        if "_shell" in self.__dict__:
            self._shell.train(mode)
        return self

    def _layer_generator(self, i: int):
        """For layer i's forward: its weight generator when this forward generates per layer
        (`generate_per_layer`), else None (asked at forward time; a recompute uses the same answer). The
        generator takes the layer's input hidden state and returns it (through the layer's FSDP2 unit when
        sharded) with the layer's weights."""

        def own(hidden: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            state = self.forward_state
            if state.calls is not None:  # this layer's clone targets: its teacher layer run again
                teacher_layer_activations(self.t_layer(i), self.family, i, state.terms, state.calls[i],
                                          state.teacher_acts)
            if not self.sharded:
                return hidden, generate_layer_weights(self, i)
            hidden, weights, targets = self.layers[i](hidden, lambda: self._generate_sharded_layer(i, state))
            state.mapped.update(targets)
            return hidden, weights

        return lambda: own if self.forward_state.per_layer else None

    @property
    def forward_state(self) -> ForwardState:
        return self.__dict__.get("_forward") or ForwardState()

    def forget_forward(self) -> None:
        """Drop what the last forward left for its layers' recomputation in backward (the teacher's recorded
        layer inputs under --recompute-targets, its clone targets, the mapped targets of sharded layers):
        called once the step's backward is done (`LRC.finish_step`) and before the next forward, so that
        they are not held through the optimizer step or beside the next micro-batch's."""
        self.__dict__["_forward"] = None

    def _generate_sharded_layer(self, i: int, state: ForwardState
                                ) -> tuple[dict[str, torch.Tensor], dict[tuple[int, str], torch.Tensor]]:
        """Inside layer i's FSDP2 unit: its weights (parameters passed as copies, see `LayerProjections.forward`)
        and the teacher's clone targets of this forward mapped into the student's space through its P."""
        weights = {k: w.clone() if w.is_leaf and w.requires_grad else w
                   for k, w in generate_layer_weights(self, i).items()}
        proj = cast(LayerProjections, self.layers[i])
        targets = {(i, t): to_student_space(t, state.teacher_acts[(i, t)], proj.o, proj.down, proj.ffn)
                   for t in state.terms}
        return weights, targets

    def generate_per_layer(self, step: StepWeights | None) -> bool:
        """Whether this forward generates each layer's weights when the layer runs instead of all layers up
        front: always when the projections are sharded (each layer's gathered only then), and with gradient
        checkpointing in training (inside the checkpointed layer, so in backward the layer is generated again
        with its activations and one layer's generated weights are alive at a time); never when `StepWeights`
        gives the weights for the step."""
        if step is not None:
            return False
        return self.sharded or (self.grad_checkpointing and torch.is_grad_enabled())

    def shard_layers(self, device: torch.device) -> tuple[int, int]:
        """Shard each layer's projections as its own FSDP2 unit (`--parallel fsdp`); from now on every forward
        generates per layer. Returns (bytes of them this rank holds, bytes whole)."""
        held, whole = shard_projections(self.layers, device)
        self.sharded = True
        self._build_shell()
        return held, whole

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each student layer in backward instead of keeping its activations."""
        if not self.grad_checkpointing:
            self.grad_checkpointing = True
            self._build_shell()

    def set_factored(self, roles) -> None:
        """Apply these roles' student matrices in factored form during training (export always generates).

        Roles: those of `ROLES` and "head" (logits as (h P_head^T) H_T^T, never forming the student head)."""
        roles = frozenset(roles)
        if roles - {*ROLES, "head"}:
            raise ValueError(f"unknown roles {sorted(roles - {*ROLES, 'head'})}")
        if self.ffn_size is not None and roles & set(FFN_ROLES):
            raise ValueError("gate, up and down are always generated when the FFN has its own projection")
        rebuild = (roles - {"head"}) != (self.factored - {"head"})
        self.factored = roles
        if rebuild:
            self._build_shell()

    def plan_projections(self, tokens_per_micro_batch: int, reuse: int = 1) -> dict[str, str]:
        """Choose generated or factored per role from the cost model (`lrc.model.costs`) and apply it."""
        cfg = self.teacher.config
        outs = role_outs(cfg.num_attention_heads, cfg.num_key_value_heads, teacher_head_dim(cfg),
                         cfg.intermediate_size, cfg.vocab_size)
        plan = choose_projections(outs, tokens_per_micro_batch, self.d_t, self.d_s, reuse)
        if self.ffn_size is not None:  # Q^T W P has no factored form here: always generated (and small)
            plan.update({r: "generated" for r in FFN_ROLES})
        self.set_factored(r for r, how in plan.items() if how == "factored")
        return plan

    # ------------------------------------------------------------------ structure
    @property
    def t_base(self) -> nn.Module:
        return self.teacher.get_submodule(self.family.base)

    @property
    def shell_base(self) -> nn.Module:
        return self._shell.get_submodule(self.family.base)

    def t_layer(self, i: int) -> nn.Module:
        """The teacher layer student layer i is generated from (and compared with)."""
        return self.t_base.get_submodule(f"{self.family.layers}.{self.kept_layers[i]}")

    def named_projections(self):
        """(name, parameter) of every projection matrix (not the norm gains), the FFN projections included."""
        for i, layer in enumerate(self.layers):
            for role in ROLES:
                yield f"layers.{i}.{role}", getattr(layer, role)
            if layer.ffn is not None:
                yield f"layers.{i}.ffn", layer.ffn
        yield "embed", self.embed
        if self.head is not None:
            yield "head", self.head

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Projections and norms only: what a checkpoint holds."""
        # Not self.state_dict(): that would also walk the (possibly sharded) teacher.
        state = {}
        for name, child in self.named_children():
            if name != "teacher":
                state.update(child.state_dict(prefix=f"{name}."))
        state.update({name: p.detach() for name, p in self.named_parameters(recurse=False)})
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state_dict()
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        wrong = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
        if missing or unexpected or wrong:
            raise UserError(
                f"checkpoint does not match this student (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"other shape {sorted(wrong)[:3]}); it was written for another teacher or student shape"
            )
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k])

    def student_config(self):
        """The exported model's config (see `student_config`)."""
        kept = None if self.num_layers == self.teacher.config.num_hidden_layers else self.kept_layers
        return student_config(self.teacher, self.d_s, self.rms_norm_eps, self.ffn_size, kept)

    # ------------------------------------------------------------------ weights
    def teacher_weight(self, i: int, role: str) -> nn.Linear:
        return cast(nn.Linear, self.t_layer(i).get_submodule(self.family.linear_path(role)))

    # ------------------------------------------------------------------ forward
    def _run_student(self, input_ids, position_ids, attention_mask, weights, hooks=None):
        rows = F.embedding(input_ids, gathered(cast(nn.Embedding, self.t_base.get_submodule(self.family.embed)).weight))
        embeds = for_product(rows, self.embed) @ self.embed
        params = dict(weights)
        params.update(dict(self.t_base.named_buffers()))  # RoPE inv_freq: the student keeps the teacher's
        # Hooks of the previous call stay registered through its backward when layers are recomputed there
        # (the recompute must see the same clone-loss ops); they go now.
        for h in self.__dict__.pop("_live_hooks", []):
            h.remove()
        handles = hooks(self.shell_base) if hooks else []
        try:
            out = functional_call(
                self.shell_base,
                params,
                args=(),
                kwargs=dict(
                    inputs_embeds=embeds,
                    position_ids=position_ids,
                    attention_mask=attention_mask,
                    use_cache=False,
                ),
                strict=False,
                tie_weights=False,
            )
        finally:
            if self.grad_checkpointing and torch.is_grad_enabled():
                self.__dict__["_live_hooks"] = handles
            else:
                for h in handles:
                    h.remove()
        return out.last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        terms: Iterable[str] = CLONE_TERMS,
        teacher_logits: bool = True,
        step: StepWeights | None = None,
    ) -> CloneForward:
        """Teacher and student on the same batch (input_ids, position_ids, attention_mask: (B, T)).

        position_ids restarting at 0 mark packed documents (attention stays inside each). `terms`: the clone
        terms to compare (no hook for the others); `teacher_logits`: return the teacher's final hidden states
        and head (for KL). `step`: weights generated once for the optimizer step and reused (`StepWeights`).
        """
        terms = tuple(terms)
        valid = attention_mask.bool() if attention_mask is not None else None
        self.forget_forward()  # the last micro-batch's recorded teacher inputs: not alive beside this one's
        per_layer = self.generate_per_layer(step)
        # With --recompute-targets the clone targets are computed with their layer, in forward and again in its
        # recomputation, from the teacher layer's recorded input: the teacher's layer inputs are kept, not every
        # layer's targets (`_layer_generator`). Each kept teacher layer then runs three times per micro-batch;
        # running the teacher layer by layer beside the student would save one of them.
        calls: dict[int, tuple] | None = {} if per_layer and self.grad_checkpointing and self.recompute_targets \
            and terms and torch.is_grad_enabled() else None
        t_hidden, t_acts = teacher_activations(self.t_base, self.family, self.kept_layers, terms, inputs=calls,
                                               input_ids=input_ids, position_ids=position_ids,
                                               attention_mask=attention_mask)
        # read by the layers, in forward and recompute
        self.__dict__["_forward"] = ForwardState(per_layer, t_acts, terms, calls=calls)
        if step is not None:
            weights = step.weights
        elif per_layer:  # each layer generates its own (`_own_weights_layer`)
            weights = self._per_layer_weights()
        else:
            weights = generate_weights(self)
        errors: dict[tuple[int, str], torch.Tensor] = {}

        def hooks(shell_base):
            handles = []
            for i in range(self.num_layers):
                layer = shell_base.get_submodule(f"{self.family.layers}.{i}")
                for term, module in term_modules(layer, self.family, terms):
                    handles.append(module.register_forward_hook(self._clone_hook(errors, t_acts, i, term, valid)))
            return handles

        hidden = self._run_student(input_ids, position_ids, attention_mask, weights, hooks).reshape(-1, self.d_s)
        factored_head = "head" in self.factored and (step is None or step.head is None)
        # (V, d_T) teacher head (the embedding when tied), gathered (and cast) once per forward
        t_head = (for_product(gathered(cast(nn.Linear, self.teacher.get_submodule(self.family.head)).weight),
                              self.embed)
                  if factored_head or teacher_logits else None)
        if factored_head:
            assert t_head is not None  # computed above whenever factored_head
            # logits = (h P^T) H_T^T: the loss sees a d_T-wide hidden state and the frozen teacher head
            # (an untied clone has its own head projection)
            hidden = hidden @ (self.embed if self.tied else cast(nn.Parameter, self.head)).t()
            head = t_head
        else:
            head = step.head if step is not None and step.head is not None else student_head(self, t_head)
        return CloneForward(
            hidden=hidden, head=head,
            teacher_hidden=t_hidden.reshape(-1, self.d_t) if teacher_logits else None,
            teacher_head=t_head if teacher_logits else None,
            clone_errors=errors,
        )

    def _per_layer_weights(self) -> dict[str, torch.Tensor]:
        """The weights a per-layer forward is given: the final norm (the layers generate theirs)."""
        return {f"{self.family.final_norm}.weight": self.final_norm}

    def _clone_hook(self, errors, t_acts, i, term, valid):
        proj = self.layers[i]

        def hook(module, args, output):
            if self.sharded:  # mapped inside the layer's FSDP2 unit, by this (re)computation of the layer
                teacher = self.forward_state.mapped[(i, term)]
            else:
                teacher = to_student_space(term, t_acts[(i, term)], proj.o, proj.down, proj.ffn)
            # Assigned, not accumulated: gradient checkpointing re-runs this hook during backward.
            errors[(i, term)] = masked_mse(module_output(output), teacher, valid)

        return hook

    # ------------------------------------------------------------------ inference helpers
    @torch.no_grad()
    def student_logits(self, input_ids, position_ids=None, attention_mask=None) -> torch.Tensor:
        """(B, T, V) logits of the in-training student (for tests and evaluation of small batches)."""
        h = self._run_student(input_ids, position_ids, attention_mask, self._inference_weights())
        return (h @ student_head(self).t()).float()

    @torch.no_grad()
    def student_final_hidden(self, input_ids, position_ids=None, attention_mask=None,
                             weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, T, d_S) final hidden states of the student, with its generated weights (or `weights`, e.g. the
        generated ones rounded to an export dtype)."""
        if weights is not None:  # every layer's given: none generates its own
            self.__dict__["_forward"] = ForwardState()
            return self._run_student(input_ids, position_ids, attention_mask, weights)
        return self._run_student(input_ids, position_ids, attention_mask, self._inference_weights())

    def _inference_weights(self) -> dict[str, torch.Tensor]:
        """Weights for a forward without clone terms: every layer's generated, or per layer when sharded."""
        self.__dict__["_forward"] = ForwardState(per_layer=self.sharded)
        return self._per_layer_weights() if self.sharded else generate_weights(self)


def _own_weights_layer(layer: nn.Module, generate: Callable[[], Callable | None], checkpointed: bool) -> None:
    """Make a shell decoder layer generate its own weights when it runs, and with `checkpointed` recompute
    itself in backward (non-reentrant activation checkpointing).

    `generate()` returns the layer's weight generator when the clone generates per layer (else None; the
    layer then runs on the tensors functional_call swapped in). Its weights are then generated inside the
    (checkpointed) function, and so again in backward, instead of being captured, so only the running layer's
    generated weights are alive. transformers' own checkpointing would re-run the layer after functional_call
    has put the meta tensors back; here the layer's tensors of this call are captured and handed to the
    recompute."""
    inner_forward = layer.forward
    state = {"inside": False}

    def forward(*args, **kwargs):
        if state["inside"]:
            return inner_forward(*args, **kwargs)
        if not args:  # the hidden state first, positional, as run() takes it
            args = (kwargs.pop("hidden_states"),)
        own_weights = generate()
        recompute = checkpointed and torch.is_grad_enabled()
        if own_weights is None and not recompute:
            return inner_forward(*args, **kwargs)
        # this call's weights, swapped in by functional_call (meta placeholders when the layer generates its own)
        tensors = dict(layer.named_parameters()) if own_weights is None else {}

        def run(params, hidden, *a):
            state["inside"] = True
            try:
                if own_weights is not None:
                    hidden, params = own_weights(hidden)
                return functional_call(layer, params, (hidden, *a), kwargs, strict=False, tie_weights=False)
            finally:
                state["inside"] = False

        if recompute:
            return checkpoint(run, tensors, *args, use_reentrant=False)
        return run(tensors, *args)

    layer.forward = forward
