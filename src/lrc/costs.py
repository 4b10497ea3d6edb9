"""The cost model of spec section 5: generated vs factored student matrices.

A student matrix W_S = W_T @ P (out x d_S) can be *generated* once (2 * out * d_T * d_S FLOPs) and then
applied to N tokens (2 * N * out * d_S), or applied *factored* as W_T (P x) without ever forming it
(2 * N * d_T * (d_S + out)). Backward roughly doubles both sides alike, so the forward counts decide.
Generation is shared by every micro-batch of an optimizer step (`LowRankClone.step_weights`), so with
`reuse` micro-batches its cost is divided by `reuse`.
"""

from __future__ import annotations


def generated_flops(n_tokens: int, out: int, d_t: int, d_s: int, reuse: int = 1) -> float:
    return 2.0 * out * d_t * d_s / reuse + 2.0 * n_tokens * out * d_s


def factored_flops(n_tokens: int, out: int, d_t: int, d_s: int) -> float:
    return 2.0 * n_tokens * d_t * (d_s + out)


def factored_crossover_tokens(out: int, d_t: int, d_s: int, reuse: int = 1) -> float:
    """Tokens per micro-batch below which the factored form is cheaper than generating the matrix."""
    # out*d_T*d_S/reuse + N*out*d_S = N*d_T*(d_S+out)  =>  N = out*d_T*d_S / (reuse * (d_T*d_S + out*(d_T-d_S)))
    return out * d_t * d_s / (reuse * (d_t * d_s + out * (d_t - d_s)))


def crossover_table(d_t: int, d_s: int, ffn: int, q_out: int, kv_out: int, vocab: int) -> dict[str, float]:
    """Crossover token counts per role (o and down compress the output side: out and d_T swap roles)."""
    return {
        "q": factored_crossover_tokens(q_out, d_t, d_s),
        "k/v": factored_crossover_tokens(kv_out, d_t, d_s),
        "gate/up": factored_crossover_tokens(ffn, d_t, d_s),
        "o": factored_crossover_tokens(q_out, d_t, d_s),
        "down": factored_crossover_tokens(ffn, d_t, d_s),
        "head": factored_crossover_tokens(vocab, d_t, d_s),
    }
