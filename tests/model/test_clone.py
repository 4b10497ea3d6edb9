"""The LRC engine against closed forms: identity clone == teacher, pca at full rank, export == student."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import assert_gradients_close, make_teacher, packed_batch
from transformers import AutoModelForCausalLM

import lrc.model.clone
from lrc.config import RunConfig
from lrc.errors import UserError
from lrc.methods.lrc import LRC
from lrc.methods.registry import build_method
from lrc.model.clone import LowRankClone
from lrc.model.export import export_student
from lrc.model.losses import LossWeights, TokenCounts
from lrc.model.precision import autocast
from lrc.model.weights import StepWeights, generate_weights
from lrc.student.init import init_identity, init_pca, init_random

# Relative gradient tolerance (per tensor, against its own norm) for fp32 paths that differ only in the order
# of operations: the worst measured is 7e-7 (P_down); 1e-5 leaves 14x margin and catches an error of 0.001%
# of a gradient, where the old absolute 1e-5 let through errors as large as P_down's gradients themselves.
GRAD_RTOL = 1e-5


def teacher_logits(teacher, ids, pos):
    # use_cache=False: with a cache transformers does not detect packed documents from position_ids
    return teacher(input_ids=ids, position_ids=pos, use_cache=False).logits


def test_identity_projections_reproduce_teacher(teacher):
    clone = LowRankClone(teacher, teacher.config.hidden_size)
    init_identity(clone)
    ids, pos = packed_batch()
    diff = (clone.student_logits(ids, pos) - teacher_logits(teacher, ids, pos)).abs().max()
    assert diff <= 1e-5


def test_packed_documents_do_not_see_each_other(teacher):
    clone = LowRankClone(teacher, teacher.config.hidden_size)
    init_identity(clone)
    ids, pos = packed_batch()
    cut = int((pos[0] == 0).nonzero()[1])
    whole = clone.student_logits(ids, pos)
    second = clone.student_logits(ids[:, cut:], pos[:, cut:])
    assert (whole[:, cut:] - second).abs().max() <= 1e-5


def test_pca_full_rank(teacher):
    clone = LowRankClone(teacher, teacher.config.hidden_size)
    ids, pos = packed_batch()
    info = init_pca(clone, [{"input_ids": ids, "position_ids": pos}])
    assert info["energy_kept"] == pytest.approx(1.0, abs=1e-9)
    ref = teacher_logits(teacher, ids, pos)
    got = clone.student_logits(ids, pos)
    if not clone.tied:
        assert (got - ref).abs().max() <= 1e-4
    else:
        # Tied head: the final gain is approximated by diag(U^T G U) (spec section 4). What is exact is the
        # residual stream: the student's stream is the teacher's rotated into the U basis, so the final
        # hidden state *before* the final norm matches, and with a constant final gain logits match too.
        t2 = copy.deepcopy(teacher)
        with torch.no_grad():
            t2.model.norm.weight.fill_(0.7)
        clone2 = LowRankClone(t2, t2.config.hidden_size)
        init_pca(clone2, [{"input_ids": ids, "position_ids": pos}])
        assert (clone2.student_logits(ids, pos) - teacher_logits(t2, ids, pos)).abs().max() <= 1e-4


def test_pca_half_width_keeps_most_energy_and_beats_random():
    teacher = make_teacher("llama", False)
    ids, pos = packed_batch(batch=4, seq=32)
    kl = {}
    for init in ("pca", "random"):
        clone = LowRankClone(teacher, 32)
        if init == "pca":
            info = init_pca(clone, [{"input_ids": ids, "position_ids": pos}])
            assert 0.5 < info["energy_kept"] < 1.0
        else:
            init_random(clone, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            kl[init] = LRC(clone, LossWeights(clone=0))(ids, position_ids=pos).terms["kl"].item()
    # a random teacher's next-token CE is near log V for any student; its distribution is what pca keeps
    assert kl["pca"] < 0.5 * kl["random"]


def _train_a_few_steps(clone, ids, pos, steps=3):
    opt = torch.optim.AdamW([p for p in clone.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        LRC(clone)(ids, position_ids=pos).loss.backward()
        opt.step()


@pytest.mark.parametrize("family,tied", [("llama", True), ("qwen2", False), ("qwen3", True), ("mistral", False)])
def test_export_equals_trained_student(tmp_path, family, tied):
    teacher = make_teacher(family, tied)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    clone = LowRankClone(teacher, 40)
    ids, pos = packed_batch()
    init_pca(clone, [{"input_ids": ids, "position_ids": pos}])
    _train_a_few_steps(clone, ids, pos)

    trainable = {n for n, p in clone.named_parameters() if p.grad is not None}
    assert trainable and all(not n.startswith("teacher.") for n in trainable)
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k

    export_student(clone, tmp_path / "student")
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "student", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    cfg = model.config
    assert cfg.model_type == family and cfg.hidden_size == 40 and cfg.head_dim == 16
    assert cfg.tie_word_embeddings == tied
    assert cfg.num_key_value_heads == teacher.config.num_key_value_heads
    assert cfg.intermediate_size == teacher.config.intermediate_size
    got = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert (got - clone.student_logits(ids, pos)).abs().max() <= 1e-4
    out = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_trainable_parameters_are_projections_and_norms():
    teacher = make_teacher("qwen2", False)
    d_t, d_s = 64, 24
    clone = LowRankClone(teacher, d_s)
    n_layers = teacher.config.num_hidden_layers
    expected = (7 * n_layers + 2) * d_t * d_s + (2 * n_layers + 1) * d_s  # + head: untied teacher
    assert sum(p.numel() for p in clone.parameters() if p.requires_grad) == expected
    assert set(clone.trainable_state_dict()) == {n for n, p in clone.named_parameters() if p.requires_grad}


def test_zero_weight_clone_terms_are_not_computed():
    teacher = make_teacher("llama", False)
    ids, pos = packed_batch()
    w = LossWeights(q=0.0, k=0.0, attn_out=0.0)
    out = LRC(LowRankClone(teacher, 32), w)(ids, position_ids=pos)
    assert {"clone/v", "clone/gate", "clone/up", "clone/ffn_out"} <= set(out.terms)
    assert not {"clone/q", "clone/k", "clone/attn_out"} & set(out.terms)
    out = LRC(LowRankClone(teacher, 32), LossWeights(clone=0.0, kl=0.0))(ids, position_ids=pos)
    assert set(out.terms) == {"ce", "kl"} and out.terms["kl"] == 0
    assert out.loss.item() == pytest.approx(out.terms["ce"].item())


def test_clone_terms_vanish_for_identity_clone():
    teacher = make_teacher("qwen3", False)
    clone = LowRankClone(teacher, 64)
    init_identity(clone)
    ids, pos = packed_batch()
    out = LRC(clone)(ids, position_ids=pos)
    for k, v in out.terms.items():
        if k.startswith("clone") or k == "kl":
            assert abs(v.item()) < 1e-8, k
    assert math.isfinite(out.terms["ce"].item())


def test_hidden_size_out_of_range_is_a_user_error():
    teacher = make_teacher("llama", False)
    with pytest.raises(UserError, match="hidden-size"):
        LowRankClone(teacher, 65)
    with pytest.raises(UserError, match="hidden-size"):
        LowRankClone(teacher, 0)


def test_unsupported_family_lists_supported():
    from transformers import GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UserError, match="llama, mistral, qwen2, qwen3"):
        LowRankClone(model, 16)


@pytest.mark.parametrize("factored", [(), ("head",), ("q", "gate", "down", "head")])
def test_reused_step_weights_and_naive_path_give_the_same_losses_and_gradients(factored):
    """Optimised path (weights generated once per step, some roles and the head factored, fused chunked loss)
    == naive path (generated per micro-batch, full logits), for two accumulated micro-batches, fp32."""
    teacher = make_teacher("qwen2", False)
    batches = [packed_batch(seed=s) for s in (1, 2)]
    grads, losses = {}, {}
    for variant in ("naive", "optimised"):
        torch.manual_seed(0)
        clone = LowRankClone(teacher, 40)
        method = LRC(clone, fused_loss=variant == "optimised", chunk_size=7)
        init_random(clone, generator=torch.Generator().manual_seed(0))
        step = None
        if variant == "optimised":
            clone.set_factored(factored)
            step = StepWeights(clone)
        total = 0.0
        n = sum(ids.numel() for ids, _ in batches)
        for ids, pos in batches:
            out = method(ids, position_ids=pos, step_tokens=TokenCounts(ce=80.0, kl=n, clone=n), step=step)
            out.loss.backward()
            total += out.loss.item()
        if step:
            step.finish()
        losses[variant] = total
        grads[variant] = {n: p.grad.clone() for n, p in clone.named_parameters() if p.grad is not None}
    assert losses["naive"] == pytest.approx(losses["optimised"], abs=1e-5)
    assert_gradients_close(grads["optimised"], grads["naive"], rtol=GRAD_RTOL)


@pytest.mark.parametrize("tied", [False, True])
def test_factored_projections_equal_generated_and_export_generates(tmp_path, tied):
    teacher = make_teacher("qwen2", tied)  # biases on q/k/v
    ids, pos = packed_batch()
    grads, losses = {}, {}
    for variant in ("generated", "factored"):
        clone = LowRankClone(teacher, 40)
        init_random(clone, generator=torch.Generator().manual_seed(0))
        if variant == "factored":
            clone.set_factored(["q", "k", "v", "o", "gate", "up", "down", "head"])
        out = LRC(clone)(ids, position_ids=pos)
        out.loss.backward()
        losses[variant] = out.loss.item()
        grads[variant] = {n: p.grad for n, p in clone.named_parameters() if p.grad is not None}
    assert losses["generated"] == pytest.approx(losses["factored"], abs=1e-5)
    assert_gradients_close(grads["factored"], grads["generated"], rtol=GRAD_RTOL)
    export_student(clone, tmp_path / "s")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert (model(input_ids=ids, position_ids=pos, use_cache=False).logits
            - clone.student_logits(ids, pos)).abs().max() <= 1e-4


def test_projection_plan_follows_the_cost_model():
    teacher = make_teacher("llama", False)  # d_T 64, d_S 32: crossovers of a few dozen tokens
    clone = LowRankClone(teacher, 32)
    assert set(clone.plan_projections(8).values()) == {"factored"}
    assert set(clone.plan_projections(4096).values()) == {"generated"}
    assert clone.factored == frozenset()


@pytest.mark.parametrize("method", ["lrc", "kd"])
def test_gradient_checkpointing_gives_the_same_losses_and_gradients(method):
    """LRC layers are recomputed in backward with this call's generated weights, and the clone hooks re-run
    there; two steps in a row check that a previous step's hooks do not leak into the next."""

    teacher = make_teacher("qwen3", False)
    ids, pos = packed_batch()
    result = {}
    for ckpt in (False, True):
        model, _ = build_method(RunConfig(teacher="t", hidden_size=40, method=method, init="random",
                                          grad_checkpointing=ckpt), teacher, calibration=lambda: [])
        model.train()
        for _ in range(2):
            out = model(ids, position_ids=pos)
            out.loss.backward()
        result[ckpt] = (out.loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert result[True][0] == pytest.approx(result[False][0], abs=1e-6)
    assert_gradients_close(result[True][1], result[False][1], rtol=GRAD_RTOL)


@pytest.mark.parametrize("family, tied, ffn_size", [("llama", False, None), ("llama", False, 48),
                                                    ("qwen3", True, None), ("qwen3", True, 48)])
@pytest.mark.parametrize("accum, recompute", [(1, False), (2, False), (2, True)])
def test_per_layer_generation_under_checkpointing_equals_the_whole_generation(family, tied, ffn_size, accum,
                                                                            recompute, monkeypatch):
    """With gradient checkpointing each layer generates its own weights inside the checkpointed layer (and
    again in backward, per micro-batch); the losses and every trainable's gradient equal today's path, which
    generates every layer up front (and keeps the step's weights over the micro-batches)."""

    teacher = make_teacher(family, tied)
    batches = [packed_batch(seed=s) for s in range(accum)]
    per_layer_calls = []
    layer_weights = lrc.model.clone.generate_layer_weights
    monkeypatch.setattr(lrc.model.clone, "generate_layer_weights",
                        lambda clone, i: per_layer_calls.append(i) or layer_weights(clone, i))
    # and with --recompute-targets the clone targets with them: each layer's teacher layer runs again from its
    # recorded input
    target_calls = []
    layer_targets = lrc.model.clone.teacher_layer_activations
    monkeypatch.setattr(lrc.model.clone, "teacher_layer_activations",
                        lambda layer, fam, i, *a: target_calls.append(i) or layer_targets(layer, fam, i, *a))
    result = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model, _ = build_method(RunConfig(teacher="t", method="lrc", hidden_size=40, init="random", ffn_size=ffn_size,
                                          grad_checkpointing=ckpt, recompute_targets=ckpt and recompute),
                                teacher, calibration=lambda: [])
        model.train()
        step = model.begin_step(accum)
        losses = []
        for ids, pos in batches:
            out = model(ids, position_ids=pos, step=step)
            (out.loss / accum).backward()
            losses.append(out.loss.item())
        model.finish_step(step)
        # nothing recomputes after the step's backward: the recorded teacher inputs are not held to the update
        left = model.clone.forward_state
        assert left.calls is None and not left.teacher_acts and not left.mapped
        result[ckpt] = (losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    # generated per layer only under checkpointing: in forward, then again in the backward's recompute
    assert per_layer_calls == [0, 1, 1, 0] * accum
    assert target_calls == ([0, 1, 1, 0] if recompute else []) * accum
    assert result[True][0] == pytest.approx(result[False][0], rel=1e-5)
    assert_gradients_close(result[True][1], result[False][1], rtol=GRAD_RTOL)


def test_given_weights_are_used_after_a_checkpointed_training_forward():
    """student_final_hidden(weights=...) (the refit's check of the rounded student) runs on the weights it is
    given even after a training forward that generated each layer's own (gradient checkpointing)."""

    ids, pos = packed_batch()
    model, _ = build_method(RunConfig(teacher="t", method="lrc", hidden_size=40, init="random",
                                      grad_checkpointing=True), make_teacher("llama", False), calibration=lambda: [])
    model.train()
    model(ids, position_ids=pos).loss.backward()
    clone = model.clone
    with torch.no_grad():
        weights = generate_weights(clone, all_generated=True)
        own = clone.student_final_hidden(ids, pos, weights=weights)
        changed = {k: 2 * v if k.endswith("q_proj.weight") else v for k, v in weights.items()}
        assert not torch.allclose(clone.student_final_hidden(ids, pos, weights=changed), own)
        assert torch.allclose(clone.student_final_hidden(ids, pos), own, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_recomputed_clone_targets_equal_kept_ones_for_a_bf16_teacher(precision):
    """--recompute-targets on a bf16 teacher, under fp32 compute (the teacher layer cast per use) and under bf16
    autocast (restored by the checkpoint for the recompute): the same loss, clone terms and gradients as keeping
    every layer's targets, with checkpointing in both."""

    teacher = make_teacher("qwen3", False).to(torch.bfloat16)
    ids, pos = packed_batch()
    result = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model, _ = build_method(RunConfig(teacher="t", method="lrc", hidden_size=40, init="random",
                                          grad_checkpointing=True, recompute_targets=recompute),
                                teacher, calibration=lambda: [])
        model.train()
        with autocast(precision, torch.device("cpu")):
            out = model(ids, position_ids=pos)
        out.loss.backward()
        result[recompute] = (out.loss.item(), {k: float(v) for k, v in out.terms.items()},
                             {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (loss_a, terms_a, grads_a), (loss_b, terms_b, grads_b) = result[False], result[True]
    assert terms_a.keys() == terms_b.keys() and any(k.startswith("clone/") for k in terms_a)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    for k in terms_a:
        assert terms_b[k] == pytest.approx(terms_a[k], rel=1e-6, abs=1e-9), k
    assert_gradients_close(grads_b, grads_a, rtol=GRAD_RTOL)
