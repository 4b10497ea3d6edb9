"""Training FLOPs per token of an LRC run, by part.

FLOPs follow `lrc.model.costs` (the generated-vs-factored cost model) with the generated/factored choice per role that
`LowRankClone.plan_projections` makes, plus attention scores, which the cost model leaves out.
"""

from __future__ import annotations

from lrc.model.costs import factored_flops, generated_flops, generated_through_ffn_flops
from lrc.model.families import ROLES
from lrc.plan.shape import Shape

DEFAULT_MFU = 0.4  # assumed model FLOP utilisation for a wall-time estimate


def flops_per_token(shape: Shape, roles: dict[str, str], tokens: int, reuse: int, seq_len: int,
                    kl: bool = True, projected_terms: int = 2,
                    gate_up_terms: tuple[str, ...] = ("gate", "up"),
                    recompute_teacher: bool = False) -> dict[str, float]:
    """Training FLOPs per token by part, from `lrc.model.costs` (matrix products) plus attention scores.
    `recompute_teacher`: under gradient checkpointing with clone terms, each kept teacher layer runs twice more,
    for its clone targets in its student layer's forward and again in that layer's recomputation
    (`lrc.model.clone`); the student's own recomputation is not counted."""
    s, n = shape, float(tokens)
    outs = s.role_outs
    layer_outs = sum(outs[r] for r in ROLES)

    def matrix(role):
        args = (n, outs[role], s.d_t, s.d_s)
        if s.ffn_s is not None and role in ("gate", "up", "down"):
            return generated_through_ffn_flops(n, s.ffn, s.ffn_s, s.d_t, s.d_s, reuse=reuse)
        return factored_flops(*args) if roles[role] == "factored" else generated_flops(*args, reuse=reuse)

    ctx = (seq_len + 1) / 2  # causal: keys attended per query, on average (packed documents attend fewer)
    attn = 4.0 * n * ctx * s.heads * s.head_dim  # QK^T and AV of one layer's forward
    targets = projected_terms * 4.0 * n * s.d_t * s.d_s
    if s.ffn_s is not None:  # gate and up targets through Q: forward and the gradient to Q
        targets += len(gate_up_terms) * 4.0 * n * s.ffn * s.ffn_s
    out = {
        "teacher forward": 2.0 * n * s.d_t * (s.teacher_layers * layer_outs + (s.vocab if kl else 0)),
        "student matrices (generated or factored)": s.layers * sum(matrix(r) for r in ROLES),
        "student head": matrix("head"),
        "clone targets through P_o / P_down" + (" / Q" if s.ffn_s is not None else ""): s.layers * targets,
        "attention scores (teacher fwd + student fwd/bwd)": attn * (s.teacher_layers + 3 * s.layers),
    }
    if recompute_teacher:
        out["teacher layers run twice more for the clone targets"] = 2 * (2.0 * n * s.d_t * s.layers * layer_outs
                                                                         + attn * s.layers)
    return {k: v / n for k, v in out.items()}


def free_flops_per_token(shape: Shape, seq_len: int, teacher_runs: bool, kl: bool,
                         projected_terms: int = 0) -> dict[str, float]:
    """Training FLOPs per token of an ordinary student trained weight by weight (kd, prune-kd, scratch): its
    matrices forward and backward (6 per weight), the teacher's forward when KL or clone terms need it, and the
    clone targets' maps (forward only: the maps are frozen)."""
    s = shape
    outs = s.role_outs
    layer = sum((s.student_ffn if r in ("gate", "up", "down") else outs[r]) for r in ROLES)
    ctx = (seq_len + 1) / 2
    attn = 4.0 * ctx * s.heads * s.head_dim
    teacher = 2.0 * s.d_t * (s.teacher_layers * sum(outs[r] for r in ROLES) + (s.vocab if kl else 0))
    return {
        "teacher forward": teacher if teacher_runs else 0.0,
        "student matrices (free weights)": 6.0 * s.layers * s.d_s * layer,
        "student head": 6.0 * s.vocab * s.d_s,
        "clone targets through the frozen maps": s.layers * projected_terms * 2.0 * s.d_t * s.d_s,
        "attention scores (teacher fwd + student fwd/bwd)": attn * ((s.teacher_layers if teacher_runs else 0)
                                                                    + 3 * s.layers),
    }
