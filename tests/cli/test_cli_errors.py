"""Bad input to `lrc`: exit status 2, one `lrc: error: ...` line on stderr naming the problem, no traceback,
and the output directory left as it was (absent, or byte-for-byte unchanged)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import corpus, save_teacher, write_data

from lrc.cli import main
from lrc.config import FIELDS, RANGES, RunConfig, _parse_type, validate

COMMON = ["--method", "lrc",
          "--seq-len", "32", "--batch-size", "4", "--precision", "fp32", "--calib-batches", "2",
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


# ------------------------------------------------------------------------------------------- damaged teacher files


def damaged_copy(teacher: Path, tmp_path: Path, name: str, damage) -> tuple[Path, Path]:
    """A copy of the saved teacher whose file `name` was passed through `damage(bytes) -> bytes`."""
    path = tmp_path / "teacher"
    shutil.copytree(teacher, path)
    f = path / name
    f.write_bytes(damage(f.read_bytes()))
    return path, f


DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],  # an interrupted download
    "tail-cut": lambda b: b[:-8],
    "garbage": lambda b: b"\x00garbage" * 64,
    "empty": lambda b: b"",
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_teacher_safetensors(capsys, tmp_path, teacher, data, damage):
    path, f = damaged_copy(teacher, tmp_path, "model.safetensors", DAMAGE[damage])
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(path, data, out), str(f), "damaged", "download or save the model again",
                      untouched=out)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_teacher_pytorch_bin(capsys, tmp_path, teacher, data, damage):
    # torch.load's failures: RuntimeError (zip reader), UnpicklingError (weights-only unpickler), EOFError
    import torch
    from safetensors.torch import load_file

    path = tmp_path / "teacher"
    shutil.copytree(teacher, path)
    torch.save(load_file(str(path / "model.safetensors")), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    f = path / "pytorch_model.bin"
    f.write_bytes(DAMAGE[damage](f.read_bytes()))
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(path, data, out), "cannot load teacher weights", str(f),
                      untouched=out)


def test_teacher_weights_of_another_model(capsys, tmp_path, teacher, data):
    # transformers would fill the missing tensors with random values and only warn: a random teacher
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "teacher"
    shutil.copytree(teacher, path)
    save_file({"encoder.weight": torch.zeros(4, 4)}, str(path / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(path, data, out), str(path), "do not match its config.json",
                      "missing tensors", untouched=out)


def test_sharded_teacher_with_a_missing_shard(capsys, tmp_path, teacher, data):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "teacher"
    shutil.copytree(teacher, path)
    (path / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(teacher).save_pretrained(path, max_shard_size="50KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(path, data, out), str(shards[1]), "missing",
                      "model.safetensors.index.json", untouched=out)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_teacher_config(capsys, tmp_path, teacher, data, damage):
    path, f = damaged_copy(teacher, tmp_path, "config.json", DAMAGE[damage])
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(path, data, out), str(f), "not valid JSON", untouched=out)


@pytest.mark.parametrize("name,damage", [("tokenizer.json", "truncated"), ("tokenizer.json", "garbage"),
                                         ("tokenizer_config.json", "truncated")])
def test_damaged_teacher_tokenizer(capsys, tmp_path, teacher, data, name, damage):
    path, f = damaged_copy(teacher, tmp_path, name, DAMAGE[damage])
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(path, data, out), str(f), "tokenizer", "damaged", untouched=out)


def test_tokenizer_json_of_the_wrong_shape(capsys, tmp_path, teacher, data):
    # valid JSON, but not a tokenizer: the tokenizers library's own error, still one line
    path, f = damaged_copy(teacher, tmp_path, "tokenizer.json", lambda b: b'{"version": "1.0"}')
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(path, data, out), "cannot load the teacher's tokenizer", str(path),
                      untouched=out)


def test_teacher_without_tokenizer_files(capsys, tmp_path, teacher, data):
    path = tmp_path / "teacher"
    shutil.copytree(teacher, path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(path, data, out), str(path), "has no tokenizer files",
                      "copy the teacher's tokenizer", untouched=out)


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


@pytest.mark.parametrize("method", ["kd", "prune-kd"])
def test_clone_options_for_a_free_student(capsys, tmp_path, teacher, data, method):
    """Clone weights name LRC's terms: under kd (the default) they would do nothing, so they are an error."""
    out = tmp_path / "out"
    line = assert_user_error(capsys, distill_argv(teacher, data, out, "--method", method, "--clone-weight", "0.5"),
                             "--clone-weight", untouched=out)
    assert "add --method lrc" in line


def test_fsdp_with_a_baseline_method(capsys, tmp_path, teacher, data):
    out = tmp_path / "out"
    # kd is also the default method: the line says how to shard (--method lrc) or not (ddp)
    line = assert_user_error(capsys, distill_argv(teacher, data, out, "--method", "kd", "--parallel", "fsdp"),
                             "--parallel fsdp", "--parallel ddp", untouched=out)
    assert "add --method lrc" in line and RunConfig().method == "kd"


# ------------------------------------------------------------------------------------------- numeric options

# (option, bad value, the message's text): every numeric option of `lrc distill` out of its range, as typed.
BAD_VALUES = [
    ("--lr", "-1", "--lr must be > 0 (got -1.0)"),
    ("--lr", "0", "--lr must be > 0 (got 0.0)"),
    ("--lr", "nan", "--lr must be a finite number > 0 (got nan)"),
    ("--lr", "inf", "--lr must be a finite number > 0 (got inf)"),
    ("--free-lr", "0", "--free-lr must be > 0 (got 0.0)"),
    ("--warmup-ratio", "-0.1", "--warmup-ratio must be in [0, 1] (got -0.1)"),
    ("--warmup-ratio", "1.5", "--warmup-ratio must be in [0, 1] (got 1.5)"),
    ("--min-lr-ratio", "2", "--min-lr-ratio must be in [0, 1] (got 2.0)"),
    ("--val-fraction", "1", "--val-fraction must be in [0, 1) (got 1.0)"),
    ("--val-fraction", "-0.5", "--val-fraction must be in [0, 1) (got -0.5)"),
    ("--adam-beta1", "1", "--adam-beta1 must be in [0, 1) (got 1.0)"),
    ("--adam-beta2", "-0.1", "--adam-beta2 must be in [0, 1) (got -0.1)"),
    ("--adam-beta2", "nan", "--adam-beta2 must be in [0, 1) (got nan)"),
    ("--weight-decay", "-0.01", "--weight-decay must be >= 0 (got -0.01)"),
    ("--weight-decay", "inf", "--weight-decay must be a finite number >= 0 (got inf)"),
    ("--grad-clip", "-1", "--grad-clip must be >= 0 (got -1.0)"),
    ("--grad-clip", "nan", "--grad-clip must be a finite number >= 0 (got nan)"),
    ("--kl-temperature", "0", "--kl-temperature must be > 0 (got 0.0)"),
    ("--kl-temperature", "-2", "--kl-temperature must be > 0 (got -2.0)"),
    ("--ce-weight", "-1", "--ce-weight must be >= 0 (got -1.0)"),
    ("--kl-weight", "nan", "--kl-weight must be a finite number >= 0 (got nan)"),
    ("--clone-weight", "-0.2", "--clone-weight must be >= 0 (got -0.2)"),
    *[(f"--clone-{term}", "-1", f"--clone-{term} must be >= 0 (got -1.0)")
      for term in ("q", "k", "v", "attn-out", "gate", "up", "ffn-out")],
    ("--clone-q", "inf", "--clone-q must be a finite number >= 0 (got inf)"),
    ("--rms-norm-eps", "0", "--rms-norm-eps must be > 0 (got 0.0)"),
    ("--rms-norm-eps", "-0.000001", "--rms-norm-eps must be > 0 (got -1e-06)"),  # argparse takes -1e-6 for an option
    ("--batch-size", "0", "--batch-size must be a positive integer (got 0)"),
    ("--batch-size", "-4", "--batch-size must be a positive integer (got -4)"),
    ("--grad-accum", "0", "--grad-accum must be a positive integer (got 0)"),
    ("--calib-batches", "0", "--calib-batches must be a positive integer (got 0)"),
    ("--log-every", "0", "--log-every must be a positive integer (got 0)"),
    ("--save-every", "0", "--save-every must be a positive integer (got 0)"),
    ("--eval-batches", "0", "--eval-batches must be a positive integer (got 0)"),
    ("--eval-every", "-1", "--eval-every must be >= 0 (got -1)"),
    ("--keep-checkpoints", "-1", "--keep-checkpoints must be >= 0 (got -1)"),
    ("--stop-on-rise", "-0.5", "--stop-on-rise must be >= 0 (got -0.5)"),
    ("--max-steps", "-1", "--max-steps must be >= 0 (got -1)"),
    ("--max-tokens", "-5", "--max-tokens must be >= 0 (got -5)"),
    ("--seq-len", "1", "--seq-len must be >= 2 (got 1)"),
    ("--seq-len", "0", "--seq-len must be >= 2 (got 0)"),
    ("--chunk-size", "-1", "--chunk-size must be >= 0 (got -1)"),
    ("--seed", "-1", "--seed must be in [0, 18446744073709551615] (got -1)"),
    ("--hidden-size", "-8", "--hidden-size must be a positive integer (got -8)"),
    ("--ffn-size", "0", "--ffn-size must be a positive integer (got 0)"),
    ("--layers", "0", "--layers must be a positive integer (got 0)"),
    ("--num-proc", "0", "--num-proc must be a positive integer (got 0)"),
    ("--free-after", "1", "--free-after must be in [0, 1) (got 1.0)"),
    ("--free-after", "-0.1", "--free-after must be in [0, 1) (got -0.1)"),
]


@pytest.mark.parametrize("option,value,message", BAD_VALUES, ids=[f"{o}={v}" for o, v, _ in BAD_VALUES])
def test_numeric_option_out_of_range(capsys, tmp_path, teacher, data, option, value, message):
    out = tmp_path / "out"
    line = assert_user_error(capsys, distill_argv(teacher, data, out, option, value), message, untouched=out)
    assert line == f"lrc: error: {message}"


def test_every_numeric_option_has_a_range_and_a_bad_value_above():
    numeric = {name for name in FIELDS if _parse_type(name) in (int, float)}
    assert numeric == set(RANGES), "a numeric option without a range in lrc.config.RANGES (or a stale entry)"
    swept = {option[2:].replace("-", "_") for option, _, _ in BAD_VALUES}
    assert swept == numeric, f"options without a bad value in BAD_VALUES: {sorted(numeric - swept)}"


def test_defaults_are_in_range():
    validate(RunConfig())  # hidden_size, max_steps, ... None: not checked here


def test_out_of_range_option_in_a_config_file(capsys, tmp_path, teacher, data):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: -1e-3\nwarmup_ratio: 0.01\n")
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(teacher, data, out, "--config", cfg), "--lr must be > 0 (got -0.001)",
                      untouched=out)


def test_out_of_range_option_on_resume(capsys, run_copy):
    assert_user_error(capsys, ["distill", "--out", run_copy, "--resume", "--max-steps", "-4"],
                      "--max-steps must be >= 0 (got -4)", untouched=run_copy)


@pytest.mark.parametrize("option,value,needle", [
    ("--lr", "abc", "must be a number or auto (got 'abc')"),
    ("--batch-size", "1.5", "invalid int value: '1.5'"),
    ("--precision", "fp8", "invalid choice: 'fp8'"),
    ("--learning-rate", "1e-3", "unrecognized arguments: --learning-rate"),
])
def test_unparseable_option_is_one_line(capsys, tmp_path, teacher, data, option, value, needle):
    out = tmp_path / "out"
    assert_user_error(capsys, distill_argv(teacher, data, out, option, value), needle, "--help`", untouched=out)


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


# ------------------------------------------------------------------------------------------- export and eval options


@pytest.mark.parametrize("dtype", ["int8", "fp16", ""])
def test_export_with_an_unknown_dtype(capsys, run_copy, tmp_path, dtype):
    model = tmp_path / "model"
    assert_user_error(capsys, ["export", run_copy, "--out", model, "--dtype", dtype], "--dtype",
                      "invalid choice", "'float32', 'bfloat16', 'float16'", untouched=model)


@pytest.mark.parametrize("option,value,needle", [
    ("--batch-size", "0", "--batch-size must be a positive integer (got 0)"),
    ("--batch-size", "-1", "--batch-size must be a positive integer (got -1)"),
    ("--seq-len", "1", "--seq-len must be >= 2 (got 1)"),
    ("--seq-len", "-32", "--seq-len must be >= 2 (got -32)"),
    ("--seq-len", "x", "argument --seq-len: invalid int value: 'x'"),
    ("--device", "gpu", "auto, cpu, cuda or cuda:N"),
])
def test_eval_option_out_of_range(capsys, tmp_path, teacher, data, option, value, needle):
    cache = tmp_path / "lrc-cache"  # nothing is tokenised (or cached) before the options are checked
    assert_user_error(capsys, ["eval", teacher, "--data", data, option, value], needle, untouched=cache)
    assert snapshot(teacher) is not None


def test_eval_on_cuda_without_cuda(capsys, tmp_path, teacher, data):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_user_error(capsys, ["eval", teacher, "--data", data, "--device", "cuda"], "--device cuda",
                      "CUDA is not available", untouched=tmp_path / "lrc-cache")


def test_eval_of_a_model_with_damaged_weights(capsys, tmp_path, teacher, data):
    path, f = damaged_copy(teacher, tmp_path, "model.safetensors", DAMAGE["truncated"])
    assert_user_error(capsys, ["eval", path, "--data", data, "--device", "cpu"], str(f), "damaged",
                      untouched=tmp_path / "lrc-cache")


def test_eval_of_a_model_without_tokenizer(capsys, tmp_path, teacher, data):
    path = tmp_path / "model"
    shutil.copytree(teacher, path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    assert_user_error(capsys, ["eval", path, "--data", data, "--device", "cpu"], str(path),
                      "has no tokenizer files", "lrc export", untouched=tmp_path / "lrc-cache")


# ------------------------------------------------------------------------------------------- real process


@pytest.mark.slow
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
