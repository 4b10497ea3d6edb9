"""The objective of LRC as pure functions: masked activation MSE, the chunked LM (CE) + distillation (KL)
loss, and how the terms compose (`LossWeights`, `lrc_objective`, `total_loss`).

Shapes use N for flattened tokens, V for the vocabulary, d_S / d_T for student / teacher width.

KL normalisation. The official LRC code uses `F.kl_div(..., reduction="batchmean")` on (B, T, V) tensors,
i.e. the KL *summed* over every position and divided by the batch size, at tau = 40 with no tau^2. We average
over valid tokens instead, so the loss does not grow with sequence length: official = ours x (valid tokens
per sequence). At high temperature the per-token KL shrinks roughly like 1/tau^2, which is why the official
sum over 2,048 positions at tau = 40 lands near the scale of a per-token KL at tau ~ 1 (2048 / 40^2 = 1.3).
Our default is therefore tau = 1 with per-token averaging; pass `--kl-temperature` to change it.

Memory. Full (N x V) fp32 logits for a batch are never built: `kd_lm_loss` walks the tokens in chunks,
computes teacher and student logits for the chunk, the losses in fp32, and the gradient with respect to the
student hidden states and head weight right there (the trick of Liger-Kernel's fused linear losses), so
only (chunk x V) logits are alive at any time and backward is two stored gradients scaled by a scalar.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import cast

import torch
import torch.nn.functional as F

from lrc.data.batch import IGNORE_INDEX
from lrc.model.precision import for_product

# The activation-clone terms of a layer: the output of each module they name.
CLONE_TERMS = ("q", "k", "v", "attn_out", "gate", "up", "ffn_out")


@dataclass
class LossWeights:
    """Weights of the LRC loss: L = ce * L_LM + kl * L_KL + clone * sum_terms w_term * E_term.

    A weight of 0 removes that term from the computation (no hook, no teacher logits). These defaults are
    the command line's too (`lrc.config.RunConfig`)."""

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


def kl_positions(labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) bool: the positions the KL counts: those whose next token is a target when a loss mask says so
    (e.g. --train-on assistant), else every valid (attention) position, else all."""
    if loss_mask is not None:
        return loss_mask.bool().reshape(-1)
    if attention_mask is not None:
        return attention_mask.bool().reshape(-1)
    return torch.ones(labels.numel(), dtype=torch.bool, device=labels.device)


@dataclass(frozen=True)
class TokenCounts:
    """How many tokens each loss term averages over: `ce` labelled tokens, `kl` KL positions, `clone` valid
    input tokens (those the activation MSE counts).

    Per micro-batch (`of_batch`) these are local counts; the trainer passes the counts of the whole optimizer
    step (all micro-batches, all processes, divided by the number of processes, whose gradients are averaged),
    so every term is a mean over the step's tokens however they are split into micro-batches: a micro-batch
    with few valid tokens (assistant-only labels, short documents) weighs as little as it should."""

    ce: float
    kl: float
    clone: float

    @classmethod
    def of_batch(cls, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 loss_mask: torch.Tensor | None = None) -> TokenCounts:
        clone = float(attention_mask.sum()) if attention_mask is not None else float(labels.numel())
        return cls(ce=float((labels != IGNORE_INDEX).sum()), kl=float(kl_positions(labels, attention_mask,
                                                                                   loss_mask).sum()), clone=clone)



def token_shares(step: TokenCounts | None, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 loss_mask: torch.Tensor | None = None) -> tuple[float | None, float, float]:
    """(CE denominator, KL scale, clone scale) that turn one micro-batch's local means into its share of the
    step's means (`step` None: the micro-batch is the whole step, local means)."""
    if step is None:
        return None, 1.0, 1.0
    local = TokenCounts.of_batch(labels, attention_mask, loss_mask)
    return max(step.ce, 1.0), local.kl / max(step.kl, 1.0), local.clone / max(step.clone, 1.0)


@dataclass
class LossOutput:
    loss: torch.Tensor
    """The weighted total (has gradient)."""
    terms: dict[str, torch.Tensor]
    """Detached scalars for logging, local means: ce, kl, clone (unweighted sum) and clone/<term> summed over
    layers."""


def total_loss(terms: dict[str, float], w: LossWeights) -> float:
    """The weighted total of logged terms (means): what `lrc_objective` optimises, for logging."""
    return w.ce * terms.get("ce", 0.0) + w.kl * terms.get("kl", 0.0) + w.clone * terms.get("clone", 0.0)


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the valid tokens and all features, computed in fp32.

    student, teacher: (B, T, F); mask: (B, T) bool/0-1 or None (all valid). Returns a scalar.
    """
    if mask is None:  # one fused kernel each way (sub, square, mean and their backward)
        return F.mse_loss(student.float(), teacher.float())
    diff = (student.float() - teacher.float()).pow(2)
    m = mask.to(diff.dtype).unsqueeze(-1)
    count = m.sum() * diff.shape[-1]
    return (diff * m).sum() / count.clamp_min(1.0)


def auto_chunk_size(vocab: int, budget_bytes: int = 1 << 26) -> int:
    """Tokens per chunk so that one fp32 (chunk x V) tensor stays near `budget_bytes` (64 MiB)."""
    return int(min(4096, max(64, budget_bytes // (4 * vocab))))


def _chunk_terms(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor | None,
    labels: torch.Tensor,
    kl_mask: torch.Tensor,
    temperature: float,
    ce_coef: float | torch.Tensor | None,
    kl_coef: float | torch.Tensor | None,
    acc: torch.dtype,
):
    """CE sum, KL sum and, when coefficients are given, ce_coef * dCE_sum/dz + kl_coef * dKL_sum/dz for one
    chunk of student logits z, all in `acc` (>= fp32). In-place where possible: at most about six
    (chunk x V) tensors are alive at once."""
    s_logits = s_logits.to(acc)
    ce_valid = labels != IGNORE_INDEX
    safe_labels = labels.clamp_min(0).unsqueeze(-1)
    logp = torch.log_softmax(s_logits, dim=-1)
    ce_sum = -(logp.gather(-1, safe_labels).squeeze(-1) * ce_valid).sum()
    dz = None
    if ce_coef is not None:
        dz = logp.exp()  # softmax - onehot
        dz.scatter_add_(-1, safe_labels, -torch.ones_like(dz[:, :1]))
        dz.mul_((ce_valid.to(acc) * ce_coef).unsqueeze(-1))
    kl_sum = s_logits.new_zeros(())
    if t_logits is not None:
        if temperature != 1.0:
            del logp
            logp_s = torch.log_softmax(s_logits.div_(temperature), dim=-1)
        else:
            logp_s = logp
        del s_logits
        logp_t = torch.log_softmax(t_logits.to(acc).div_(temperature), dim=-1)
        p_t = logp_t.exp()
        kl_tok = logp_t.sub_(logp_s).mul_(p_t).sum(-1)  # sum_v p_t (log p_t - log p_s)
        kl_sum = (kl_tok * kl_mask).sum()
        if kl_coef is not None:
            # d KL / d z_s = (softmax(z_s / tau) - softmax(z_t / tau)) / tau
            q = logp_s.exp_()  # log p_s is not needed any more (CE was summed, dz has its own copy)
            q.sub_(p_t).mul_((kl_mask * (kl_coef / temperature)).unsqueeze(-1))
            dz = q if dz is None else dz.add_(q)
    return ce_sum, kl_sum, dz


class _FusedKDLMLoss(torch.autograd.Function):
    """Chunked CE + KL whose gradients are computed in forward; see `kd_lm_loss`."""

    @staticmethod
    def forward(ctx, s_hidden, s_head, t_hidden, t_head, labels, kl_mask, ce_w, kl_w, temperature, chunk,
                ce_den, kl_scale):
        n = s_hidden.shape[0]
        # fp32 at least: bf16 log-softmax at tau > 1 turns the KL into rounding noise
        acc = torch.promote_types(s_hidden.dtype, torch.float32)
        n_ce = (labels != IGNORE_INDEX).sum().clamp_min(1).to(acc)
        n_kl = kl_mask.sum().clamp_min(1).to(acc)
        # What the CE sum is divided by in the loss (the logged CE is always the local mean).
        ce_den = n_ce if ce_den is None else torch.as_tensor(ce_den, dtype=acc)
        want_grad = s_hidden.requires_grad or s_head.requires_grad
        # A frozen head (the teacher's, for a factored student head) needs no (V x d) gradient.
        grad_h = torch.zeros_like(s_hidden, dtype=acc) if s_hidden.requires_grad else None
        grad_w = torch.zeros_like(s_head, dtype=acc) if s_head.requires_grad else None
        ce_total = s_hidden.new_zeros((), dtype=acc)
        kl_total = s_hidden.new_zeros((), dtype=acc)
        use_kl = kl_w != 0.0 and t_hidden is not None
        ce_coef = ce_w / ce_den if want_grad and ce_w != 0.0 else None
        kl_coef = kl_w * kl_scale / n_kl if want_grad and use_kl else None
        chunk = chunk if chunk > 0 else auto_chunk_size(s_head.shape[0])
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            h = s_hidden[sl]
            s_logits = h @ s_head.t()
            t_logits = (t_hidden[sl] @ t_head.t()) if use_kl else None
            ce_sum, kl_sum, dz = _chunk_terms(
                s_logits, t_logits, labels[sl], kl_mask[sl].to(acc), temperature, ce_coef, kl_coef, acc
            )
            ce_total += ce_sum
            kl_total += kl_sum
            if dz is not None:
                dz = dz.to(h.dtype)
                if grad_h is not None:
                    grad_h[sl] = dz @ s_head
                if grad_w is not None:
                    grad_w += dz.t() @ h
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (s_hidden.dtype, s_head.dtype)
        ce = ce_total / n_ce
        kl = kl_total / n_kl if use_kl else kl_total
        loss = ce_total / ce_den * ce_w + kl * (kl_w * kl_scale)
        ce, kl = ce.detach(), kl.detach()
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _g_ce, _g_kl):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_loss).to(ctx.dtypes[0]) if grad_h is not None else None
        gw = (grad_w * grad_loss).to(ctx.dtypes[1]) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None, None, None, None


def kd_lm_loss(
    s_hidden: torch.Tensor,
    s_head: torch.Tensor,
    t_hidden: torch.Tensor | None,
    t_head: torch.Tensor | None,
    labels: torch.Tensor,
    kl_mask: torch.Tensor,
    *,
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    temperature: float = 1.0,
    chunk_size: int = 0,
    ce_denominator: float | None = None,
    kl_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted next-token CE plus forward KL(teacher || student), chunked over tokens.

    s_hidden (N, d_S) final student hidden states (after the final norm); s_head (V, d_S) student head;
    t_hidden (N, d_T) and t_head (V, d_T) the teacher's (no gradient; may be None when kl_weight is 0);
    labels (N,) next-token ids with -100 where there is no target; kl_mask (N,) which positions count for KL.

    Returns (ce_weight * CE + kl_weight * KL, CE, KL): CE is the mean over labelled tokens, KL the mean over
    masked positions of sum_v p_T^tau (log p_T^tau - log p_S^tau) with p^tau = softmax(z / tau).
    Only the first output carries gradient; the other two are detached, for logging.

    For exact gradient accumulation over micro-batches and ranks, `ce_denominator` replaces the local label
    count in the first output (pass global labels / world size) and `kl_scale` multiplies the KL there
    (pass 1 / micro-steps).
    """
    # A head stored in bf16 (a teacher's) meets fp32 hidden states where autocast is off: one cast per call.
    s_head = for_product(s_head, s_hidden)
    if t_hidden is not None:
        assert t_head is not None  # the teacher's hidden states and head are passed together
        t_hidden = t_hidden.detach()
        t_head = for_product(t_head.detach(), t_hidden)
    return _FusedKDLMLoss.apply(
        s_hidden, s_head, t_hidden, t_head, labels, kl_mask, float(ce_weight), float(kl_weight),
        float(temperature), int(chunk_size), ce_denominator, float(kl_scale),
    )


def reference_kd_lm_loss(
    s_hidden, s_head, t_hidden, t_head, labels, kl_mask, *, ce_weight=1.0, kl_weight=1.0, temperature=1.0,
    chunk_size=None, ce_denominator=None, kl_scale=1.0,
):
    """Unchunked autograd version of `kd_lm_loss`: builds full logits. For tests and the naive benchmark."""
    s_logits = (s_hidden @ s_head.t()).float()
    ce_sum = F.cross_entropy(s_logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    n_ce = (labels != IGNORE_INDEX).sum().clamp_min(1)
    ce = ce_sum / n_ce
    ce_den = n_ce if ce_denominator is None else ce_denominator
    kl = s_logits.new_zeros(())
    if kl_weight != 0.0 and t_hidden is not None:
        t_logits = (t_hidden @ t_head.t()).float().detach()
        logp_s = torch.log_softmax(s_logits / temperature, -1)
        logp_t = torch.log_softmax(t_logits / temperature, -1)
        kl_tok = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
        m = kl_mask.float()
        kl = (kl_tok * m).sum() / m.sum().clamp_min(1)
    return ce_weight * ce_sum / ce_den + kl_weight * kl_scale * kl, ce.detach(), kl.detach()


def lrc_objective(
    hidden: torch.Tensor,
    head: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_head: torch.Tensor | None,
    clone_errors: dict[tuple[int, str], torch.Tensor],
    labels: torch.Tensor,
    kl_mask: torch.Tensor,
    w: LossWeights,
    *,
    ce_denominator: float | None = None,
    kl_scale: float = 1.0,
    clone_scale: float = 1.0,
    chunk_size: int = 0,
    fused: bool = True,
) -> LossOutput:
    """L = ce * CE + kl * KL + clone * sum over (layer, term) of w_term * E, for one micro-batch.

    hidden (N, d) and head (V, d): the student's final hidden states and the head they meet; teacher_hidden
    (N, d_T) and teacher_head (V, d_T) for the KL (None when w.kl is 0); clone_errors: {(layer, term): MSE};
    labels, kl_mask: (N,). ce_denominator / kl_scale / clone_scale: the caller's normalisers for exact
    accumulation over micro-batches and ranks (`TokenCounts.share`; see `kd_lm_loss`). `fused`:
    False takes the unchunked autograd path (full logits; the naive baseline for tests and benchmarks).
    """
    loss_fn = kd_lm_loss if fused else reference_kd_lm_loss
    lm, ce, kl = loss_fn(
        hidden, head, teacher_hidden if w.kl != 0.0 else None, teacher_head if w.kl != 0.0 else None,
        labels, kl_mask, ce_weight=w.ce, kl_weight=w.kl, temperature=w.kl_temperature, chunk_size=chunk_size,
        ce_denominator=ce_denominator, kl_scale=kl_scale,
    )
    terms = {"ce": ce, "kl": kl}
    total = lm
    weights = w.clone_terms()
    if weights and clone_errors:
        # a non-empty sum of tensors: a tensor (sum's start value 0 is never returned alone)
        clone = cast(torch.Tensor, sum(weights[t] * v for (_, t), v in clone_errors.items()))
        total = total + (w.clone * clone_scale) * clone
        terms["clone"] = clone.detach()
        for t in weights:
            terms[f"clone/{t}"] = sum(v.detach() for (_, tt), v in clone_errors.items() if tt == t)
    return LossOutput(loss=total, terms=terms)
