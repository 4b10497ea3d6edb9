"""--keep-clone-terms: the clone terms for free-weight students (kd from LRC's start, LRC after --free-after), the
same objective as LRC's, compared through the maps the clone had when it was multiplied out."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_gradients_close, make_teacher, packed_batch

from lrc.config import RunConfig
from lrc.methods.direct import ALIGNMENT, Direct
from lrc.methods.registry import build_method
from lrc.methods.switch import free_method, to_free_weights
from lrc.model.losses import CLONE_TERMS


def _cfg(method, **kw):
    return RunConfig(teacher="unused", hidden_size=40, method=method, keep_clone_terms=True, **kw)


def _calibration():
    ids, pos = packed_batch(seed=5)
    return lambda: [{"input_ids": ids, "position_ids": pos}]


def _attention_mask(ids):
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # right padding in one row: the clone terms average over valid tokens only
    return mask


@pytest.mark.parametrize("family, tied, ffn_size", [("llama", False, None), ("qwen3", True, 48)])
def test_kd_with_clone_terms_is_lrcs_objective_at_the_start(family, tied, ffn_size):
    # Same start, same maps, same objective: every term of the free student's loss equals LRC's before any
    # step. Catches a map on the wrong side, a term compared in the wrong space, a layer paired with another
    # teacher layer, or a term missing.
    teacher = make_teacher(family, tied)
    cfg = dict(init="refit", ffn_size=ffn_size, drop_layers="0") if ffn_size else dict(init="refit")
    kd, _ = build_method(_cfg("kd", **cfg), teacher, calibration=_calibration())
    lrc, _ = build_method(_cfg("lrc", **cfg), teacher, calibration=_calibration())
    assert isinstance(kd, Direct) and kd.alignment is not None
    ids, pos = packed_batch()
    mask = _attention_mask(ids)
    with torch.no_grad():
        got = kd(ids, position_ids=pos, attention_mask=mask)
        want = lrc(ids, position_ids=pos, attention_mask=mask)
    assert {f"clone/{t}" for t in CLONE_TERMS} <= set(want.terms)
    assert got.terms.keys() == want.terms.keys()
    for k, v in want.terms.items():
        assert float(got.terms[k]) == pytest.approx(float(v), rel=2e-4, abs=1e-7), k
    assert float(got.loss) == pytest.approx(float(want.loss), rel=2e-4)


def test_kd_without_clone_weight_or_from_random_or_by_default_has_no_clone_terms():
    teacher = make_teacher("llama", False)
    ids, pos = packed_batch()
    off, _ = build_method(_cfg("kd", init="pca", clone_weight=0.0), teacher, calibration=_calibration())
    rand, _ = build_method(_cfg("kd", init="random"), teacher, calibration=None)
    default, _ = build_method(RunConfig(teacher="unused", hidden_size=40, method="kd"), teacher,
                              calibration=_calibration())
    for method in (off, rand, default):
        assert isinstance(method, Direct) and method.alignment is None
        assert "clone" not in method(ids, position_ids=pos).terms
        assert not any(k.startswith(ALIGNMENT) for k in method.trainable_state_dict())


def test_clone_terms_under_gradient_checkpointing_give_the_same_loss_and_gradients():
    teacher = make_teacher("llama", False)
    ids, pos = packed_batch()
    results = []
    for checkpointing in (False, True):
        method, _ = build_method(_cfg("kd", init="pca", grad_checkpointing=checkpointing), teacher,
                                 calibration=_calibration())
        method.train()
        for _ in range(2):  # the second forward drops the hooks the first kept for its backward
            method.zero_grad()
            out = method(ids, position_ids=pos)
            out.loss.backward()
        grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
        results.append((out.loss.item(), grads))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert loss_ckpt == pytest.approx(loss, rel=1e-5)
    assert_gradients_close(grads_ckpt, grads, rtol=1e-4)


def test_a_checkpoint_keeps_the_maps_and_a_restored_student_has_the_same_loss():
    teacher = make_teacher("llama", False)
    cfg = _cfg("kd", init="refit")
    kd, _ = build_method(cfg, teacher, calibration=_calibration())
    state = kd.trainable_state_dict()
    assert any(k.startswith(ALIGNMENT) for k in state)
    restored, _ = build_method(cfg, teacher, calibration=None)  # how --resume builds it
    restored.load_trainable_state_dict(state)
    ids, pos = packed_batch()
    with torch.no_grad():
        assert float(restored(ids, position_ids=pos).loss) == pytest.approx(float(kd(ids, position_ids=pos).loss),
                                                                          rel=1e-6)
    # the export is the student alone
    assert not any(k.startswith(ALIGNMENT) for k in restored.student_model().state_dict())


def test_the_switch_to_free_weights_keeps_the_objective():
    # At the switch only the parametrisation changes: the free student's loss (clone terms included) is the
    # clone's, and a run restored after the switch rebuilds the same maps.
    teacher = make_teacher("llama", False)
    cfg = _cfg("lrc", init="pca", free_after=0.5)
    lrc, _ = build_method(cfg, teacher, calibration=_calibration())
    with torch.no_grad():
        for p in lrc.trainable_parameters():  # as if LRC had trained for a while
            p.add_(0.01 * torch.randn_like(p))
    free = to_free_weights(lrc, cfg, teacher)
    ids, pos = packed_batch()
    with torch.no_grad():
        want = lrc(ids, position_ids=pos)
        got = free(ids, position_ids=pos)
    assert "clone" in got.terms
    for k, v in want.terms.items():
        assert float(got.terms[k]) == pytest.approx(float(v), rel=2e-4, abs=1e-7), k
    restored = free_method(cfg, teacher)
    restored.load_trainable_state_dict(free.trainable_state_dict())
    with torch.no_grad():
        assert float(restored(ids, position_ids=pos).loss) == pytest.approx(float(got.loss), rel=1e-6)
