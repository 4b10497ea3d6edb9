"""Streaming and torchrun runs of `lrc distill` on data: exact resume of a stream (one process, and each
process's own position under torchrun), tokenising once per machine, and one data error stopping every
process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import env, records, run, save_teacher, write_data, write_jsonl


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "llama")


COMMON = ["--method", "lrc",
          "--hidden-size", "32", "--seq-len", "32", "--batch-size", "4", "--precision", "fp32", "--calib-batches",
          "1", "--eval-batches", "1", "--log-every", "1", "--device", "cpu"]


@pytest.mark.slow
def test_streaming_distill_resumes_exactly(tmp_path, teacher, monkeypatch):
    # The check: a local file read as a stream, interrupted (4 of 8 steps) and resumed, gives the
    # losses of an uninterrupted run.
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc-cache"))
    data = write_data(tmp_path / "d", "jsonl")
    args = ["--streaming", "--lr", "3e-3", "--schedule", "constant", "--eval-every", "0", *COMMON]
    run("distill", "--teacher", teacher, "--data", data, "--out", tmp_path / "straight", "--max-steps", "8", *args)
    run("distill", "--teacher", teacher, "--data", data, "--out", tmp_path / "split", "--max-steps", "4", *args)
    state = json.loads((tmp_path / "split" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["sampler"]["stream"]["offset"] > 0 or state["sampler"]["stream"]["state"]
    run("distill", "--data", data, "--out", tmp_path / "split", "--max-steps", "8", "--resume")
    a, b = records(tmp_path / "straight"), records(tmp_path / "split")
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra["step"]


@pytest.mark.slow
def test_streaming_under_torchrun_resumes_exactly_from_each_process_position(tmp_path, teacher):
    # 2 processes, each streaming its own share; the step-6 checkpoint dropped, the same command resumes from
    # step 3 (every process's saved position) and logs the losses of the run that was not interrupted.
    cache = tmp_path / "lrc-cache"
    data = write_data(tmp_path / "d", "jsonl")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lrc",
           "distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--streaming", "--lr", "3e-3",
           "--eval-every", "0", "--max-steps", "6", "--save-every", "3", "--keep-checkpoints", "0", "--resume",
           *map(str, COMMON)]
    subprocess.run(cmd, check=True, capture_output=True, env=env(cache), timeout=300)
    straight = records(out)
    state = json.loads((out / "checkpoints" / "step-00000003" / "state.json").read_text())["sampler"]
    assert len(state["ranks"]) == 2 and state["ranks"][0] != state["ranks"][1]
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    subprocess.run(cmd, check=True, capture_output=True, env=env(cache), timeout=300)
    assert [r["step"] for r in records(out)] == list(range(1, 7))
    for ra, rb in zip(straight, records(out), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra["step"]
    one = subprocess.run([sys.executable, "-m", "lrc", *cmd[cmd.index("distill"):]], capture_output=True, text=True,
                         env=env(cache), timeout=300)
    assert one.returncode == 2 and "resume it on 2" in one.stderr, one.stderr[-2000:]


# -------------------------------------------------------------------------------------------- torchrun

_COUNTING = """
import os, sys
from pathlib import Path
from transformers import PreTrainedTokenizerFast
real = PreTrainedTokenizerFast.__call__
def counting(self, *args, **kwargs):
    with open(os.environ["TOKENISED_BY"], "a") as f:
        f.write(os.environ.get("RANK", "?") + "\\n")
    return real(self, *args, **kwargs)
PreTrainedTokenizerFast.__call__ = counting
from lrc.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_torchrun_tokenises_once_per_machine(tmp_path, teacher):
    # Catches every process tokenising the corpus (each would write its rank to the marker file), and a
    # waiting process that reads the cache before it is complete (it would tokenise or fail).
    script = tmp_path / "counting_lrc.py"
    script.write_text(_COUNTING)
    marker = tmp_path / "tokenised-by.txt"
    data = write_data(tmp_path / "d", "jsonl", n_docs=80)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           "distill", "--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "run"),
           "--max-steps", "1", *COMMON]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(env(tmp_path / "cache"),
                          TOKENISED_BY=str(marker)), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = set(marker.read_text().split())
    assert ranks == {"0"}, ranks


@pytest.mark.slow
def test_torchrun_data_error_stops_every_process(tmp_path, teacher):
    # Catches a waiting process left hanging at the barrier when the first one fails (the timeout would hit).
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": "  "}] * 3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lrc",
           "distill", "--teacher", str(teacher), "--data", str(blank), "--out", str(tmp_path / "run"),
           "--max-steps", "1", *COMMON]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(tmp_path / "cache"), timeout=120)
    assert proc.returncode != 0
    assert "no text found" in proc.stderr and "failed in another process" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()
