"""`lrc plan`: parameter counts against real models, the generated/factored choice against the clone's own, the
activation model against the tensors autograd really saves, how parts divide over processes, and an 8B
plan in seconds from a config alone."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import make_teacher, packed_batch
from transformers import LlamaConfig

from lrc.cli import main
from lrc.config import RunConfig
from lrc.methods.lrc import LRC
from lrc.model.clone import LowRankClone
from lrc.model.export import build_student_model
from lrc.model.precision import upcast_frozen_modules
from lrc.plan.estimate import plan_from_config
from lrc.plan.memory import GiB, activation_bytes
from lrc.plan.report import startup_summary
from lrc.plan.shape import Shape, choose_roles, shape_of, trainable_params

ALL_TERMS = {"q", "k", "v", "gate", "up", "attn_out", "ffn_out"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def cfg_for(teacher="t", **kw) -> RunConfig:
    values = dict(teacher=teacher, method="lrc", hidden_size=32, batch_size=2, seq_len=24, precision="fp32",
                  device="cpu")
    values.update(kw)
    return RunConfig(**values)


def _gib_parts(plan) -> dict[str, float]:
    return {p.name: p.bytes / GiB for p in plan.memory}


@pytest.mark.parametrize("family,tied", [("llama", False), ("mistral", True), ("qwen2", True), ("qwen3", False)])
def test_parameter_counts_equal_those_of_the_real_models(family, tied):
    teacher = make_teacher(family, tied)
    plan = plan_from_config(teacher.config, cfg_for(), teacher_dtype="float32")
    clone = LowRankClone(teacher, 32)
    assert plan.teacher_params == sum(p.numel() for p in teacher.parameters())
    assert plan.student_params == sum(p.numel() for p in build_student_model(clone).parameters())
    assert plan.trainable_params == sum(p.numel() for p in clone.parameters() if p.requires_grad)
    assert plan.shape.tied == tied
    assert plan.student_share == pytest.approx(plan.student_params / plan.teacher_params)


@pytest.mark.parametrize("tokens,reuse", [(8, 1), (48, 1), (48, 4), (200, 1), (4096, 1), (64, 16)])
def test_roles_are_the_ones_the_clone_chooses(tokens, reuse):
    teacher = make_teacher("llama", False)
    clone = LowRankClone(teacher, 32)
    cfg = teacher.config
    shape = Shape(cfg.num_hidden_layers, cfg.hidden_size, 32, cfg.num_attention_heads, cfg.num_key_value_heads,
                  cfg.head_dim, cfg.intermediate_size, cfg.vocab_size, False)
    assert choose_roles(shape, tokens, reuse, sharded=False) == clone.plan_projections(tokens, reuse=reuse)
    assert set(choose_roles(shape, 8, 1, sharded=True).values()) == {"generated"}


def _saved_bytes(method, ids, pos, autocast: bool) -> int:
    """Bytes of the distinct tensors autograd saves in one LRC forward, parameters and teacher weights left out."""
    known = {p.untyped_storage().data_ptr() for p in method.parameters()}
    known |= {p.untyped_storage().data_ptr() for p in method.clone.teacher.parameters()}
    seen: dict[int, int] = {}

    def pack(x):
        storage = x.untyped_storage()
        if storage.data_ptr() not in known:
            seen[storage.data_ptr()] = storage.nbytes()
        return x

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        method(ids, position_ids=pos)
    return sum(seen.values())


@pytest.mark.parametrize("family,kv,precision,factored", [
    ("llama", 2, "fp32", ()), ("qwen3", 4, "fp32", ()), ("llama", 2, "bf16", ()),
    ("llama", 2, "fp32", ("q", "o", "gate", "up", "down", "head")),
])
def test_activation_model_matches_what_autograd_saves(family, kv, precision, factored):
    teacher = make_teacher(family, False, num_key_value_heads=kv).to(torch.bfloat16)
    upcast_frozen_modules(teacher)  # as loading does: a bf16 teacher computes in fp32 without autocast
    clone = LowRankClone(teacher, 32)
    clone.set_factored(factored)
    batch, seq = 2, 24
    ids, pos = packed_batch(batch, seq)
    measured = _saved_bytes(LRC(clone), ids, pos, autocast=precision == "bf16")

    cfg = teacher.config
    shape = Shape(cfg.num_hidden_layers, cfg.hidden_size, 32, cfg.num_attention_heads, kv, cfg.head_dim,
                  cfg.intermediate_size, cfg.vocab_size, False)
    roles = {r: ("factored" if r in factored else "generated") for r in shape.role_outs}
    acts = activation_bytes(shape, batch, seq, precision, roles, ALL_TERMS)
    gen_bytes = 4 if precision == "fp32" else 2
    generated = shape.layers * 32 * sum(o for r, o in shape.role_outs.items() if r != "head" and r not in factored)
    # the loss saves its gradient buffers: (N x d) for the hidden states, (V x d_S) for a generated head
    width = shape.d_t if "head" in factored else 32
    loss = batch * seq * width * 4 + (0 if "head" in factored else shape.vocab * 32 * 4)
    predicted = acts["student"] + acts["teacher"] + generated * gen_bytes + loss
    assert predicted == pytest.approx(measured, rel=0.05)


def test_memory_divides_over_processes_only_where_the_run_shards():
    config = make_teacher("llama", False).config
    one = plan_from_config(config, cfg_for(), teacher_dtype="float32", heap_slack=False)
    ddp = plan_from_config(config, cfg_for(), nproc=4, teacher_dtype="float32", heap_slack=False)
    fsdp = plan_from_config(config, cfg_for(parallel="fsdp"), nproc=4, teacher_dtype="float32", heap_slack=False)
    assert _gib_parts(ddp) == _gib_parts(one) and ddp.peak_bytes == one.peak_bytes  # each process holds all
    teacher_one = _gib_parts(one)["teacher weights"]
    assert _gib_parts(fsdp)["teacher weights"] == pytest.approx(teacher_one / 4, rel=0.01)
    # the layer projections are sharded too (all but the embedding/head projections and the final norm)
    n = trainable_params(shape_of(config, 32, False))
    rest = n - config.num_hidden_layers * (7 * 64 * 32 + 2 * 32)
    assert _gib_parts(fsdp)["trainables (fp32)"] == pytest.approx(((n - rest) / 4 + rest) * 12 / 2**30)
    assert "projections gathered" in _gib_parts(fsdp) or fsdp.peak_phase == "load"
    assert "if they were not" in fsdp.notes[0]
    assert set(fsdp.roles.values()) == {"generated"} and "load" in fsdp.phases
    # fsdp with one process is not sharded (as in the trainer)
    assert plan_from_config(config, cfg_for(parallel="fsdp"), teacher_dtype="float32",
                            heap_slack=False).peak_bytes == one.peak_bytes


def test_parts_scale_with_the_options():
    config = make_teacher("llama", False).config
    base = plan_from_config(config, cfg_for(), teacher_dtype="float32", heap_slack=False)
    double = plan_from_config(config, cfg_for(batch_size=4), teacher_dtype="float32", heap_slack=False)
    assert double.activations["without_checkpointing"] == pytest.approx(
        2 * base.activations["without_checkpointing"], rel=0.05)
    assert base.activations["with_checkpointing"] < base.activations["without_checkpointing"]
    bf16 = plan_from_config(config, cfg_for(), teacher_dtype="bfloat16", heap_slack=False)
    assert _gib_parts(bf16)["teacher weights"] == pytest.approx(_gib_parts(base)["teacher weights"] / 2)
    slack = plan_from_config(config, cfg_for(), teacher_dtype="float32", heap_slack=True)
    assert slack.peak_bytes > base.peak_bytes
    on_cuda = plan_from_config(config, cfg_for(device="cuda", precision="auto"), teacher_dtype="float32")
    assert on_cuda.precision == "bf16" and "allocator slack (glibc heap)" not in _gib_parts(on_cuda)


def _llama_8b(path):
    LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                max_position_embeddings=131072, architectures=["LlamaForCausalLM"],
                dtype="bfloat16").save_pretrained(path)
    return path


def test_an_8b_plan_runs_in_seconds_from_the_config_alone(tmp_path, capsys):
    teacher = _llama_8b(tmp_path / "llama-8b")
    t0 = time.time()
    argv = ["plan", "--teacher", str(teacher), "--hidden-size", "2048", "--seq-len", "2048", "--batch-size", "4",
            "--grad-accum", "8", "--device", "cuda", "--device-tflops", "989", "--nproc", "8"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert main([*argv, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert time.time() - t0 < 10
    assert plan["teacher_params"] == 8_030_261_248  # Llama-3.1-8B
    assert plan["teacher_dtype"] == "bfloat16" and plan["precision"] == "bf16"  # auto: the config's dtype; CUDA
    assert plan["student_share"] == pytest.approx(0.5, abs=0.01)  # every matrix keeps its other side
    assert plan["tokens_per_s"] == pytest.approx(989e12 * 0.4 / plan["flops_per_token"])
    assert "memory per process" in text and "tokens/s per process" in text
    assert sum(p["bytes"] for p in plan["memory"]) == plan["peak_bytes"]


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True)])
def test_a_free_weight_plan_counts_the_ordinary_student(family, tied):
    # kd trains the exported student itself: its parameters, 6 FLOPs per weight of its matrices per token
    # (the embedding is a lookup; norms and biases are not products), no generated weights and (fp32) no bf16 copies
    teacher = make_teacher(family, tied)
    kd = plan_from_config(teacher.config, cfg_for(method="kd"), teacher_dtype="float32", heap_slack=False)
    lrc = plan_from_config(teacher.config, cfg_for(), teacher_dtype="float32", heap_slack=False)
    student = build_student_model(LowRankClone(teacher, 32))
    params = sum(p.numel() for p in student.parameters())
    norms = sum(p.numel() for n, p in student.named_parameters() if n.endswith("norm.weight") or "bias" in n)
    embed = student.get_input_embeddings().weight.numel()
    matrices = params - norms - (0 if tied else embed)  # tied: the one matrix is the head too
    assert kd.trainable_params == kd.student_params == params
    assert kd.flops["student matrices (free weights)"] + kd.flops["student head"] == pytest.approx(6 * matrices)
    assert kd.flops["teacher forward"] == lrc.flops["teacher forward"]  # the KL's teacher is the same
    parts = _gib_parts(kd)
    assert parts["trainables (fp32)"] * GiB == params * 12  # params + AdamW moments at the loss
    assert parts["student weights in bf16"] == 0 and "generated student weights" not in parts
    scratch = plan_from_config(teacher.config, cfg_for(method="scratch"), teacher_dtype="float32")
    assert scratch.flops["teacher forward"] == 0  # no KL, no clone terms: the teacher never runs
    assert kd.flops_per_token < lrc.flops_per_token


def test_plan_errors_are_one_line(tmp_path, capsys):
    teacher = _llama_8b(tmp_path / "llama-8b")
    assert main(["plan", "--hidden-size", "64"]) == 2
    assert main(["plan", "--teacher", str(teacher), "--hidden-size", "8192"]) == 2
    assert main(["plan", "--teacher", str(teacher), "--hidden-size", "64", "--method", "kd", "--parallel", "fsdp",
                 "--nproc", "8"]) == 2
    assert main(["plan", "--teacher", str(teacher), "--hidden-size", "64", "--nproc", "0"]) == 2
    assert main(["plan", "--teacher", str(tmp_path / "missing"), "--hidden-size", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("lrc: error:") == 5 and len(err.strip().splitlines()) == 5


def test_plan_reads_a_config_file_and_distill_prints_the_summary(tmp_path, capsys):
    teacher = _llama_8b(tmp_path / "llama-8b")
    (tmp_path / "run.yaml").write_text(f"teacher: {teacher}\nhidden_size: 1024\nseq_len: 256\n")
    assert main(["plan", "--config", str(tmp_path / "run.yaml"), "--batch-size", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["shape"]["d_s"] == 1024 and plan["seq_len"] == 256 and plan["batch_size"] == 2
    config = make_teacher("llama", False).config
    line = startup_summary(config, cfg_for(), 1, "cpu", "float32")
    assert line.startswith("plan: peak about") and "MiB per process" in line
    assert startup_summary(config, cfg_for(hidden_size=10**6), 1, "cpu", "float32").startswith("plan: unavailable")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_model_with_a_narrow_ffn_and_fewer_layers(precision):
    """--ffn-size and --layers: the student's MLP is M wide, its layers K; the gate/up targets T Q keep the
    teacher's d_ff-wide T for Q's gradient; the generation keeps W_T P (d_ff x d_S) for Q's gradient."""
    teacher = make_teacher("llama", False, num_hidden_layers=3).to(torch.bfloat16)
    upcast_frozen_modules(teacher)
    clone = LowRankClone(teacher, 32, ffn_size=40, kept_layers=(0, 2))
    batch, seq = 2, 24
    ids, pos = packed_batch(batch, seq)
    measured = _saved_bytes(LRC(clone), ids, pos, autocast=precision == "bf16")

    cfg = teacher.config
    shape = Shape(2, cfg.hidden_size, 32, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                  cfg.intermediate_size, cfg.vocab_size, False, ffn_s=40, t_layers=3)
    roles = {r: "generated" for r in shape.role_outs}
    acts = activation_bytes(shape, batch, seq, precision, roles, ALL_TERMS)
    outs = {**shape.role_outs, "gate": 40, "up": 40, "down": 40}
    generated = shape.layers * 32 * (sum(outs[r] for r in ("q", "k", "v", "o", "gate", "up", "down"))
                                     + 3 * cfg.intermediate_size)
    if precision == "bf16":  # autocast's bf16 copies of Q (Q^T for gate and for up, Q for down)
        generated += shape.layers * 3 * cfg.intermediate_size * 40
    loss = batch * seq * 32 * 4 + shape.vocab * 32 * 4
    predicted = acts["student"] + acts["teacher"] + generated * (4 if precision == "fp32" else 2) + loss
    assert predicted == pytest.approx(measured, rel=0.05)
    # the plan's part for the generated weights counts the same elements (the head generated at 48 tokens here)
    plan = plan_from_config(cfg, cfg_for(ffn_size=40, layers=2, precision=precision), teacher_dtype="float32",
                            heap_slack=False)
    assert plan.roles["head"] == "generated" and plan.student_shape.startswith("hidden 32 of 64, FFN 40 of 96")
    part = next(p for p in plan.memory if p.name == "generated student weights")
    assert part.bytes == (generated + shape.vocab * 32) * (4 if precision == "fp32" else 2)
