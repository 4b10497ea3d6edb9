"""Losses against closed forms on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from lrc.data.batch import next_token_labels
from lrc.model.losses import kd_lm_loss, masked_mse, reference_kd_lm_loss


def _inputs(n=13, v=11, ds=5, dt=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(n, ds, generator=g, dtype=torch.float64).requires_grad_()
    sw = torch.randn(v, ds, generator=g, dtype=torch.float64).requires_grad_()
    th = torch.randn(n, dt, generator=g, dtype=torch.float64)
    tw = torch.randn(v, dt, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[2, 7]] = -100
    mask = torch.ones(n, dtype=torch.bool)
    mask[[3, 9]] = False
    return sh, sw, th, tw, labels, mask


def test_kl_per_token_closed_form():
    # two tokens, vocab 2: KL(p || q) for Bernoulli distributions written out by hand
    p = torch.tensor([[0.8, 0.2], [0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.6, 0.4], [0.9, 0.1]], dtype=torch.float64)
    t_hidden, s_hidden = p.log(), q.log()  # logits = hidden @ I
    eye = torch.eye(2, dtype=torch.float64)
    labels = torch.tensor([0, 1])
    _, ce, kl = kd_lm_loss(s_hidden, eye, t_hidden, eye, labels, torch.ones(2, dtype=torch.bool))
    expected_kl = sum(
        sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr)) for pr, qr in zip(p.tolist(), q.tolist())
    ) / 2
    assert kl.item() == pytest.approx(expected_kl, rel=1e-12)
    assert ce.item() == pytest.approx(-(math.log(0.6) + math.log(0.1)) / 2, rel=1e-12)


def test_temperature_softens_both_sides():
    sh, sw, th, tw, labels, mask = _inputs()
    tau = 3.0
    _, _, kl = kd_lm_loss(sh, sw, th, tw, labels, mask, temperature=tau)
    # temperature tau on logits == temperature 1 on logits / tau
    _, _, kl1 = kd_lm_loss(sh / tau, sw, th / tau, tw, labels, mask, temperature=1.0)
    assert kl.item() == pytest.approx(kl1.item(), rel=1e-12)
    assert kl.item() < kd_lm_loss(sh, sw, th, tw, labels, mask)[2].item()


def test_masking_ignores_masked_tokens():
    sh, sw, th, tw, labels, mask = _inputs()
    _, ce, kl = kd_lm_loss(sh, sw, th, tw, labels, mask)
    keep = mask.clone()
    _, _, kl_sub = kd_lm_loss(sh[keep], sw, th[keep], tw, labels[keep], mask[keep])
    assert kl.item() == pytest.approx(kl_sub.item(), rel=1e-12)
    has = labels != -100
    _, ce_sub, _ = kd_lm_loss(sh[has], sw, th[has], tw, labels[has], mask[has])
    assert ce.item() == pytest.approx(ce_sub.item(), rel=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 13, 100])
def test_chunked_equals_unchunked_values_and_gradients(chunk):
    sh, sw, th, tw, labels, mask = _inputs()
    kw = dict(ce_weight=0.7, kl_weight=1.3, temperature=2.0)
    loss, ce, kl = kd_lm_loss(sh, sw, th, tw, labels, mask, chunk_size=chunk, **kw)
    g = torch.autograd.grad(loss * 2.5, (sh, sw))
    rloss, rce, rkl = reference_kd_lm_loss(sh, sw, th, tw, labels, mask, **kw)
    rg = torch.autograd.grad(rloss * 2.5, (sh, sw))
    for a, b in [(loss, rloss), (ce, rce), (kl, rkl), *zip(g, rg)]:
        assert (a - b).abs().max().item() <= 1e-6


def test_zero_kl_weight_needs_no_teacher():
    sh, sw, _, _, labels, mask = _inputs()
    loss, ce, kl = kd_lm_loss(sh, sw, None, None, labels, mask, kl_weight=0.0)
    assert kl.item() == 0.0 and loss.item() == pytest.approx(ce.item())


def test_masked_mse():
    s = torch.tensor([[[1.0, 2.0], [3.0, 5.0]]])
    t = torch.zeros_like(s)
    assert masked_mse(s, t, None).item() == pytest.approx((1 + 4 + 9 + 25) / 4)
    assert masked_mse(s, t, torch.tensor([[True, False]])).item() == pytest.approx(2.5)


def test_next_token_labels_stop_at_document_boundaries():
    ids = torch.tensor([[10, 11, 12, 20, 21]])
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    assert next_token_labels(ids, pos).tolist() == [[11, 12, -100, 21, -100]]
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert next_token_labels(ids, None, mask).tolist() == [[11, 12, 20, -100, -100]]
