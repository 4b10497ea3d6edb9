"""`--init refit`: least-squares refit of each layer's projections after pca (lrc.refit)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_teacher, packed_batch

from lrc import refit as refit_mod
from lrc.clone import LowRankClone
from lrc.init import init_pca
from lrc.losses import LossWeights
from lrc.methods import LRC
from lrc.refit import refit_projections


def _batches(n=2, batch=4, seq=32, seed=1):
    out = []
    for k in range(n):
        ids, pos = packed_batch(batch=batch, seq=seq, seed=seed + k)
        out.append({"input_ids": ids, "position_ids": pos})
    return out


def _kl(clone, batch) -> float:
    with torch.no_grad():
        return LRC(clone, LossWeights(clone=0))(batch["input_ids"], position_ids=batch["position_ids"]).terms["kl"]


def test_refit_full_width_equals_teacher(teacher):
    calib = _batches()
    if teacher.config.tie_word_embeddings:
        # as for pca: with a tied head the final gain is approximated by diag(U^T G U) unless it is constant
        teacher = copy.deepcopy(teacher)
        with torch.no_grad():
            teacher.model.norm.weight.fill_(0.7)
    ids, pos = packed_batch(batch=2, seq=24, seed=9)
    ref = teacher(input_ids=ids, position_ids=pos, use_cache=False).logits
    for guard in (True, False):
        clone = LowRankClone(teacher, teacher.config.hidden_size)
        init_pca(clone, calib)
        # guarded (the product) and unguarded: the regressions themselves return the teacher's
        # maps up to the ridge (guarded alone, a wrong refit would fall back to pca and pass)
        refit_projections(clone, calib, guard=guard)
        assert (clone.student_logits(ids, pos) - ref).abs().max() <= 1e-3  # the ridge: 3e-4 measured


@pytest.mark.parametrize("family,width", [("llama", 16), ("qwen3", 16), ("qwen2", 8)])
def test_refit_starts_closer_to_the_teacher_than_pca(family, width):
    teacher = make_teacher(family, False)
    calib, held_out = _batches(n=4, batch=8), _batches(n=1, seed=50)[0]
    kl = {}
    for init in ("pca", "refit"):
        clone = LowRankClone(teacher, width)
        init_pca(clone, calib)
        if init == "refit":
            info = refit_projections(clone, calib)
            assert info["refit_kept"] and info["calib_kl_refit"] <= info["calib_kl_pca"]
        kl[init] = _kl(clone, held_out)
    assert kl["refit"] < kl["pca"]


def test_refit_is_undone_when_it_does_not_help(monkeypatch):
    teacher = make_teacher("llama", False)
    calib = _batches()
    clone = LowRankClone(teacher, 16)
    init_pca(clone, calib)
    pca = {k: v.clone() for k, v in clone.trainable_state_dict().items()}
    losses = iter([1.0, 2.0])  # the refit made the calibration loss worse
    monkeypatch.setattr(refit_mod, "calibration_loss", lambda clone, batches: next(losses))
    info = refit_projections(clone, calib)
    assert info["refit_kept"] is False
    for k, v in clone.trainable_state_dict().items():
        assert torch.equal(v, pca[k]), k


def test_refit_is_deterministic():
    teacher = make_teacher("qwen3", True)
    calib = _batches()
    states = []
    for _ in range(2):
        clone = LowRankClone(teacher, 24)
        init_pca(clone, calib)
        refit_projections(clone, calib)
        states.append(clone.trainable_state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


@pytest.mark.parametrize("upcast", [True, False])
def test_refit_runs_on_a_bf16_teacher(upcast):
    from lrc.precision import upcast_frozen_modules

    teacher = make_teacher("qwen3", False).to(torch.bfloat16)
    if upcast:  # as loading does under --precision fp32: the bf16-stored teacher computes in fp32
        upcast_frozen_modules(teacher)
    calib = _batches()
    clone = LowRankClone(teacher, 16)
    init_pca(clone, calib)
    info = refit_projections(clone, calib)
    assert info["calib_kl_refit"] < info["calib_kl_pca"] and info["refit_kept"]



def test_refit_keeps_pca_for_a_narrower_ffn():
    """The refit's passes run the teacher's full-width MLP; a student with its own FFN width keeps pca's start."""
    teacher = make_teacher("llama", False)
    clone = LowRankClone(teacher, 32, ffn_size=48)
    calib = _batches()
    init_pca(clone, calib)
    before = {k: v.clone() for k, v in clone.trainable_state_dict().items()}
    info = refit_projections(clone, calib)
    assert info["refit_kept"] is False and "ffn" in str(info["refit_skipped"])
    assert all(torch.equal(before[k], v) for k, v in clone.trainable_state_dict().items())
