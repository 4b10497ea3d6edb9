"""The Low-Rank Clone student: weights generated from a frozen teacher, and the LRC losses.

`LowRankClone` owns only what is trained: one (d_T x d_S) projection per weight role and layer, the
embedding projection (and, for an untied teacher, the head projection) and the student's RMSNorm gains.
The teacher is held by reference and never copied or changed. The student itself is a Hugging Face model
of the teacher's family built on the meta device (no memory); it runs through `torch.func.functional_call`
with weights from `generate_weights`, the one function that training and export share. So the in-training
student *is* the exported architecture, and attention masks, packed sequences, RoPE scaling, sliding windows
and the attention backend are transformers' own.

The model computes losses; it does not count steps, log, choose devices or know about ranks.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers import AutoModelForCausalLM, PreTrainedModel

from lrc.errors import UserError
from lrc.families import INPUT_SIDE, ROLES, Family, family_for
from lrc.losses import IGNORE_INDEX, kd_lm_loss, masked_mse, reference_kd_lm_loss
from lrc.precision import for_product
from lrc.sharding import gathered, is_sharded, project_input, project_output

# clone term -> the teacher/student module whose output it compares (relative to a decoder layer)
CLONE_TERMS = ("q", "k", "v", "attn_out", "gate", "up", "ffn_out")


@dataclass
class LossWeights:
    """Weights of the LRC loss: L = ce * L_LM + kl * L_KL + clone * sum_terms w_term * E_term.

    A weight of 0 removes that term from the computation (no hook, no teacher logits)."""

    ce: float = 1.0
    """Next-token cross-entropy of the student."""
    kl: float = 1.0
    """Forward KL(teacher || student), averaged per valid token."""
    kl_temperature: float = 1.0
    """Softmax temperature tau of the KL term."""
    clone: float = 0.2
    """alpha: multiplies the sum of all activation-clone terms (paper: 0.2 for 1.5B, 0.5 for 1.7B/4B)."""
    q: float = 1.0
    k: float = 1.0
    v: float = 1.0
    attn_out: float = 1.0
    gate: float = 1.0
    up: float = 1.0
    ffn_out: float = 1.0

    def clone_terms(self) -> dict[str, float]:
        """The clone terms that take part, with their weights (empty when alpha is 0)."""
        if self.clone == 0.0:
            return {}
        return {t: getattr(self, t) for t in CLONE_TERMS if getattr(self, t) != 0.0}

    @classmethod
    def from_dict(cls, d: dict) -> LossWeights:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CloneOutput:
    loss: torch.Tensor
    """The weighted total (has gradient)."""
    terms: dict[str, torch.Tensor]
    """Detached scalars for logging: ce, kl, clone (unweighted sum) and clone/<term> summed over layers."""


def teacher_head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _is_tied(teacher: PreTrainedModel, family: Family) -> bool:
    head = teacher.get_submodule(family.head).weight
    embed = teacher.get_submodule(f"{family.base}.{family.embed}").weight
    if head is embed:
        return True
    return not is_sharded(head) and head.data_ptr() == embed.data_ptr()


def student_config(teacher: PreTrainedModel, hidden_size: int, rms_norm_eps: float | None = None):
    """The student's config: the teacher's, with hidden_size = d_S, an explicit head_dim, tied only when the
    teacher's head is its embedding, and the student RMSNorm epsilon (default: the teacher's).

    The one architecture every method trains (lrc exports it; kd/scratch/prune-kd train it directly)."""
    cfg = copy.deepcopy(teacher.config)
    cfg.head_dim = teacher_head_dim(teacher.config)
    cfg.hidden_size = hidden_size
    cfg.tie_word_embeddings = _is_tied(teacher, family_for(teacher.config))
    cfg.rms_norm_eps = float(rms_norm_eps if rms_norm_eps is not None else teacher.config.rms_norm_eps)
    return cfg


class FactoredLinear(nn.Module):
    """A student linear applied without forming its matrix: W_T (P^T x) on the input side, P^T (W_T x) on
    the output side. Lives in the meta-device student shell; functional_call supplies its tensors."""

    def __init__(self, side: str, bias: bool):
        super().__init__()
        self.side = side
        self.teacher_weight = nn.Parameter(torch.empty(0, device="meta"), requires_grad=False)
        self.proj = nn.Parameter(torch.empty(0, device="meta"))
        self.bias = nn.Parameter(torch.empty(0, device="meta"), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.side == "input":  # (.., d_S) -> (.., d_T) -> (.., out)
            h = F.linear(x, self.proj)
            return frozen_linear(h, self.teacher_weight, self.bias)
        # (.., in) -> (.., d_T) (+ teacher bias) -> (.., d_S)
        return F.linear(frozen_linear(x, self.teacher_weight, self.bias), self.proj.t())


class _FrozenLinear(torch.autograd.Function):
    """x W^T (+ b) for a frozen W stored in another dtype than x: W is cast for the product and cast again in
    backward instead of keeping the cast copy alive until then (W itself needs no gradient)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(w)
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad @ w.to(grad.dtype), None, None


def frozen_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear with a frozen teacher weight, computing in x's dtype where autocast does not decide."""
    if for_product(w, x) is w:
        return F.linear(x, w, b)
    return _FrozenLinear.apply(x, w, b)


class LayerProjections(nn.Module):
    """Trainable parts of one student layer: seven projections and two RMSNorm gains."""

    def __init__(self, d_t: int, d_s: int):
        super().__init__()
        for role in ROLES:
            setattr(self, role, nn.Parameter(torch.empty(d_t, d_s)))
        self.input_norm = nn.Parameter(torch.ones(d_s))
        self.post_attention_norm = nn.Parameter(torch.ones(d_s))


class LowRankClone(nn.Module):
    """A student of width `hidden_size` cloned from `teacher` (any supported `*ForCausalLM`)."""

    def __init__(
        self,
        teacher: PreTrainedModel,
        hidden_size: int,
        *,
        rms_norm_eps: float | None = None,
        loss_weights: LossWeights | None = None,
        chunk_size: int = 0,
        fused_loss: bool = True,
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
        self.d_t, self.d_s = d_t, hidden_size
        self.num_layers = cfg.num_hidden_layers
        self.tied = _is_tied(teacher, self.family)
        self.rms_norm_eps = float(rms_norm_eps if rms_norm_eps is not None else cfg.rms_norm_eps)
        if self.family.qk_norms and self.rms_norm_eps != cfg.rms_norm_eps:
            # The exported config has one rms_norm_eps for every norm, the teacher's frozen q/k norms included:
            # a student epsilon would change those too (and the student would no longer equal its export).
            raise UserError(
                f"--rms-norm-eps cannot differ from the teacher's ({cfg.rms_norm_eps}) for a {cfg.model_type} "
                "teacher: its frozen q/k norms share the one rms_norm_eps of the exported config; drop the option"
            )
        self.loss_weights = loss_weights or LossWeights()
        self.chunk_size = chunk_size
        # False: full-vocabulary logits through plain autograd (the naive path, for benchmarks and tests)
        self.fused_loss = fused_loss

        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        # Registered so that .to(device) moves it, but never saved: see trainable_state_dict().
        self.teacher = teacher

        self.layers = nn.ModuleList(LayerProjections(d_t, hidden_size) for _ in range(self.num_layers))
        self.embed = nn.Parameter(torch.empty(d_t, hidden_size))
        self.head = None if self.tied else nn.Parameter(torch.empty(d_t, hidden_size))
        self.final_norm = nn.Parameter(torch.ones(hidden_size))
        with torch.no_grad():
            for _, p in self.named_projections():
                p.normal_(0.0, 0.02)

        self.config = self.student_config()
        self.factored: frozenset[str] = frozenset()
        self.grad_checkpointing = False
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
        if self.grad_checkpointing:
            for i in range(self.num_layers):
                _checkpoint_layer(base.get_submodule(f"{self.family.layers}.{i}"))
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
        rebuild = (roles - {"head"}) != (self.factored - {"head"})
        self.factored = roles
        if rebuild:
            self._build_shell()

    def plan_projections(self, tokens_per_micro_batch: int, reuse: int = 1) -> dict[str, str]:
        """Choose generated or factored per role from the cost model (spec section 5) and apply it."""
        from lrc.costs import factored_crossover_tokens

        cfg = self.teacher.config
        head_dim = teacher_head_dim(cfg)
        outs = {"q": cfg.num_attention_heads * head_dim, "k": cfg.num_key_value_heads * head_dim,
                "v": cfg.num_key_value_heads * head_dim, "o": cfg.num_attention_heads * head_dim,
                "gate": cfg.intermediate_size, "up": cfg.intermediate_size, "down": cfg.intermediate_size,
                "head": cfg.vocab_size}
        factored = {r for r, out in outs.items()
                    if tokens_per_micro_batch < factored_crossover_tokens(out, self.d_t, self.d_s, reuse)}
        self.set_factored(factored)
        return {r: ("factored" if r in factored else "generated") for r in outs}

    # ------------------------------------------------------------------ structure
    @property
    def t_base(self) -> nn.Module:
        return self.teacher.get_submodule(self.family.base)

    @property
    def shell_base(self) -> nn.Module:
        return self._shell.get_submodule(self.family.base)

    def t_layer(self, i: int) -> nn.Module:
        return self.t_base.get_submodule(f"{self.family.layers}.{i}")

    def named_projections(self):
        """(name, parameter) of every projection matrix (not the norm gains)."""
        for i, layer in enumerate(self.layers):
            for role in ROLES:
                yield f"layers.{i}.{role}", getattr(layer, role)
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
                f"other shape {sorted(wrong)[:3]}); it was written for another teacher or hidden size"
            )
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k])

    def student_config(self):
        """The exported model's config (see `student_config`)."""
        return student_config(self.teacher, self.d_s, self.rms_norm_eps)

    # ------------------------------------------------------------------ weights
    def teacher_weight(self, i: int, role: str) -> nn.Linear:
        return self.t_layer(i).get_submodule(self.family.linear_path(role))

    def student_head(self) -> torch.Tensor:
        """(V, d_S) student LM head: H_T @ P_head (= E_T @ P_emb when tied)."""
        if self.tied:
            return self.student_embedding()
        return project_input(self.teacher.get_submodule(self.family.head).weight, self.head)

    def student_embedding(self) -> torch.Tensor:
        return project_input(self.t_base.get_submodule(self.family.embed).weight, self.embed)

    def generate_weights(self, all_generated: bool = False) -> dict[str, torch.Tensor]:
        """Every student decoder weight, named as in the student's base model (`layers.0.self_attn.q_proj.weight`).

        The embedding and head are not included (training gathers embedding rows and uses `student_head`);
        `export_state_dict` adds them. Frozen teacher tensors that carry over unchanged (input-side biases,
        Qwen3 q/k norms) are included as the teacher's own tensors, not copies. Roles applied factored
        (`set_factored`) get their teacher weight and projection instead, unless `all_generated`.
        """
        fam = self.family
        out: dict[str, torch.Tensor] = {}
        for i, proj in enumerate(self.layers):
            prefix = f"{fam.layers}.{i}"
            t_layer = self.t_layer(i)
            for role in ROLES:
                lin = self.teacher_weight(i, role)
                p = getattr(proj, role)
                path = f"{prefix}.{fam.linear_path(role)}"
                bias = for_product(gathered(lin.bias), p) if lin.bias is not None else None
                if role in self.factored and not all_generated:
                    out[f"{path}.teacher_weight"] = gathered(lin.weight)
                    out[f"{path}.proj"] = p
                    if bias is not None:
                        out[f"{path}.bias"] = bias
                elif role in INPUT_SIDE:
                    out[f"{path}.weight"] = project_input(lin.weight, p)
                    if bias is not None:
                        out[f"{path}.bias"] = bias
                else:  # o, down: compress the output side
                    out[f"{path}.weight"] = project_output(lin.weight, p)
                    if bias is not None:
                        out[f"{path}.bias"] = bias @ p
            out[f"{prefix}.{fam.input_norm}.weight"] = proj.input_norm
            out[f"{prefix}.{fam.post_attention_norm}.weight"] = proj.post_attention_norm
            for norm in fam.qk_norms:
                qk_norm = gathered(t_layer.get_submodule(f"{fam.attn}.{norm}").weight)
                out[f"{prefix}.{fam.attn}.{norm}.weight"] = for_product(qk_norm, self.final_norm)
        out[f"{fam.final_norm}.weight"] = self.final_norm
        return out

    def step_weights(self):
        """Generate the student once for a whole optimizer step (P changes only at optimizer steps).

        Returns (weights, head, finish): pass `weights` / `head` to every micro-batch's forward; after the
        last micro-batch's backward, call `finish()` to send the gradients accumulated on the generated
        tensors back through the generation (one W_T^T @ dL/dW per projection instead of one per micro-batch).
        """
        weights = self.generate_weights()
        head = None if "head" in self.factored else self.student_head()
        reused, pairs = {}, []
        for name, w in weights.items():
            if w.requires_grad and not w.is_leaf:
                leaf = _reuse_leaf(w)
                reused[name] = leaf
                pairs.append((w, leaf))
            else:  # parameters (norm gains) and frozen teacher tensors pass through unchanged
                reused[name] = w
        head_leaf = None
        if head is not None:
            head_leaf = _reuse_leaf(head)
            pairs.append((head, head_leaf))

        def finish():
            live = [(w, leaf.grad.to(w.dtype)) for w, leaf in pairs if leaf.grad is not None]
            if live:
                torch.autograd.backward([w for w, _ in live], [g for _, g in live])

        return reused, head_leaf, finish

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Full state dict of the student `*ForCausalLM`, detached."""
        fam = self.family
        with torch.no_grad():
            sd = {f"{fam.base}.{k}": v.detach() for k, v in self.generate_weights(all_generated=True).items()}
            sd[f"{fam.base}.{fam.embed}.weight"] = self.student_embedding().detach()
            sd[f"{fam.head}.weight"] = sd[f"{fam.base}.{fam.embed}.weight"] if self.tied else self.student_head()
        return sd

    # ------------------------------------------------------------------ forward
    def _run_student(self, input_ids, position_ids, attention_mask, weights, hooks=None):
        rows = F.embedding(input_ids, gathered(self.t_base.get_submodule(self.family.embed).weight))
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

    @torch.no_grad()
    def _run_teacher(self, input_ids, position_ids, attention_mask, roles: set[str]):
        acts: dict[tuple[int, str], torch.Tensor] = {}
        handles = []
        for i in range(self.num_layers):
            for term, module in self._term_modules(self.t_layer(i), roles):
                handles.append(module.register_forward_hook(_store(acts, (i, term))))
        try:
            out = self.t_base(
                input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
            )
        finally:
            for h in handles:
                h.remove()
        return out.last_hidden_state, acts

    def _term_modules(self, layer: nn.Module, terms):
        fam = self.family
        for term in terms:
            if term == "attn_out":
                yield term, layer.get_submodule(fam.attn)
            elif term == "ffn_out":
                yield term, layer.get_submodule(fam.mlp)
            else:
                yield term, layer.get_submodule(fam.linear_path(term))

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        student_weights: dict[str, torch.Tensor] | None = None,
        student_head: torch.Tensor | None = None,
        ce_denominator: float | None = None,
        scale: float = 1.0,
    ) -> CloneOutput:
        """Teacher and student on the same batch; returns the weighted LRC loss and its named terms.

        input_ids, position_ids, attention_mask, labels: (B, T). position_ids restarting at 0 mark packed
        documents (attention stays inside each); labels default to the next token within the same document.
        student_weights / student_head: pass pre-generated weights to reuse them across micro-batches.
        ce_denominator / scale: normalisers for exact accumulation over micro-batches and ranks (see
        `kd_lm_loss`); the clone terms are multiplied by `scale`. The logged terms stay local means.
        """
        w = self.loss_weights
        if labels is None:
            labels = next_token_labels(input_ids, position_ids, attention_mask)
        valid = attention_mask.bool() if attention_mask is not None else None
        terms = w.clone_terms()

        t_hidden, t_acts = self._run_teacher(input_ids, position_ids, attention_mask, set(terms))
        weights = student_weights if student_weights is not None else self.generate_weights()
        losses: dict[tuple[int, str], torch.Tensor] = {}

        def hooks(shell_base):
            handles = []
            for i in range(self.num_layers):
                layer = shell_base.get_submodule(f"{self.family.layers}.{i}")
                for term, module in self._term_modules(layer, terms):
                    handles.append(module.register_forward_hook(self._clone_hook(losses, t_acts, i, term, valid)))
            return handles

        s_hidden = self._run_student(input_ids, position_ids, attention_mask, weights, hooks).reshape(-1, self.d_s)
        factored_head = student_head is None and "head" in self.factored
        # (V, d_T) teacher head (the embedding when tied), gathered once when sharded
        teacher_head = (for_product(gathered(self.teacher.get_submodule(self.family.head).weight), self.embed)
                        if factored_head or w.kl != 0.0 else None)
        if factored_head:
            # logits = (h P^T) H_T^T: the loss sees a d_T-wide hidden state and the frozen teacher head
            s_hidden = s_hidden @ (self.embed if self.tied else self.head).t()
            head = teacher_head
        else:
            head = student_head if student_head is not None else self.student_head()
        t_head = teacher_head if w.kl != 0.0 else None
        kl_mask = valid.reshape(-1) if valid is not None else torch.ones_like(labels.reshape(-1), dtype=torch.bool)
        loss_fn = kd_lm_loss if self.fused_loss else reference_kd_lm_loss
        lm, ce, kl = loss_fn(
            s_hidden,
            head,
            t_hidden.reshape(-1, self.d_t) if w.kl != 0.0 else None,
            t_head,
            labels.reshape(-1),
            kl_mask,
            ce_weight=w.ce,
            kl_weight=w.kl,
            temperature=w.kl_temperature,
            chunk_size=self.chunk_size,
            ce_denominator=ce_denominator,
            kl_scale=scale,
        )
        out_terms = {"ce": ce, "kl": kl}
        total = lm
        if terms:
            clone = sum(terms[t] * v for (_, t), v in losses.items())
            total = total + (w.clone * scale) * clone
            out_terms["clone"] = clone.detach()
            for t in terms:
                out_terms[f"clone/{t}"] = sum(v.detach() for (_, tt), v in losses.items() if tt == t)
        return CloneOutput(loss=total, terms=out_terms)

    def _clone_hook(self, losses, t_acts, i, term, valid):
        proj = self.layers[i]

        def hook(module, args, output):
            student = output[0] if isinstance(output, tuple) else output
            teacher = t_acts[(i, term)]
            if term == "attn_out":
                teacher = for_product(teacher, proj.o) @ proj.o  # compare in student space through P_o
            elif term == "ffn_out":
                teacher = for_product(teacher, proj.down) @ proj.down
            # Assigned, not accumulated: gradient checkpointing re-runs this hook during backward.
            losses[(i, term)] = masked_mse(student, teacher, valid)

        return hook

    # ------------------------------------------------------------------ inference helpers
    @torch.no_grad()
    def student_logits(self, input_ids, position_ids=None, attention_mask=None) -> torch.Tensor:
        """(B, T, V) logits of the in-training student (for tests and evaluation of small batches)."""
        h = self._run_student(input_ids, position_ids, attention_mask, self.generate_weights())
        return (h @ self.student_head().t()).float()

    @torch.no_grad()
    def student_final_hidden(self, input_ids, position_ids=None, attention_mask=None) -> torch.Tensor:
        return self._run_student(input_ids, position_ids, attention_mask, self.generate_weights())


def _checkpoint_layer(layer: nn.Module) -> None:
    """Make a shell decoder layer recompute itself in backward (non-reentrant activation checkpointing).

    transformers' own checkpointing would re-run the layer after functional_call has put the meta
    tensors back; here the layer's tensors of this call are captured and handed to the recompute."""
    from torch.utils.checkpoint import checkpoint

    inner_forward = layer.forward
    state = {"inside": False}

    def forward(*args, **kwargs):
        if state["inside"] or not torch.is_grad_enabled():
            return inner_forward(*args, **kwargs)
        tensors = dict(layer.named_parameters())  # this call's weights, swapped in by functional_call

        def run(params, *a):
            state["inside"] = True
            try:
                return functional_call(layer, params, a, kwargs, strict=False, tie_weights=False)
            finally:
                state["inside"] = False

        return checkpoint(run, tensors, *args, use_reentrant=False)

    layer.forward = forward


def _reuse_leaf(w: torch.Tensor) -> torch.Tensor:
    """A generated weight as the leaf that a step's micro-batches share: fp32 always, so that its gradient
    accumulates over the micro-batches in fp32 (under autocast the generated weight is bf16; each micro-batch's
    product casts the leaf back, exactly, since its values are bf16 ones)."""
    return w.detach().float().requires_grad_()


def _store(acts, key):
    def hook(module, args, output):
        acts[key] = output[0] if isinstance(output, tuple) else output

    return hook


def next_token_labels(input_ids, position_ids=None, attention_mask=None) -> torch.Tensor:
    """Labels for next-token prediction: the next id, or -100 across documents, into padding and at the end.

    A position's target belongs to the same document when the next position id is not 0 (packed sequences
    restart their position ids at each document)."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    if position_ids is not None:
        labels[:, :-1][position_ids[:, 1:] == 0] = IGNORE_INDEX
    if attention_mask is not None:
        labels[:, :-1][attention_mask[:, 1:] == 0] = IGNORE_INDEX
        labels[attention_mask == 0] = IGNORE_INDEX
    return labels
