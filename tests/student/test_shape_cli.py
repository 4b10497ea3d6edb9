"""`lrc distill / plan / export / eval` with a student shaped by --target-params, --ffn-size and --layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import run, save_teacher, write_data
from transformers import AutoModelForCausalLM

from lrc.cli import main

COMMON = ["--method", "lrc",
          "--seq-len", "32", "--batch-size", "4", "--precision", "fp32", "--lr", "3e-3", "--calib-batches", "2",
          "--eval-batches", "2", "--log-every", "1", "--eval-every", "0"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "cache"))


def test_target_params_with_ffn_and_depth_end_to_end(tmp_path, capsys):
    teacher = save_teacher(tmp_path / "teacher", "qwen3", tied=True)
    data = write_data(tmp_path / "data")
    out = tmp_path / "run"
    shape = ["--target-params", "45%", "--target-dims", "hidden,ffn", "--layers", "1"]
    assert main(["plan", "--teacher", str(teacher), *shape, *COMMON, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["student_share"] == pytest.approx(0.45, abs=0.45 * 0.1)
    assert "of 2 layers" in plan["student_shape"] and "FFN" in plan["student_shape"]

    run("distill", "--teacher", teacher, "--data", data, "--out", out, *shape, *COMMON, "--max-steps", "2")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["hidden_size"] == plan["shape"]["d_s"] and saved["ffn_size"] == plan["shape"]["ffn_s"]
    assert saved["layers"] == 1 and saved["drop_layers"] in ("0", "1")  # the one measured least important
    summary = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("memory ")]
    assert summary and f"{plan['student_params']:,} parameters" in summary[0] and "of 2 layers" in summary[0]

    run("distill", "--out", out, "--resume", "--max-steps", "3")  # the saved shape, solved again, agrees
    model_dir = tmp_path / "model"
    run("export", out, "--out", model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.num_hidden_layers == 1 and model.config.intermediate_size == saved["ffn_size"]
    assert sum(p.numel() for p in model.parameters()) == plan["student_params"]
    capsys.readouterr()
    run("eval", model_dir, "--data", data, "--seq-len", "32", "--json", "--device", "cpu")
    exported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run("eval", out, "--data", data, "--json", "--device", "cpu")
    direct = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert direct["loss"] == pytest.approx(exported["loss"], rel=1e-4)


def test_shape_errors_leave_nothing_written(tmp_path, capsys):
    teacher = save_teacher(tmp_path / "teacher", "llama")
    data = write_data(tmp_path / "data")
    out = tmp_path / "run"
    for extra, message in [(["--hidden-size", "32", "--ffn-size", "500"], "--ffn-size 500 is out of range"),
                           (["--hidden-size", "32", "--drop-layers", "0,1"], "drops all 2 layers"),
                           (["--target-params", "lots"], "--target-params 'lots' is not a size"),
                           (["--target-params", "50%", "--hidden-size", "8"], "both set it")]:
        assert main(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *COMMON,
                     "--max-steps", "1", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
        assert not Path(out).exists()
