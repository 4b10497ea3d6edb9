"""`--init refit`: least-squares refit of each layer's projections after pca (lrc.student.refit)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_teacher, packed_batch

from lrc.methods.lrc import LRC
from lrc.model.clone import LowRankClone
from lrc.model.losses import LossWeights
from lrc.student import refit as refit_mod
from lrc.student.init import init_pca
from lrc.student.refit import refit_projections


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
        refit_projections(clone, calib, _batches(n=1, seed=40), guard=guard, ridge=1e-6)
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
            info = refit_projections(clone, calib, _batches(n=1, batch=8, seed=60))
            assert info["refit_kept"] and info["heldout_kl_refit"] < info["heldout_kl_pca"]
        kl[init] = _kl(clone, held_out)
    assert kl["refit"] < kl["pca"]


def test_refit_is_undone_when_it_does_not_help(monkeypatch):
    teacher = make_teacher("llama", False)
    calib = _batches()
    clone = LowRankClone(teacher, 16)
    init_pca(clone, calib)
    pca = {k: v.clone() for k, v in clone.trainable_state_dict().items()}
    losses = iter([1.0, 2.0])  # the refit made the calibration loss worse
    monkeypatch.setattr(refit_mod, "calibration_loss", lambda clone, batches, **kw: next(losses))
    info = refit_projections(clone, calib, _batches(n=1, seed=40))
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
    from lrc.model.precision import upcast_frozen_modules

    teacher = make_teacher("qwen3", False).to(torch.bfloat16)
    if upcast:  # as loading does under --precision fp32: the bf16-stored teacher computes in fp32
        upcast_frozen_modules(teacher)
    calib = _batches()
    clone = LowRankClone(teacher, 16)
    init_pca(clone, calib)
    info = refit_projections(clone, calib, _batches(n=1, seed=40), dtype=torch.bfloat16)
    assert info["heldout_kl_refit"] < info["heldout_kl_pca"] and info["refit_kept"]



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


def _layer_inputs_seen(monkeypatch) -> dict[int, list[torch.Tensor]]:
    """The residual stream each teacher layer is run on during a refit, by teacher layer index."""
    seen: dict[int, list[torch.Tensor]] = {}
    real = refit_mod._teacher_layer

    def spy(clone, j, b, capture=True):
        seen.setdefault(j, []).append(b.x_t.clone())
        return real(clone, j, b, capture)

    monkeypatch.setattr(refit_mod, "_teacher_layer", spy)
    return seen


@pytest.mark.parametrize("family,overrides,drop", [
    ("llama", {"num_hidden_layers": 3}, (0,)),  # layer 0 dropped: the first kept layer's input is not the embedding
    ("llama", {"num_hidden_layers": 3}, (1,)),
    # Qwen2 with sliding-window layers after the first: each layer must get its own mask
    ("qwen2", {"num_hidden_layers": 3, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, ()),
    ("mistral", {"num_hidden_layers": 2}, ()),
])
def test_refit_fits_each_kept_layer_on_the_full_teachers_real_input(monkeypatch, family, overrides, drop):
    """Student layer i is fitted to the full teacher's layer kept_layers[i] as the full teacher runs it: the
    stream each teacher layer is run on is the full teacher's hidden state there (dropped layers included,
    every layer with its own attention arguments)."""
    teacher = make_teacher(family, False, **overrides)
    n = teacher.config.num_hidden_layers
    kept = [i for i in range(n) if i not in drop]
    calib = _batches(n=1, batch=2, seq=16)
    clone = LowRankClone(teacher, 32, kept_layers=kept)
    init_pca(clone, calib)
    seen = _layer_inputs_seen(monkeypatch)
    refit_projections(clone, calib)
    with torch.no_grad():
        states = teacher.model(**calib[0], output_hidden_states=True, use_cache=False).hidden_states
    assert sorted(seen) == list(range(max(kept) + 1))
    for j, inputs in seen.items():
        assert torch.allclose(inputs[0], states[j].float(), atol=1e-5), j


def test_refit_with_layer_0_dropped_starts_closer_to_the_full_teacher(monkeypatch):
    teacher = make_teacher("llama", False, num_hidden_layers=3)
    calib, held_out = _batches(n=4, batch=8), _batches(n=1, batch=8, seed=70)[0]
    kl = {}
    for init in ("pca", "refit"):
        clone = LowRankClone(teacher, 48, kept_layers=[1, 2])
        init_pca(clone, calib)
        if init == "refit":
            refit_projections(clone, calib, guard=False)
        kl[init] = _kl(clone, held_out)
    assert kl["refit"] < kl["pca"]


def test_the_guard_judges_the_refit_on_held_out_tokens():
    """Fitted on far fewer tokens than dimensions, the refit reproduces its own calibration batch better than
    pca but held-out text worse: an in-sample guard keeps it, the held-out one restores pca."""
    teacher = make_teacher("llama", False)
    fit = _batches(n=1, batch=1, seq=12)  # 12 tokens for 64 dimensions
    check = _batches(n=2, batch=4, seq=32, seed=80)
    clone = LowRankClone(teacher, 48)
    init_pca(clone, fit)
    pca = {k: v.clone() for k, v in clone.trainable_state_dict().items()}
    in_sample_pca = refit_mod.calibration_loss(clone, fit)
    info = refit_projections(clone, fit, check, ridge=1e-9)
    assert info["heldout_kl_refit"] > info["heldout_kl_pca"] and info["refit_kept"] is False
    assert all(torch.equal(pca[k], v) for k, v in clone.trainable_state_dict().items())
    refit_projections(clone, fit, guard=False, ridge=1e-9)  # what the in-sample guard compared
    assert refit_mod.calibration_loss(clone, fit) < in_sample_pca


def test_calibration_size_scales_with_the_teachers_width():
    fit, check = refit_mod.calibration_sequences(d_t=4096, seq_len=2048, batch=8, min_batches=8)
    assert fit * 2048 >= refit_mod.FIT_TOKENS_PER_DIM * 4096 and fit % 8 == 0
    assert check >= 8 and check % 8 == 0 and check >= refit_mod.CHECK_SHARE * fit
    assert refit_mod.calibration_sequences(d_t=64, seq_len=128, batch=4, min_batches=8) == (32, 8)
