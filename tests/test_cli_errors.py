"""Bad input to `lrc`: exit status 2, one `lrc: error: ...` line on stderr naming the problem, no traceback,
and the output directory left as it was (absent, or byte-for-byte unchanged)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import corpus, save_teacher, write_data

from lrc.cli import main

COMMON = ["--seq-len", "32", "--batch-size", "4", "--precision", "fp32", "--calib-batches", "2",
          "--eval-batches", "2", "--log-every", "1"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc-cache"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "llama", "llama", tied=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"), "jsonl")


def snapshot(path: Path):
    """None if `path` does not exist, else {relative path: (sha256, mtime_ns)} of everything under it."""
    if not path.exists():
        return None
    out = {}
    for p in sorted([path, *path.rglob("*")]):
        rel = str(p.relative_to(path))
        if p.is_file():
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        else:
            out[rel] = ("dir", None)
    return out


def assert_user_error(capsys, argv, *needles, untouched: Path):
    """main(argv) exits 2 with one `lrc: error:` line containing every needle; `untouched` is unchanged."""
    capsys.readouterr()
    before = snapshot(untouched)
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lrc: error: "), lines[0]
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert snapshot(untouched) == before, f"{untouched} was changed"
    return lines[0]


def distill_argv(teacher, data, out, *extra, hidden=32, steps=2):
    return ["distill", "--teacher", teacher, "--data", data, "--out", out, "--hidden-size", str(hidden),
            "--max-steps", str(steps), *COMMON, *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, teacher, data) -> Path:
    """A finished 2-step run, copied per test by `run_copy`."""
    out = tmp_path_factory.mktemp("run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LRC_CACHE", str(out.parent / "cache"))
        assert main([str(a) for a in distill_argv(teacher, data, out, "--save-every", "1")]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


# ------------------------------------------------------------------------------------------- teacher


def test_missing_teacher_path(capsys, tmp_path, data):
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(tmp_path / "no-such-teacher", data, out),
                      "no-such-teacher", "does not exist", untouched=out)


def test_teacher_not_a_causal_lm_bert(capsys, tmp_path, data):
    from transformers import BertConfig, BertModel

    path = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37)).save_pretrained(path)
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(path, data, out), "'bert'", "not supported", "llama",
                      untouched=out)


def test_teacher_not_a_causal_lm_base_model(capsys, tmp_path, data):
    # A supported family, but the bare decoder without an LM head.
    from conftest import tiny_config
    from transformers import LlamaModel

    path = tmp_path / "llama-base"
    LlamaModel(tiny_config("llama", False)).save_pretrained(path)
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(path, data, out), "LlamaModel", "not a causal language model",
                      untouched=out)


def test_teacher_of_unsupported_family(capsys, tmp_path, data):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    config = GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(path)
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(path, data, out), "'gpt2'", "not supported", untouched=out)


# ------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("hidden", [0, -8])
def test_hidden_size_not_positive(capsys, tmp_path, teacher, data, hidden):
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(teacher, data, out, hidden=hidden), "--hidden-size",
                      "positive", untouched=out)


def test_hidden_size_larger_than_teacher(capsys, tmp_path, teacher, data):
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(teacher, data, out, hidden=65), "--hidden-size 65",
                      "larger than the teacher's hidden size 64", untouched=out)


def test_hidden_size_equal_to_teacher_is_allowed(capsys, tmp_path, teacher, data):
    out = tmp_path / "out"
    assert main([str(a) for a in distill_argv(teacher, data, out, hidden=64, steps=0)]) == 0
    assert (out / "checkpoints" / "step-00000000" / "trainable.safetensors").is_file()


def test_fsdp_with_a_baseline_method(capsys, tmp_path, teacher, data):
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(teacher, data, out, "--method", "kd", "--parallel", "fsdp"),
                      "--parallel fsdp", "--parallel ddp", untouched=out)


# ------------------------------------------------------------------------------------------- data


def test_missing_data_path(capsys, tmp_path, teacher):
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(teacher, tmp_path / "no-such-data.jsonl", out),
                      "no-such-data.jsonl", "does not exist", untouched=out)


def test_data_without_text(capsys, tmp_path, teacher):
    path = tmp_path / "empty.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", "  ", "\n"]))
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(teacher, path, out), "no text found", "empty.jsonl", untouched=out)


def test_data_shorter_than_one_sequence(capsys, tmp_path, teacher):
    path = tmp_path / "short.txt"
    path.write_text("the king")
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(teacher, path, out), "short.txt",
                      "fewer than one training sequence of 32", untouched=out)


def test_unsupported_data_format(capsys, tmp_path, teacher):
    path = tmp_path / "data.csv"
    path.write_text("text\n" + "\n".join(corpus(5)))
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(teacher, path, out), "data.csv", "unsupported format '.csv'",
                      untouched=out)


def test_jsonl_without_text_field(capsys, tmp_path, teacher):
    path = tmp_path / "body.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in corpus(5)))
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(teacher, path, out), "'text'", "body", untouched=out)


# ------------------------------------------------------------------------------------------- config files


def test_unreadable_yaml(capsys, tmp_path, teacher, data):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("teacher: [unclosed\nlr: 1e-3\n")
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(teacher, data, out, "--config", cfg), "bad.yaml",
                      "not valid YAML", untouched=out)


def test_unknown_key_in_yaml(capsys, tmp_path, teacher, data):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("learning_rate: 0.001\n")
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(teacher, data, out, "--config", cfg), "unknown option",
                      "'learning_rate'", "typo.yaml", untouched=out)


# ------------------------------------------------------------------------------------------- run directories


def test_run_dir_holds_another_run(capsys, run_copy, teacher, data):
    # A different run (other hidden size, other steps) into the same RUN_DIR without --resume.
    assert_user_error(capsys, distill_argv(teacher, data, run_copy, hidden=16, steps=3),
                      str(run_copy), "already holds a run", "--resume", untouched=run_copy)


def test_resume_with_contradicting_options(capsys, run_copy):
    assert_user_error(capsys, ["distill", "--out", run_copy, "--resume", "--max-steps", "4",
                               "--hidden-size", "16"],
                      "--resume", "--hidden-size 16", "contradicts", "32", untouched=run_copy)


def _truncate_latest(run: Path) -> Path:
    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    f = last / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return last


def test_resume_from_corrupt_checkpoint(capsys, run_copy):
    last = _truncate_latest(run_copy)
    assert_user_error(capsys, ["distill", "--out", run_copy, "--resume", "--max-steps", "4"],
                      str(last), "corrupt", untouched=run_copy)


def test_export_of_corrupt_checkpoint(capsys, run_copy, tmp_path):
    last = _truncate_latest(run_copy)
    model = tmp_path / "model"
    assert_user_error(capsys, ["export", run_copy, "--out", model], str(last), "corrupt", untouched=model)
    assert snapshot(model) is None


def test_export_of_a_directory_that_is_not_a_run(capsys, tmp_path, teacher):
    model = tmp_path / "model"
    assert_user_error(capsys, ["export", teacher, "--out", model], str(teacher), "not an lrc run directory",
                      untouched=model)


# ------------------------------------------------------------------------------------------- real process


def test_console_script_error_is_one_line(tmp_path, data):
    """The same contract through the installed `lrc` entry point in a fresh process (no captured streams)."""
    out = tmp_path / "out"
    env = dict(os.environ, LRC_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    lrc = Path(sys.executable).with_name("lrc")
    cmd = [str(lrc)] if lrc.exists() else [sys.executable, "-m", "lrc"]
    proc = subprocess.run([*cmd, *map(str, distill_argv(tmp_path / "missing-teacher", data, out))],
                          capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lrc: error: ") and "missing-teacher" in lines[0], proc.stderr
    assert not out.exists()
