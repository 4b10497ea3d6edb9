"""Initialising the projections: `random` (the official code's N(0, 0.02)), `pca` (teacher-aware) and `identity`.

`pca`: take the top-d_S principal directions U (d_T x d_S, orthonormal) of the teacher's
residual stream on calibration batches, and set P_emb = P_o = P_down = U and P_q/k/v = diag(g_in) U s,
P_gate/up = diag(g_post) U s with s = sqrt(d_T / d_S), folding the teacher's RMSNorm gains into the
projections (the student gains start at 1). The student at step 0 is then the teacher seen through its
d_S most energetic directions, close to a SliceGPT-compressed teacher, instead of noise. The scale s
corrects the RMS of a d_S-wide vector: a residual vector x_T ~ U x_S has rms(x_S) = rms(x_T) * s.

`identity` (d_S = d_T only) sets every projection to I and copies the teacher's gains: the student is then
the teacher exactly, which is how the weight generation is tested.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch

from lrc.data.batch import Batch
from lrc.distributed.fsdp import gathered
from lrc.model.clone import LayerProjections, LowRankClone
from lrc.model.families import ROLES

INIT_METHODS = ("pca", "random", "identity")


@torch.no_grad()
def init_random(clone: LowRankClone, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    for _, p in clone.named_projections():
        p.copy_(torch.randn(p.shape, generator=generator) * std)
    for layer in cast(Iterable[LayerProjections], clone.layers):
        layer.input_norm.fill_(1.0)
        layer.post_attention_norm.fill_(1.0)
    clone.final_norm.fill_(1.0)


def _teacher_gains(clone: LowRankClone, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    fam = clone.family
    layer = clone.t_layer(i)
    # the family's own RMSNorm class: its gains are tensors
    g_in = gathered(cast(torch.Tensor, layer.get_submodule(fam.input_norm).weight)).detach().float()
    g_post = gathered(cast(torch.Tensor, layer.get_submodule(fam.post_attention_norm).weight)).detach().float()
    return g_in, g_post


def _final_gain(clone: LowRankClone) -> torch.Tensor:
    return gathered(cast(torch.Tensor, clone.t_base.get_submodule(clone.family.final_norm).weight)).detach().float()


@torch.no_grad()
def init_identity(clone: LowRankClone) -> None:
    if clone.d_s != clone.d_t or clone.ffn_size not in (None, clone.d_ff_t):
        raise ValueError("identity init needs hidden_size (and ffn_size) equal to the teacher's")
    for _, p in clone.named_projections():
        p.copy_(torch.eye(*p.shape))  # d_T x d_T, or d_ff_T x d_ff_T for an FFN projection
    for i, layer in enumerate(cast(Iterable[LayerProjections], clone.layers)):
        g_in, g_post = _teacher_gains(clone, i)
        layer.input_norm.copy_(g_in)
        layer.post_attention_norm.copy_(g_post)
    clone.final_norm.copy_(_final_gain(clone))


@torch.no_grad()
def residual_second_moment(clone: LowRankClone, batches: Iterable[Batch]) -> torch.Tensor:
    """sum over tokens and layer boundaries of x x^T for the teacher's residual stream (d_T x d_T, fp64).

    The residual stream is read at the input of every decoder layer and at the input of the final norm."""
    fam = clone.family
    acc = torch.zeros(clone.d_t, clone.d_t, dtype=torch.float64)
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def pre_hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x = x.detach().double().reshape(-1, x.shape[-1])
        if state["mask"] is not None:
            x = x[state["mask"].reshape(-1)]
        acc.add_((x.t() @ x).cpu())

    modules = [clone.t_layer(i) for i in range(clone.num_layers)]
    modules.append(clone.t_base.get_submodule(fam.final_norm))
    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in modules]
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            state["mask"] = mask.bool() if mask is not None else None
            clone.t_base(
                input_ids=batch["input_ids"],
                position_ids=batch.get("position_ids"),
                attention_mask=mask,
                use_cache=False,
            )
    finally:
        for h in handles:
            h.remove()
    return acc


@torch.no_grad()
def init_pca(clone: LowRankClone, batches: Iterable[Batch]) -> dict[str, float]:
    """Teacher-aware init from calibration batches (dicts with input_ids[, position_ids, attention_mask]).

    Returns {"energy_kept": share of the residual-stream energy in the d_S kept directions}."""
    cov = residual_second_moment(clone, batches)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(evals, descending=True)[: clone.d_s]
    u = evecs[:, order].float()  # (d_T, d_S), orthonormal columns
    energy = float(evals[order].sum() / evals.sum().clamp_min(1e-30))
    s = math.sqrt(clone.d_t / clone.d_s)
    dev = clone.embed.device

    clone.embed.copy_(u.to(dev))
    for i, layer in enumerate(cast(Iterable[LayerProjections], clone.layers)):
        g_in, g_post = _teacher_gains(clone, i)
        folded_in = (g_in.cpu().unsqueeze(1) * u) * s
        folded_post = (g_post.cpu().unsqueeze(1) * u) * s
        for role in ROLES:
            value = {"q": folded_in, "k": folded_in, "v": folded_in, "gate": folded_post, "up": folded_post}.get(
                role, u
            )
            getattr(layer, role).copy_(value.to(dev))
        layer.input_norm.fill_(1.0)
        layer.post_attention_norm.fill_(1.0)
    g_f = _final_gain(clone).cpu()
    if clone.tied:
        # The head is E_T @ U: the final gain cannot be folded into it, so keep its diagonal in U's basis.
        clone.final_norm.copy_((torch.einsum("ds,d,ds->s", u, g_f, u) * s).to(dev))
    else:
        assert clone.head is not None  # an untied clone has its own head projection
        clone.head.copy_((g_f.unsqueeze(1) * u * s).to(dev))
        clone.final_norm.fill_(1.0)
    return {"energy_kept": energy}
