from lrc.model.costs import factored_crossover_tokens, factored_flops, generated_flops, lrc_step_floor


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


def test_step_floor_falls_with_tokens_and_reuse_towards_one():
    args = dict(d_t=1024, d_s=512, role_outs=[1024, 256, 256, 1024, 2816, 2816, 2816], vocab=32000, layers=8)
    floors = [lrc_step_floor(n, reuse=r, **args) for n, r in [(512, 1), (512, 4), (8192, 4), (10**7, 10**6)]]
    assert floors == sorted(floors, reverse=True)
    assert floors[0] > 1.4 and 1.0 < floors[-1] < 1.06  # what remains: the clone targets through P_o / P_down
