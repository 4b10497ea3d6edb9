"""The one weight generator: every student matrix from its frozen teacher matrix and a trainable projection.

Training and export both call `generate_weights`: input-side roles (q, k, v, gate, up, the
embedding and head) are W_T @ P, output-side roles (o, down) are P^T @ W_T. A student with a narrower FFN
(`--ffn-size M`) also narrows the intermediate side of the FFN by its layer's Q (d_ff_T x M): gate/up are
Q^T (W_T P), down is (P^T W_T) Q (docs/student-shape.md). A role may instead be applied
*factored* during training (`FactoredLinear`: W_T (P^T x) without forming the matrix) when the cost model
says that is cheaper for the tokens of a micro-batch; export always generates.

The teacher matrix of a product is fetched again in backward rather than kept from forward to backward:
for a sharded teacher that avoids keeping a gathered matrix alive, for a bf16 teacher under fp32 precision
an fp32 copy of it (`lrc.model.precision`). `StepWeights` generates the student once per optimizer step and
reuses it over the step's micro-batches, sending the accumulated gradients back through the generation once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from lrc.distributed.fsdp import DTensor, gathered
from lrc.model.families import INPUT_SIDE, ROLES
from lrc.model.precision import for_product

if TYPE_CHECKING:
    from lrc.model.clone import LayerProjections, LowRankClone


class _Project(torch.autograd.Function):
    """W_T @ P (input side) or P^T @ W_T (output side) for a frozen teacher matrix W_T that is fetched again in
    backward instead of being kept: `fetch` gathers a sharded W_T and casts a bf16 one for an fp32 product, so
    neither a whole gathered matrix nor an fp32 copy of it stays alive from the forward to the backward (the
    gradient of P needs W_T). At most one such matrix is whole at a time."""

    @staticmethod
    def forward(ctx, p, fetch, input_side: bool):
        ctx.fetch, ctx.input_side = fetch, input_side
        ctx.save_for_backward(p)
        w = fetch()
        return w @ p if input_side else p.t() @ w

    @staticmethod
    def backward(ctx, grad):
        (p,) = ctx.saved_tensors
        w = ctx.fetch().to(grad.dtype)
        grad_p = w.t() @ grad if ctx.input_side else w @ grad.t()
        return grad_p.to(p.dtype), None, None


def _fetcher(w: torch.Tensor, p: torch.Tensor):
    return lambda: for_product(gathered(w), p)


def project_input(w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """W_T @ P: (out, d_T) x (d_T, d_S) -> (out, d_S); keeps the output dimension, shrinks the input."""
    if isinstance(w, DTensor) or for_product(w, p) is not w:
        return _Project.apply(p, _fetcher(w, p), True)
    return w @ p


def project_output(w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """P^T @ W_T: (d_S, d_T) x (d_T, in) -> (d_S, in); shrinks the output dimension."""
    if isinstance(w, DTensor) or for_product(w, p) is not w:
        return _Project.apply(p, _fetcher(w, p), False)
    return p.t() @ w


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


def student_embedding(clone: LowRankClone) -> torch.Tensor:
    """(V, d_S) student embedding E_T @ P_emb (training gathers only the batch's rows instead)."""
    return project_input(cast(nn.Embedding, clone.t_base.get_submodule(clone.family.embed)).weight, clone.embed)


def student_head(clone: LowRankClone, teacher_head: torch.Tensor | None = None) -> torch.Tensor:
    """(V, d_S) student LM head: H_T @ P_head (= E_T @ P_emb when tied).

    `teacher_head`: H_T already whole and in the product's dtype (the forward gathered and cast it for the KL),
    used instead of gathering and casting it again: a sharded or bf16 vocabulary-wide matrix is the largest
    teacher tensor, and a second copy of it beside the first is the step's peak."""
    p = clone.embed if clone.tied else clone.head
    assert p is not None  # an untied clone has its own head projection
    if teacher_head is not None:
        return _Project.apply(p, lambda: teacher_head, True)
    if clone.tied:
        return student_embedding(clone)
    return project_input(cast(nn.Linear, clone.teacher.get_submodule(clone.family.head)).weight, p)


def generate_weights(clone: LowRankClone, all_generated: bool = False) -> dict[str, torch.Tensor]:
    """Every student decoder weight, named as in the student's base model (`layers.0.self_attn.q_proj.weight`).

    The embedding and head are not included (training gathers embedding rows and uses `student_head`);
    `export_state_dict` adds them. Frozen teacher tensors that carry over unchanged (input-side biases,
    Qwen3 q/k norms) are included as the teacher's own tensors, not copies. Roles applied factored
    (`LowRankClone.set_factored`) get their teacher weight and projection instead, unless `all_generated`.
    """
    fam = clone.family
    out: dict[str, torch.Tensor] = {}
    for i in range(clone.num_layers):
        out.update({f"{fam.layers}.{i}.{k}": w for k, w in generate_layer_weights(clone, i, all_generated).items()})
    out[f"{fam.final_norm}.weight"] = clone.final_norm
    return out


def generate_layer_weights(clone: LowRankClone, i: int, all_generated: bool = False) -> dict[str, torch.Tensor]:
    """Student decoder layer i's weights, named inside the layer (`self_attn.q_proj.weight`): one layer's
    share of `generate_weights`. Gradient checkpointing calls it inside the checkpointed layer, so that only
    the running layer's generated weights are alive (and are generated again in backward)."""
    fam = clone.family
    proj = cast("LayerProjections", clone.layers[i])
    out: dict[str, torch.Tensor] = {}
    t_layer = clone.t_layer(i)
    q_ffn = proj.ffn  # (d_ff_T, M) or None: the FFN keeps the teacher's width
    for role in ROLES:
        lin = clone.teacher_weight(i, role)
        p = getattr(proj, role)
        path = fam.linear_path(role)
        bias = for_product(gathered(lin.bias), p) if lin.bias is not None else None
        if role in clone.factored and not all_generated:
            out[f"{path}.teacher_weight"] = gathered(lin.weight)
            out[f"{path}.proj"] = p
            if bias is not None:
                out[f"{path}.bias"] = bias
        elif role in INPUT_SIDE:
            out[f"{path}.weight"] = project_input(lin.weight, p)
            if bias is not None:
                out[f"{path}.bias"] = bias
            if q_ffn is not None and role in ("gate", "up"):  # Q^T (W_T P): narrow the intermediate side too
                out[f"{path}.weight"] = q_ffn.t() @ out[f"{path}.weight"]
                if bias is not None:
                    out[f"{path}.bias"] = bias @ q_ffn
        else:  # o, down: compress the output side
            out[f"{path}.weight"] = project_output(lin.weight, p)
            if bias is not None:
                out[f"{path}.bias"] = bias @ p
            if q_ffn is not None and role == "down":  # (P^T W_T) Q
                out[f"{path}.weight"] = out[f"{path}.weight"] @ q_ffn
    out[f"{fam.input_norm}.weight"] = proj.input_norm
    out[f"{fam.post_attention_norm}.weight"] = proj.post_attention_norm
    for norm in fam.qk_norms:
        # the family's own RMSNorm class: its gain is a tensor
        qk_norm = gathered(cast(torch.Tensor, t_layer.get_submodule(f"{fam.attn}.{norm}").weight))
        out[f"{fam.attn}.{norm}.weight"] = for_product(qk_norm, clone.final_norm)
    return out


def export_state_dict(clone: LowRankClone) -> dict[str, torch.Tensor]:
    """Full state dict of the student `*ForCausalLM`, detached."""
    fam = clone.family
    with torch.no_grad():
        sd = {f"{fam.base}.{k}": v.detach() for k, v in generate_weights(clone, all_generated=True).items()}
        sd[f"{fam.base}.{fam.embed}.weight"] = student_embedding(clone).detach()
        sd[f"{fam.head}.weight"] = sd[f"{fam.base}.{fam.embed}.weight"] if clone.tied else student_head(clone)
    return sd


class StepWeights:
    """The student generated once for a whole optimizer step (P changes only at optimizer steps).

    Pass `weights` and `head` to every micro-batch's forward; after the last micro-batch's backward call
    `finish()`, which sends the gradients accumulated on the generated tensors back through the generation
    (one W_T^T @ dL/dW per projection instead of one per micro-batch). The reused tensors are fp32 leaves
    whatever the precision, so their gradients accumulate over the micro-batches in fp32 (under autocast a
    generated weight is bf16; each product casts the leaf back exactly, since its values are bf16 ones)."""

    def __init__(self, clone: LowRankClone):
        generated = generate_weights(clone)
        head = None if "head" in clone.factored else student_head(clone)
        self.weights: dict[str, torch.Tensor] = {}
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, w in generated.items():
            # parameters (norm gains) and frozen teacher tensors pass through unchanged
            self.weights[name] = self._reuse(w) if w.requires_grad and not w.is_leaf else w
        self.head = self._reuse(head) if head is not None else None

    @property
    def generated(self) -> list[torch.Tensor]:
        """The generated tensors whose gradients `finish` sends back (not leaves)."""
        return [w for w, _ in self._pairs]

    def _reuse(self, w: torch.Tensor) -> torch.Tensor:
        leaf = w.detach().float().requires_grad_()
        self._pairs.append((w, leaf))
        return leaf

    def finish(self) -> None:
        live = [(w, leaf.grad.to(w.dtype)) for w, leaf in self._pairs if leaf.grad is not None]
        if live:
            torch.autograd.backward([w for w, _ in live], [g for _, g in live])
