"""The cost model: generated vs factored student matrices, in training FLOPs.

A student matrix W_S = W_T @ P (out x d_S, W_T frozen) can be *generated* once per optimizer step and then
applied to N tokens, or applied *factored* as W_T (P x) without ever forming it. Counting forward and
backward (multiply-adds x 2):

- generated: forming W_S (2 out d_T d_S) and sending its gradient back to P (2 out d_T d_S), shared by the
  `reuse` micro-batches of a step (`LowRankClone.step_weights`); per micro-batch the ordinary
  6 N out d_S of a trained linear (forward, input gradient, weight gradient).
- factored: through the frozen W_T only forward and input gradient (4 N out d_T: no weight gradient), and
  6 N d_T d_S through P.

The same holds for the output-side roles (o, down: W_S = P^T W_T) with `out` the width of their input, and
for the LM head (out = vocabulary). A wide head is often cheaper factored at any token count: generating it
needs the (V x d_S) weight gradient over all tokens, the factored form only the narrow (N x d_T) one.
"""

from __future__ import annotations


def role_outs(heads: int, kv_heads: int, head_dim: int, ffn: int, vocab: int) -> dict[str, int]:
    """The `out` of each role's teacher matrix in this cost model (the head's is the vocabulary)."""
    hq, hk = heads * head_dim, kv_heads * head_dim
    return {"q": hq, "k": hk, "v": hk, "o": hq, "gate": ffn, "up": ffn, "down": ffn, "head": vocab}


def generated_flops(n_tokens: float, out: int, d_t: int, d_s: int, reuse: int = 1) -> float:
    return 4.0 * out * d_t * d_s / reuse + 6.0 * n_tokens * out * d_s


def factored_flops(n_tokens: float, out: int, d_t: int, d_s: int) -> float:
    return 4.0 * n_tokens * out * d_t + 6.0 * n_tokens * d_t * d_s


def factored_crossover_tokens(out: int, d_t: int, d_s: int, reuse: int = 1) -> float:
    """Tokens per micro-batch below which the factored form is cheaper (inf: it always is)."""
    # 4 out d_T d_S / reuse = N (4 out d_T + 6 d_T d_S - 6 out d_S)
    per_token = 4.0 * out * d_t + 6.0 * d_t * d_s - 6.0 * out * d_s
    if per_token <= 0:
        return float("inf")
    return 4.0 * out * d_t * d_s / (reuse * per_token)


def choose_projections(role_outs: dict[str, int], tokens_per_micro_batch: int, d_t: int, d_s: int,
                       reuse: int = 1) -> dict[str, str]:
    """"generated" or "factored" per role (`out` of each role, the head's = vocabulary): whichever costs fewer
    training FLOPs for this many tokens per micro-batch."""
    return {r: "factored" if tokens_per_micro_batch < factored_crossover_tokens(out, d_t, d_s, reuse) else "generated"
            for r, out in role_outs.items()}


def lrc_step_floor(n_tokens: int, d_t: int, d_s: int, role_outs: list[int], vocab: int, layers: int,
                   reuse: int = 1, projected_clone_terms: int = 2) -> float:
    """The overhead an LRC step cannot go below by this model: matrix-product FLOPs of (teacher forward +
    the cheaper form of every student matrix + teacher outputs projected as clone targets) over those of
    (teacher forward + ordinary training step of the student). Attention scores and element-wise work are
    left out of both sides. role_outs: the `out` of each of a layer's seven roles (see module docstring)."""
    teacher = 2.0 * n_tokens * d_t * (layers * sum(role_outs) + vocab)
    student = 6.0 * n_tokens * d_s * (layers * sum(role_outs) + vocab)
    matrices = layers * sum(min(generated_flops(n_tokens, o, d_t, d_s, reuse), factored_flops(n_tokens, o, d_t, d_s))
                            for o in role_outs)
    head = min(generated_flops(n_tokens, vocab, d_t, d_s, reuse), factored_flops(n_tokens, vocab, d_t, d_s))
    # attention / FFN outputs of the teacher @ P_o / P_down: forward and the gradient to P
    targets = layers * projected_clone_terms * 4.0 * n_tokens * d_t * d_s
    return (teacher + matrices + head + targets) / (teacher + student)


def generated_through_ffn_flops(n_tokens: float, d_ff_t: int, m: int, d_t: int, d_s: int, reuse: int = 1) -> float:
    """gate/up = Q^T (W_T P) or down = (P^T W_T) Q (`--ffn-size M`): W_T P as a generated role (forward and P's
    gradient, 4 d_ff_T d_T d_S), then the product with the trainable Q (forward and both gradients,
    6 d_ff_T M d_S), shared by the step's micro-batches; per micro-batch a trained (M x d_S) linear."""
    return (4.0 * d_ff_t * d_t * d_s + 6.0 * d_ff_t * m * d_s) / reuse + 6.0 * n_tokens * m * d_s
