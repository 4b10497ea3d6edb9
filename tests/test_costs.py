from lrc.costs import factored_crossover_tokens, factored_flops, generated_flops


def test_crossover_is_where_the_costs_meet():
    for out, d_t, d_s in [(256, 256, 128), (128256, 3072, 1536), (8192, 3072, 1536), (512, 2048, 1200)]:
        n = factored_crossover_tokens(out, d_t, d_s)
        assert abs(generated_flops(n, out, d_t, d_s) - factored_flops(n, out, d_t, d_s)) < 1e-6 * factored_flops(
            n, out, d_t, d_s)
        assert generated_flops(2 * n, out, d_t, d_s) < factored_flops(2 * n, out, d_t, d_s)
        assert generated_flops(n / 2, out, d_t, d_s) > factored_flops(n / 2, out, d_t, d_s)


def test_reuse_lowers_the_crossover():
    assert factored_crossover_tokens(8192, 3072, 1536, reuse=4) < factored_crossover_tokens(8192, 3072, 1536) / 3.9


def test_a_wide_head_at_full_width_is_always_cheaper_factored():
    # out > 3 d_T at d_S = d_T: the generated form's (out x d_S) weight gradient alone costs more
    assert factored_crossover_tokens(4 * 256, 256, 256) == float("inf")
    assert factored_flops(10**6, 4 * 256, 256, 256) < generated_flops(10**6, 4 * 256, 256, 256, reuse=10**9)
