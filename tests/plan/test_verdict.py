"""`lrc plan --gpus N --gpu-memory SIZE`: the verdict per phase, the smallest change that fits as a command line
that itself fits, the budget (--lr auto's rate, steps, wall time), and `lrc distill` warning before any weights
load when its forecast does not fit."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from helpers import save_teacher, write_data
from transformers import LlamaConfig

from lrc.cli import main
from lrc.errors import UserError
from lrc.optim.lr_rule import auto_lr
from lrc.plan import verdict as fit

pytestmark = pytest.mark.usefixtures("one_thread", "lrc_cache")
GiB = 1 << 30
ROW_8B = ["--method", "lrc", "--hidden-size", "2048", "--parallel", "fsdp", "--batch-size", "2", "--seq-len", "2048",
          "--precision", "bf16"]


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "llama-8b"
    LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                architectures=["LlamaForCausalLM"], dtype="bfloat16").save_pretrained(path)
    return path


def plan_json(capsys, *argv) -> dict:
    assert main(["plan", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("text,value", [("80GiB", 80 * GiB), ("80G", 80 * GiB), ("80GB", 80 * 10**9),
                                        ("81920MiB", 80 * GiB), ("1.5 TiB", 3 << 39), ("1024", 1024)])
def test_memory_sizes(text, value):
    assert fit.parse_memory(text) == value


@pytest.mark.parametrize("text", ["eighty", "80XB", "-1GiB", "0GiB", ""])
def test_bad_memory_sizes_are_one_line_errors(text):
    with pytest.raises(UserError, match="--gpu-memory"):
        fit.parse_memory(text)


def test_verdict_per_phase(llama_8b, capsys):
    big = plan_json(capsys, "--teacher", llama_8b, *ROW_8B, "--gpus", 8, "--gpu-memory", "80GiB",
                    "--grad-checkpointing")
    v = big["verdict"]
    assert v["fits"] and v["memory_bytes"] == 80 * GiB and v["suggestion"] is None
    assert set(v["phases"]) == {"loss", "backward", "optimizer", "end"}  # "load" is host memory
    assert v["host_bytes"] == big["phases"]["load"]
    small = plan_json(capsys, "--teacher", llama_8b, *ROW_8B, "--gpus", 8, "--gpu-memory", "10GiB",
                      "--grad-checkpointing")
    v = small["verdict"]
    assert not v["fits"]
    for phase, ok in v["phases"].items():
        assert ok == (small["phases"][phase] <= 10 * GiB), phase


def test_the_suggested_command_line_fits(llama_8b, capsys):
    argv = ["plan", "--teacher", str(llama_8b), *ROW_8B, "--gpus", "8", "--gpu-memory", "40GiB"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "does NOT fit 8 device(s) of 40 GiB" in text
    command = text.split("smallest change that fits:", 1)[1].splitlines()[1].strip()
    suggested = shlex.split(command)
    assert suggested[:2] == ["lrc", "plan"]
    assert main(suggested[1:]) == 0
    assert "verdict: fits" in capsys.readouterr().out
    # without --grad-checkpointing the first fix tried is checkpointing, and a larger change only if needed
    assert "--grad-checkpointing" in suggested


def test_smallest_change_prefers_checkpointing_then_micro_batch(llama_8b, capsys):
    base = ["--teacher", llama_8b, *ROW_8B, "--gpus", 8]
    plan = plan_json(capsys, *base, "--gpu-memory", "80GiB")
    with_ckpt = plan_json(capsys, *base, "--gpu-memory", "80GiB", "--grad-checkpointing")
    # a memory between the two peaks: checkpointing alone is the fix
    between = (plan["peak_bytes"] + with_ckpt["peak_bytes"]) // 2
    v = plan_json(capsys, *base, "--gpu-memory", str(between))["verdict"]
    assert not v["fits"] and v["suggestion"]["changes"] == {"grad_checkpointing": True}
    assert v["suggestion"]["nproc"] == 8


def test_a_free_student_that_does_not_fit_is_told_to_shard_with_lrc(llama_8b, capsys):
    """kd (the default) keeps a whole teacher and student per process; when no ddp change fits, the
    suggestion is LRC with the teacher sharded, and that command fits."""
    row = ["--teacher", str(llama_8b), "--method", "kd", "--hidden-size", "2048", "--batch-size", "2",
           "--seq-len", "2048", "--precision", "bf16", "--gpus", "8", "--gpu-memory", "40GiB"]
    v = plan_json(capsys, *row)["verdict"]
    assert not v["fits"] and v["suggestion"]["changes"]["method"] == "lrc"
    assert v["suggestion"]["changes"]["parallel"] == "fsdp"
    assert main(["plan", *row]) == 0
    command = capsys.readouterr().out.split("smallest change that fits:", 1)[1].splitlines()[1].strip()
    assert "--method lrc" in command and main(shlex.split(command)[1:]) == 0
    assert "verdict: fits" in capsys.readouterr().out


def test_nothing_fits_is_said(llama_8b, capsys):
    assert main(["plan", "--teacher", str(llama_8b), *ROW_8B, "--gpus", "1", "--gpu-memory", "1GiB"]) == 0
    assert "no change of checkpointing, micro-batch, processes" in capsys.readouterr().out


def test_gpus_without_a_memory_is_a_one_line_error(llama_8b, capsys, monkeypatch):
    monkeypatch.setattr(fit, "local_gpu", lambda: None)
    assert main(["plan", "--teacher", str(llama_8b), *ROW_8B, "--gpus", "8"]) == 2
    err = capsys.readouterr().err
    assert "--gpu-memory" in err and len(err.strip().splitlines()) == 1
    assert main(["plan", "--teacher", str(llama_8b), *ROW_8B, "--gpus", "8", "--nproc", "4",
                 "--gpu-memory", "80GiB"]) == 2
    assert main(["plan", "--teacher", str(llama_8b), *ROW_8B, "--gpu", "Z80"]) == 2


def test_the_local_device_is_the_default(llama_8b, capsys, monkeypatch):
    monkeypatch.setattr(fit, "local_gpu", lambda: ("NVIDIA H100 80GB HBM3", 79 * GiB))
    plan = plan_json(capsys, "--teacher", llama_8b, *ROW_8B, "--gpus", 8, "--max-tokens", 10**9)
    assert plan["verdict"]["memory_bytes"] == 79 * GiB and "H100" in plan["verdict"]["memory_source"]
    assert plan["device_tflops"] == 989  # the listed peak of the device's name


def test_budget(llama_8b, capsys):
    plan = plan_json(capsys, "--teacher", llama_8b, *ROW_8B, "--gpus", 8, "--gpu", "H100", "--grad-accum", 4,
                     "--max-tokens", 10**9, "--mfu", 0.5)
    b = plan["budget"]
    tokens_per_step = 2 * 2048 * 4 * 8
    assert b["tokens_per_step"] == tokens_per_step and b["lr_auto"]
    assert b["lr"] == auto_lr(2048, 4096, tokens_per_step)
    assert b["steps"] == -(-10**9 // tokens_per_step)
    per_process = 989e12 * 0.5 / plan["flops_per_token"]
    assert b["seconds"] == pytest.approx(b["steps"] * tokens_per_step / (8 * per_process))
    assert main(["plan", "--teacher", str(llama_8b), *ROW_8B, "--gpus", "8", "--gpu", "H100", "--lr", "1e-4"]) == 0
    text = capsys.readouterr().out
    assert "lr 0.0001 (given)" in text and "give --max-tokens or --max-steps" in text


def test_command_lines_replace_options():
    argv = ["--teacher", "t", "--batch-size", "8", "--grad-accum=2", "--no-grad-checkpointing", "--gpus", "8"]
    changed = fit.command_with(argv, {"batch_size": 2, "grad_accum": 8, "grad_checkpointing": True}, 16)
    assert shlex.split(changed) == ["lrc", "--teacher", "t", "--batch-size", "2", "--grad-accum", "8",
                                    "--grad-checkpointing", "--gpus", "16"]


def test_distill_warns_before_any_weights_load(tmp_path, monkeypatch, capsys):
    teacher = save_teacher(tmp_path / "teacher", "llama", tied=False)
    data = write_data(tmp_path / "data", "txt")
    loaded = []

    def no_loading(*args, **kw):
        loaded.append(capsys.readouterr().out)  # what was printed before the weights would load
        raise RuntimeError("weights loaded")

    monkeypatch.setattr(fit, "device_memory", lambda device, local: (1 << 20, "a 1 MiB test device"))
    monkeypatch.setattr("lrc.train.run.load_teacher", no_loading)
    with pytest.raises(RuntimeError, match="weights loaded"):
        main(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "run"),
              "--hidden-size", "32", "--seq-len", "32", "--batch-size", "4", "--max-steps", "1", "--device", "cpu"])
    assert "plan: this run does not fit" in loaded[0] and "a 1 MiB test device" in loaded[0]


def test_recomputed_clone_targets_are_the_next_memory_for_time_step(llama_8b, capsys):
    """With checkpointing on, an LRC run that still does not fit is first offered --recompute-targets (the
    clone targets computed with their layer), which costs time only, before a smaller micro-batch or more GPUs."""
    argv = ["plan", "--teacher", str(llama_8b), *ROW_8B, "--gpus", "8", "--gpu-memory", "20GiB",
            "--grad-checkpointing"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "does NOT fit 8 device(s) of 20 GiB" in text
    command = shlex.split(text.split("smallest change that fits:", 1)[1].splitlines()[1].strip())
    assert "--recompute-targets" in command and "--batch-size" in command and command[command.index(
        "--batch-size") + 1] == "2"  # the micro-batch as it was
    assert main(command[1:]) == 0
    assert "verdict: fits" in capsys.readouterr().out
    # a free-weight student has no clone targets to recompute: never offered
    free = plan_json(capsys, "--teacher", llama_8b, *[a for a in ROW_8B if a not in ("--parallel", "fsdp")],
                     "--method", "kd", "--gpus", "8", "--gpu-memory", "40GiB", "--grad-checkpointing")
    suggestion = free["verdict"]["suggestion"]
    assert suggestion is None or "recompute_targets" not in suggestion["changes"]
