"""Teachers stored in bf16/fp16 under fp32 and bf16 precision: what computes in which dtype, and what must
stay fp32 (trainables, their gradients, the weights reused across micro-batches)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_teacher, packed_batch

from lrc.data.batch import next_token_labels
from lrc.errors import UserError
from lrc.methods.lrc import LRC
from lrc.model.clone import LowRankClone
from lrc.model.losses import TokenCounts
from lrc.model.precision import checkpoint_dtype, upcast_frozen_modules
from lrc.model.weights import StepWeights, generate_weights
from lrc.student.init import init_identity, init_pca


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def stored_in(teacher, dtype):
    """(teacher stored in `dtype` and hooked to compute in fp32, fp32 reference with the same rounded values)."""
    low = copy.deepcopy(teacher).to(dtype)
    reference = copy.deepcopy(low).float()
    upcast_frozen_modules(low)
    return low, reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_teacher_computes_in_fp32(dtype):
    # Catches a teacher that computes in its storage dtype (bf16 logits differ by ~1e-2 here) and hooks that
    # leave fp32 copies behind (the parameters must still be stored in `dtype` afterwards).
    low, reference = stored_in(make_teacher("qwen2", tied=True), dtype)
    ids, pos = packed_batch()
    with torch.no_grad():
        got = low(input_ids=ids, position_ids=pos, use_cache=False).logits
        want = reference(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5
    assert {p.dtype for p in low.parameters()} == {dtype}


def test_hooks_restore_the_stored_weights_when_a_forward_fails():
    low, _ = stored_in(make_teacher("llama"), torch.bfloat16)
    with pytest.raises(IndexError), torch.no_grad():
        low(input_ids=torch.tensor([[10**6]]))  # out of the vocabulary: the embedding raises
    with torch.no_grad():
        low.model.layers[0].mlp.down_proj(torch.randn(2, low.config.intermediate_size))
        with pytest.raises(RuntimeError):
            low.model.layers[0].mlp.down_proj(torch.randn(2, 3))  # wrong width: F.linear raises mid-forward
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("family,tied", [("llama", False), ("mistral", True), ("qwen2", True), ("qwen3", False)])
def test_identity_clone_of_a_bf16_teacher_equals_it_in_fp32(family, tied):
    # Every path where a bf16 teacher tensor meets fp32 student tensors (embedding rows, biases, q/k norms,
    # generated and factored matrices, the head) must compute in fp32: the identity clone then equals the
    # fp32 teacher with the same (rounded) weights, as it does for an fp32 teacher.
    low, reference = stored_in(make_teacher(family, tied), torch.bfloat16)
    ids, pos = packed_batch()
    want = reference(input_ids=ids, position_ids=pos, use_cache=False).logits
    for factored in (set(), {"q", "o", "gate", "down", "head"}):
        clone = LowRankClone(low, low.config.hidden_size)
        init_identity(clone)
        clone.set_factored(factored)
        out = LRC(clone)(ids, position_ids=pos)  # the training forward, factored roles included
        assert torch.isfinite(out.loss)
        assert out.terms["kl"] <= 1e-6 and out.terms["clone"] <= 1e-9
        assert (clone.student_logits(ids, pos) - want).abs().max() <= 1e-4


def gradients(clone, ids, pos, accum: int, precision: str):
    """Gradients of one optimizer step of `accum` micro-batches (the trainer's protocol)."""
    clone.zero_grad(set_to_none=True)
    method = LRC(clone)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        step = StepWeights(clone)
        dtypes = {w.dtype for w in step.weights.values() if w.requires_grad} | {step.head.dtype}
        whole = TokenCounts.of_batch(next_token_labels(ids, pos))
        for j in range(accum):
            method(ids[j::accum], position_ids=pos[j::accum], step=step, step_tokens=whole).loss.backward()
    step.finish()
    return {n: p.grad.clone() for n, p in clone.named_parameters() if p.requires_grad}, dtypes


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainables_gradients_and_reused_weights_stay_fp32(precision):
    # Catches generated weights reused across micro-batches in bf16 (their gradients would then accumulate
    # in bf16) and trainables or gradients that leave fp32.
    low, _ = stored_in(make_teacher("qwen3"), torch.bfloat16)
    clone = LowRankClone(low, 32)
    ids, pos = packed_batch(batch=4)
    init_pca(clone, [{"input_ids": ids, "position_ids": pos}])
    grads, reused = gradients(clone, ids, pos, accum=2, precision=precision)
    assert reused == {torch.float32}
    assert {p.dtype for p in clone.parameters() if p.requires_grad} == {torch.float32}
    assert {g.dtype for g in grads.values()} == {torch.float32}
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_bf16_gradients_agree_with_fp32():
    # One step's gradients under bf16 autocast against fp32 on the same bf16-stored teacher. Tolerance: bf16
    # keeps 8 significant bits (relative rounding 2^-9 = 0.2% per operand); through a few matmuls with fp32
    # accumulation, gradients of this tiny model differ by a few percent of their norm. 10% of the norm still
    # catches a wrong scale, a dropped term or a gradient lost in a cast (those are O(100%)).
    low, _ = stored_in(make_teacher("llama"), torch.bfloat16)
    clone = LowRankClone(low, 32)
    ids, pos = packed_batch(batch=4)
    init_pca(clone, [{"input_ids": ids, "position_ids": pos}])
    g32, _ = gradients(clone, ids, pos, accum=2, precision="fp32")
    g16, _ = gradients(clone, ids, pos, accum=2, precision="bf16")
    num = torch.sqrt(sum(((g32[k] - g16[k]) ** 2).sum() for k in g32))
    den = torch.sqrt(sum((g ** 2).sum() for g in g32.values()))
    assert num / den <= 0.1, float(num / den)


def test_generation_keeps_no_fp32_copy_of_teacher_matrices():
    # W_T (bf16) @ P (fp32) runs in fp32; what autograd saves for the backward must not include an fp32 copy
    # of W_T (for an 8B teacher that would be 2x its bf16 size, alive for the whole step).
    low, _ = stored_in(make_teacher("llama"), torch.bfloat16)
    clone = LowRankClone(low, 32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        generate_weights(clone)
    teacher_shapes = {tuple(p.shape) for p in low.parameters()}
    big_fp32 = [t for t in saved if t.dtype == torch.float32 and tuple(t.shape) in teacher_shapes
                and t.numel() > 64 * 64]
    assert not big_fp32, [tuple(t.shape) for t in big_fp32]


def test_checkpoint_dtype_reads_config():
    cfg = make_teacher("llama").config
    cfg.dtype = "bfloat16"
    assert checkpoint_dtype(cfg) == torch.bfloat16
    cfg.dtype = torch.float16
    assert checkpoint_dtype(cfg) == torch.float16
    cfg.dtype = None
    assert checkpoint_dtype(cfg) == torch.float32


# ------------------------------------------------------------------------------ evaluation mode, norms


def test_evaluation_is_deterministic_with_attention_dropout():
    # A teacher with attention dropout: in eval mode neither the teacher nor the student shell may drop
    # anything (the shell lives outside the module tree, so .eval() must reach it); while training, the
    # frozen teacher stays in eval mode (its logits are the KL target).
    teacher = make_teacher("llama", attention_dropout=0.5)
    clone = LowRankClone(teacher, 32)
    ids, pos = packed_batch()
    init_pca(clone, [{"input_ids": ids, "position_ids": pos}])
    method = LRC(clone)
    method.eval()
    with torch.no_grad():
        a, b = method(ids, position_ids=pos), method(ids, position_ids=pos)
    assert a.loss == b.loss
    method.train()
    assert not teacher.training and clone._shell.training
    with torch.no_grad():
        t1 = teacher(input_ids=ids, position_ids=pos, use_cache=False).logits
        t2 = teacher(input_ids=ids, position_ids=pos, use_cache=False).logits
        c, d = method(ids, position_ids=pos), method(ids, position_ids=pos)
    assert torch.equal(t1, t2)
    assert c.loss != d.loss  # the student itself trains with the config's dropout


def test_rms_norm_eps_changes_only_the_students_own_norms():
    teacher = make_teacher("llama")
    clone = LowRankClone(teacher, 32, rms_norm_eps=1e-3)
    layer = clone.shell_base.layers[0]
    assert layer.input_layernorm.variance_epsilon == 1e-3 and clone.shell_base.norm.variance_epsilon == 1e-3
    assert teacher.model.layers[0].input_layernorm.variance_epsilon == 1e-6
    assert teacher.config.rms_norm_eps == 1e-6
    # Qwen3's frozen q/k norms would take the student's epsilon in the exported config: refused.
    with pytest.raises(UserError, match="rms-norm-eps"):
        LowRankClone(make_teacher("qwen3"), 32, rms_norm_eps=1e-3)
    LowRankClone(make_teacher("qwen3"), 32, rms_norm_eps=1e-6)  # the teacher's own value is fine

