"""`--init refit`: pca, then each layer's projections refit by least squares to the teacher's layer outputs.

pca (`lrc.student.init.init_pca`) keeps the d_S most energetic directions U of the teacher's residual stream, but each
layer of the student then sees a truncated input and its errors add up layer after layer: at quarter width
the step-0 student is far from its teacher. Refitting asks, layer by layer and on the calibration batches,
which projections make *this* student (its actual, already-approximate inputs) reproduce the teacher's layer.

Because q, k, v share an input (as gate and up do), and pca gives them one projection, the student's layer
can be run with the teacher's own modules: with n = rmsnorm_S(x_S) (student gains 1),

    attention block:  z = Attn_T(n P_in^T)        x_S <- x_S + z P_o       (z in teacher space, d_T)
    MLP block:        y = MLP_T(m P_mlp^T)        x_S <- x_S + y P_down    (m = rmsnorm_S of the new x_S)

which is exactly what the generated student computes (W_q (P_in n) = (W_q P_in) n, biases and Qwen3 q/k
norms included). For every layer in order, over the calibration tokens:

1. P_in = argmin sum ||P n - b||^2 with b the teacher's normalised input (its gains included): the
   regression B^T N (N^T N)^-1. Since W (P n - b) is minimised by the same P for every W, this is the
   least-squares fit of q, k and v (all heads) at once, whatever W_q, W_k, W_v are.
2. P_o = argmin sum ||x_S + P^T z_S - U^T (x_T + z_T)||^2: the student's residual stream after the block,
   given its own (already approximate) inputs, should be the teacher's as pca's basis U reads it, which also
   corrects the error carried in from earlier layers. (Z_S^T Z_S + lambda I)^-1 Z_S^T (target), with a
   ridge lambda (`ridge_for`: 1e-3 of the mean eigenvalue at 32 calibration tokens per dimension, more with
   fewer): a d_T x d_T Gram can be singular (heads x head_dim < d_T, few calibration tokens), and a weak
   ridge (1e-6) lets the solution take large cancelling entries (60-100 where pca's stay near 1) that
   amplify rounding: at real sizes the bf16 student's logit error was then 10-56x pca's.
3. and 4. the same for P_gate = P_up (the MLP input) and P_down, on the student's residual after step 2.

With `--layers` / `--drop-layers`, student layer i is fitted to the *full* teacher's layer kept_layers[i]:
its real input (the teacher's residual stream after every earlier layer, dropped ones included) and output,
so the dropped layers' contributions are absorbed by the kept ones rather than assumed away. Each teacher
layer is called with its own arguments (a sliding-window layer gets its sliding-window mask).

The teacher runs once per layer on the calibration batches (its layer inputs and the kwargs it is called
with are kept between layers); the student adds one attention and one MLP pass per layer with teacher
modules, so the refit costs about three teacher forwards of the calibration batches, plus two Gram matrices
of d_T x d_T per layer (2 N d_T^2 FLOPs each) and their d_T^3 solves. Memory: the residual streams of the
calibration tokens (N x (d_T + d_S)) and one layer's four teacher activations (4 N x d_T).

At d_S = d_T with U = I every regression returns the teacher's own map, so the student is the teacher, as
with pca. Least squares per layer is no guarantee for the loss at the end of the stack, and a fit judged on
its own tokens flatters itself (with 2-5 calibration tokens per dimension, refit was worse than pca on
held-out text in 6 of 8 shapes while an in-sample guard kept it every time). So the refit is kept only when
the student's KL to the teacher on *held-out* calibration batches (`check`, never seen by pca or the fit),
with its weights rounded to the dtype it exports in and run in that precision, is lower than pca's;
otherwise the pca projections are restored (`refit_projections` says which happened and by how much).

How many calibration tokens: `calibration_sequences` asks for `FIT_TOKENS_PER_DIM` (32) tokens per teacher
dimension for the fit (each Gram matrix has d_T^2 entries; 2-5 per dimension overfits) plus a quarter more
for the check, and never fewer than `--calib-batches` batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule

from lrc.data.batch import Batch
from lrc.distributed.fsdp import gathered
from lrc.model.clone import LayerProjections, LowRankClone
from lrc.model.weights import generate_weights, student_head

FIT_TOKENS_PER_DIM = 32  # calibration tokens per teacher dimension for the fit (pca and refit)
# The ridge, as a share of a Gram matrix's mean eigenvalue, is RIDGE_PER_DIM / (fit tokens per teacher
# dimension): 1e-3 at the default 32 tokens per dimension. Like the d/N of a least-squares estimate's
# variance, it shrinks as the calibration grows relative to d_T; measured on held-out text (BENCHMARKS.md,
# "The refit's ridge and calibration size"), the best ridge fell from 1e-2 at 4 tokens per dimension to
# 1e-4 at 32-64, and 1e-6 let entries of 60-100 appear at real sizes (10-56x pca's bf16 logit error).
RIDGE_PER_DIM = 0.032


def ridge_for(d_t: int, tokens: int) -> float:
    """The ridge (share of the mean eigenvalue) for a fit on `tokens` calibration tokens of a d_T-wide teacher."""
    return RIDGE_PER_DIM * d_t / max(1, tokens)
CHECK_SHARE = 0.25  # of the fit's sequences, held out for the keep-or-revert check


def calibration_sequences(d_t: int, seq_len: int, batch: int, min_batches: int) -> tuple[int, int]:
    """(fit, check) numbers of calibration sequences, each a multiple of `batch` (the global batch): at least
    FIT_TOKENS_PER_DIM tokens per teacher dimension for the fit, CHECK_SHARE of that (one batch at least) for
    the check, and never fewer than `min_batches` batches for the fit."""
    fit = max(min_batches * batch, math.ceil(FIT_TOKENS_PER_DIM * d_t / seq_len))
    fit = math.ceil(fit / batch) * batch
    check = max(batch, math.ceil(CHECK_SHARE * fit / batch) * batch)
    return fit, check


class _Stop(Exception):
    """Raised by a hook to end a forward early once what it wanted has been captured."""


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _call(module: nn.Module, x: torch.Tensor, kwargs: dict, dtype: torch.dtype) -> torch.Tensor:
    """module(x, **kwargs) with x in `dtype` (that of the teacher's own residual stream: bf16 for a bf16 teacher,
    fp32 for an fp32 one or for a bf16-stored one that `lrc.model.precision` upcasts), the result in fp32."""
    return _first(module(x.to(dtype), **kwargs)).float()


def _solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """(gram + ridge * mean eigenvalue * I)^-1 cross, in fp64."""
    ridge = ridge * float(gram.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, cross)


def _teacher_layers(clone: LowRankClone) -> list[nn.Module]:
    """Every layer of the full teacher, dropped ones included."""
    return list(cast(nn.ModuleList, clone.t_base.get_submodule(clone.family.layers)))


class _Batch:
    """One calibration batch: the kwargs each teacher layer and its attention are called with (per layer: a
    sliding-window layer's mask differs from a full-attention one's), the valid-token mask, and the two
    residual streams (the teacher's at the next teacher layer to run, the student's after its last fitted
    layer)."""

    def __init__(self, batch: Batch, clone: LowRankClone):
        self.batch = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "attention_mask")}
        mask = batch.get("attention_mask")
        self.valid = mask.bool().reshape(-1) if mask is not None else None
        layers = _teacher_layers(clone)
        self.layer_kw: list[dict] = [{} for _ in layers]
        self.attn_kw: list[dict] = [{} for _ in layers]
        captured: dict[str, torch.Tensor] = {}

        def layer_hook(j):
            def hook(module, args, kwargs):
                if j == 0:
                    captured["x"] = args[0] if args else kwargs["hidden_states"]
                self.layer_kw[j] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            return hook

        def attn_hook(j):
            def hook(module, args, kwargs):
                self.attn_kw[j] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if j == len(layers) - 1:
                    raise _Stop  # every layer's arguments are known: the rest of the forward is not needed
            return hook

        handles = []
        for j, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(layer_hook(j), with_kwargs=True))
            handles.append(layer.get_submodule(clone.family.attn).register_forward_pre_hook(attn_hook(j),
                                                                                            with_kwargs=True))
        try:
            clone.t_base(**self.batch, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        self.dtype = captured["x"].dtype
        self.x_t = captured["x"].float()  # (B, T, d_T): the embedding rows, the input of teacher layer 0
        self.x_s = self.x_t @ clone.embed.float()  # the student's embedding: E_T[ids] @ P_emb

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (valid tokens, d), in fp64 for the Gram sums."""
        x = x.reshape(-1, x.shape[-1])
        return (x[self.valid] if self.valid is not None else x).double()


def _teacher_layer(clone: LowRankClone, j: int, b: _Batch, capture: bool = True) -> dict[str, torch.Tensor]:
    """Run teacher layer j (of the full teacher) on b.x_t, advancing it; with `capture`, return its normalised
    inputs and block outputs."""
    fam = clone.family
    layer = _teacher_layers(clone)[j]
    acts: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, out):
            acts[name] = _first(out).float()
        return hook

    handles = [layer.get_submodule(fam.input_norm).register_forward_hook(keep("attn_in")),
               layer.get_submodule(fam.attn).register_forward_hook(keep("attn_out")),
               layer.get_submodule(fam.post_attention_norm).register_forward_hook(keep("mlp_in")),
               layer.get_submodule(fam.mlp).register_forward_hook(keep("mlp_out"))] if capture else []
    try:
        b.x_t = _call(layer, b.x_t, b.layer_kw[j], b.dtype)
    finally:
        for h in handles:
            h.remove()
    return acts


def _add(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    return term if total is None else total + term


def _fit_input(batches: list[_Batch], targets: list[torch.Tensor], eps: float, ridge: float) -> torch.Tensor:
    """P (d_T, d_S) minimising sum ||P rmsnorm(x_S) - b||^2 over the valid tokens."""
    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    for b, t in zip(batches, targets):
        n, y = b.rows(_rms(b.x_s, eps)), b.rows(t)
        gram, cross = _add(gram, n.t() @ n), _add(cross, y.t() @ n)
    assert gram is not None and cross is not None
    return _solve(gram, cross.t(), ridge).t().float()  # (B^T N)(N^T N)^-1 = ((N^T N)^-1 N^T B)^T


def _fit_output(student: list[torch.Tensor], teacher: list[torch.Tensor], batches: list[_Batch],
                ridge: float) -> torch.Tensor:
    """P (d_T, d_S) minimising sum ||P^T z_S - y||^2 over the valid tokens (y: `teacher`, in student space)."""
    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    for b, zs, y in zip(batches, student, teacher):
        s, t = b.rows(zs), b.rows(y)
        gram, cross = _add(gram, s.t() @ s), _add(cross, s.t() @ t)
    assert gram is not None and cross is not None
    return _solve(gram, cross, ridge).float()


def _low_precision(dtype: torch.dtype, device: torch.device):
    """The forward of a model stored in `dtype`: autocast to it for bf16/fp16, nothing for fp32."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


@torch.no_grad()
def calibration_loss(clone: LowRankClone, batches: Iterable[Batch], chunk: int = 1024,
                     dtype: torch.dtype = torch.float32) -> float:
    """KL(teacher || student) per valid token on `batches`, at temperature 1: how far the student's next-token
    distribution is from its teacher's (what decides whether a refit is kept; unlike the cross-entropy it
    means something for a random test teacher too).

    `dtype`: the student as it will be used: its generated weights rounded to `dtype` and its forward run in
    it (a bf16 export computes in bf16), against the teacher computing in fp32."""
    fam = clone.family
    device = clone.embed.device
    rounded = {k: v.to(dtype) for k, v in generate_weights(clone, all_generated=True).items()}
    head = student_head(clone).to(dtype).float()
    t_head = gathered(cast(nn.Linear, clone.teacher.get_submodule(fam.head)).weight).float()
    total, count = 0.0, 0
    for batch in batches:
        pos, mask = batch.get("position_ids"), batch.get("attention_mask")
        with _low_precision(dtype, device):
            h = clone.student_final_hidden(batch["input_ids"], pos, mask, weights=rounded)
        h = h.reshape(-1, clone.d_s).float()
        t = clone.t_base(input_ids=batch["input_ids"], position_ids=pos, attention_mask=mask, use_cache=False)
        t = t.last_hidden_state.reshape(-1, clone.d_t).float()
        valid = mask.bool().reshape(-1) if mask is not None else torch.ones(h.shape[0], dtype=torch.bool)
        h, t = h[valid.to(h.device)], t[valid.to(t.device)]
        for s in range(0, h.shape[0], chunk):
            log_p = F.log_softmax(t[s:s + chunk] @ t_head.t(), -1)
            log_q = F.log_softmax(h[s:s + chunk] @ head.t(), -1)
            total += float((log_p.exp() * (log_p - log_q)).sum())
        count += h.shape[0]
    return total / max(1, count)


@torch.no_grad()
def _refit(clone: LowRankClone, work: list[_Batch], ridge: float) -> None:
    """Refit every layer's projections in place, in order (see the module docstring)."""
    fam = clone.family
    u = clone.embed.detach().float()  # pca's basis U (d_T, d_S): every output side of pca is U
    eps = clone.rms_norm_eps
    next_j = 0  # the next teacher layer to run: the teacher's stream walks through dropped layers too
    for i, layer in enumerate(cast(Iterable[LayerProjections], clone.layers)):
        k = clone.kept_layers[i]
        for j in range(next_j, k):
            for b in work:
                _teacher_layer(clone, j, b, capture=False)
        next_j = k + 1
        t_layer = _teacher_layers(clone)[k]
        attn, mlp = t_layer.get_submodule(fam.attn), t_layer.get_submodule(fam.mlp)
        x_t_in = [b.x_t for b in work]
        t_acts = [_teacher_layer(clone, k, b) for b in work]
        # Under --parallel fsdp the teacher layer is an FSDP2 unit: its own forward gathers it, but the student
        # passes below call its attention and MLP directly, so gather it for them and reshard after.
        sharded = isinstance(t_layer, FSDPModule)
        if sharded:
            cast(FSDPModule, t_layer).unshard()
        # attention block
        p_in = _fit_input(work, [a["attn_in"] for a in t_acts], eps, ridge)
        z_s = [_call(attn, _rms(b.x_s, eps) @ p_in.t(), b.attn_kw[k], b.dtype) for b in work]
        tgt = [(x + a["attn_out"]) @ u - b.x_s for x, a, b in zip(x_t_in, t_acts, work)]
        p_o = _fit_output(z_s, tgt, work, ridge)
        for b, z in zip(work, z_s):
            b.x_s = b.x_s + z @ p_o
        # MLP block
        p_mlp = _fit_input(work, [a["mlp_in"] for a in t_acts], eps, ridge)
        y_s = [_call(mlp, _rms(b.x_s, eps) @ p_mlp.t(), {}, b.dtype) for b in work]
        tgt = [b.x_t @ u - b.x_s for b in work]  # b.x_t: the teacher's residual after the whole layer
        p_down = _fit_output(y_s, tgt, work, ridge)
        for b, y in zip(work, y_s):
            b.x_s = b.x_s + y @ p_down
        dev = clone.embed.device
        for role, value in (("q", p_in), ("k", p_in), ("v", p_in), ("o", p_o), ("gate", p_mlp), ("up", p_mlp),
                            ("down", p_down)):
            getattr(layer, role).copy_(value.to(dev))
        layer.input_norm.fill_(1.0)
        layer.post_attention_norm.fill_(1.0)
        if sharded:
            cast(FSDPModule, t_layer).reshard()


@torch.no_grad()
def refit_projections(clone: LowRankClone, batches: Iterable[Batch], check: Iterable[Batch] | None = None, *,
                      dtype: torch.dtype = torch.float32, guard: bool = True, ridge: float | None = None
                      ) -> dict[str, float | bool | str]:
    """Refit a pca-initialised clone's layer projections (see the module docstring) on calibration `batches`.

    `check`: held-out calibration batches on which the refit must beat pca's KL to the teacher, with the
    student's weights in `dtype` (the dtype it exports in), or the pca projections are restored. Returns both
    KLs, the tokens they were measured on and whether the refit was kept (with `guard` off or no `check`,
    always: the tests of the regressions themselves). `ridge`: of each Gram matrix's mean eigenvalue (default
    `ridge_for` the fit's tokens)."""
    if clone.ffn_size is not None:  # the passes below run the teacher's full-width MLP: not this student's
        return {"refit_kept": False, "refit_skipped": "a narrower FFN (--ffn-size) keeps pca's start"}
    held_out = list(check or [])
    before = calibration_loss(clone, held_out, dtype=dtype) if held_out and guard else None
    saved = {k: v.clone() for k, v in clone.trainable_state_dict().items()}
    work = [_Batch(b, clone) for b in batches]
    if ridge is None:
        ridge = ridge_for(clone.d_t, sum(int(b.valid.sum()) if b.valid is not None else b.x_t.shape[0] * b.x_t.shape[1]
                                         for b in work))
    _refit(clone, work, ridge)
    if before is None:
        return {"refit_kept": True}
    after = calibration_loss(clone, held_out, dtype=dtype)
    kept = after < before
    if not kept:
        clone.load_trainable_state_dict(saved)
    tokens = sum(int(b["attention_mask"].sum()) if b.get("attention_mask") is not None else b["input_ids"].numel()
                 for b in held_out)
    return {"heldout_kl_pca": round(before, 5), "heldout_kl_refit": round(after, 5), "heldout_tokens": tokens,
            "ridge": float(f"{ridge:.3g}"), "refit_kept": kept}
