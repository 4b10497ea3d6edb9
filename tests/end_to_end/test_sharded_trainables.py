"""`--parallel fsdp` shards LRC's projections, their gradients and AdamW state too (FSDP2), on CPU (gloo):
2 processes hold half of them each, and train, checkpoint, resume (also after SIGTERM) and export as one does."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import env, records, run, save_teacher, write_data

from lrc.cli import main
from lrc.errors import UserError
from lrc.train import checkpoint as ckpt

COMMON = ["--method", "lrc",
          "--hidden-size", "32", "--seq-len", "32", "--precision", "fp32", "--lr", "3e-3", "--calib-batches", "2",
          "--eval-batches", "2", "--log-every", "1", "--parallel", "fsdp", "--grad-accum", "2",
          # pca, not the default refit: see tests/end_to_end/test_distill.py's PCA_START (calibration batches of 4 vs 8)
          "--init", "pca"]
LOGGED = ("step", "tokens", "loss", "ce", "kl", "clone", "lr", "grad_norm")
# one OpenMP thread (conftest.one_thread); runs write their caches under this module's folder
pytestmark = pytest.mark.usefixtures("one_thread", "lrc_cache")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "llama", "llama", tied=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "txt")


def distill_args(teacher, data, out, *extra) -> list[str]:
    return [str(a) for a in ("distill", "--teacher", teacher, "--data", data, "--out", out, *COMMON, *extra)]


def torchrun_cmd(*argv) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lrc",
            *argv]


def torchrun(cache_dir: Path, *argv) -> str:
    proc = subprocess.run(torchrun_cmd(*argv), capture_output=True, text=True, env=env(cache_dir), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def logged(run_dir: Path) -> list[dict]:
    return [{k: r[k] for k in LOGGED} for r in records(run_dir)]


def last_trainables(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(ckpt.checkpoint_dirs(run_dir)[-1], torch.device("cpu"))[0]


STEPS = ("--max-steps", "4", "--save-every", "2", "--eval-every", "2")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, teacher, data, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LRC_CACHE", str(cache_dir))
        run(*distill_args(teacher, data, out, *STEPS, "--batch-size", "8"))
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, teacher, data, cache_dir) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("sharded") / "run"
    return out, torchrun(cache_dir, *distill_args(teacher, data, out, *STEPS, "--batch-size", "4"))


def _mib_pairs(text: str, label: str) -> tuple[float, float]:
    held, whole = re.search(re.escape(label) + r" ([\d.e+-]+) MiB of ([\d.e+-]+) MiB", text).groups()
    return float(held), float(whole)


@pytest.mark.slow
def test_each_process_holds_half_of_the_projections_and_their_adamw_state(two_processes):
    out, stdout = two_processes
    assert "each read from the files by its own process" in stdout  # no process loaded the whole teacher
    held, whole = _mib_pairs(stdout, "layer projections sharded (FSDP2):")
    assert held == pytest.approx(whole / 2, rel=1e-3), stdout
    # measured after training, the largest of the two processes: parameters and AdamW's moments
    line = next(x for x in stdout.splitlines() if x.startswith("held per process"))
    p_held, p_whole = _mib_pairs(line, "sharded params")
    o_held, o_whole = _mib_pairs(line, "sharded optimizer")
    assert p_held == pytest.approx(p_whole / 2, rel=1e-3) and p_whole == pytest.approx(whole, rel=1e-3), line
    assert o_held == pytest.approx(o_whole / 2, rel=1e-3) and o_whole == pytest.approx(2 * whole, rel=1e-3), line
    # what stays whole on every process (embedding/head projections, final norm) is small next to it
    w_held, w_whole = _mib_pairs(line, "whole params")
    assert w_held == w_whole < whole / 4, line


@pytest.mark.slow
def test_sharded_run_matches_one_process_and_exports_the_same_model(two_processes, one_process, tmp_path):
    out, stdout = two_processes
    a, b = records(one_process), records(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for k in ("loss", "ce", "kl", "clone", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4), (rb["step"], k)
    for ra, rb in zip(records(one_process, "val"), records(out, "val"), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)

    # Written by torch.distributed.checkpoint, each process its own shards; nothing else in the run folder.
    last = ckpt.checkpoint_dirs(out)[-1]
    assert ckpt.is_sharded_checkpoint(last) and not (last / "trainable.safetensors").exists()
    assert json.loads((last / "state.json").read_text())[ckpt.SHARDED_OVER] == 2
    assert sorted(p.name for p in (last / ckpt.SHARDED).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]

    from safetensors.torch import load_file

    run("export", one_process, "--out", tmp_path / "one")
    run("export", out, "--out", tmp_path / "two")
    one, two = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys()
    for k, v in one.items():
        assert torch.allclose(two[k], v, rtol=1e-3, atol=1e-5), k


@pytest.mark.slow
def test_sharded_run_with_gradient_checkpointing_matches_one_process(one_process, tmp_path, teacher, data, cache_dir):
    """Under --grad-checkpointing each layer's projections are gathered again in its recomputation, and with
    --recompute-targets its teacher layer (itself sharded) runs again there for the clone targets: the same
    losses as one process without either, and the same trained projections."""
    out = tmp_path / "run"
    stdout = torchrun(cache_dir, *distill_args(teacher, data, out, *STEPS, "--batch-size", "4",
                                               "--grad-checkpointing", "--recompute-targets"))
    assert "gathered one layer at a time" in stdout
    for ra, rb in zip(records(one_process), records(out), strict=True):
        for k in ("loss", "ce", "kl", "clone", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4), (rb["step"], k)
    a, b = last_trainables(one_process), last_trainables(out)
    for k in a:
        assert torch.allclose(b[k], a[k], rtol=1e-3, atol=1e-6), k


@pytest.mark.slow
def test_resume_on_another_process_count_is_refused(two_processes, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_processes[0], out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["distill", "--out", str(out), "--resume", "--max-steps", "6"]) == 2  # 1 process, not 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sharded over 2 processes" in err and "--nproc-per-node 2" in err, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written


def test_check_resumable(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"step": 2, ckpt.SHARDED_OVER: 2}))
    ckpt.check_resumable(tmp_path, 2, sharded=True)
    for world, sharded in ((4, True), (1, False), (2, False)):
        with pytest.raises(UserError, match="sharded over 2 processes"):
            ckpt.check_resumable(tmp_path, world, sharded)
    (tmp_path / "state.json").write_text(json.dumps({"step": 2}))
    ckpt.check_resumable(tmp_path, 2, sharded=False)
    with pytest.raises(UserError, match="without sharded trainables"):
        ckpt.check_resumable(tmp_path, 2, sharded=True)


SIGNAL_STEPS = 30  # long enough that a signal sent at the first record lands mid-run


@pytest.mark.slow
def test_sigterm_then_resume_matches_an_uninterrupted_sharded_run(tmp_path, teacher, data, cache_dir):
    steps = ("--max-steps", str(SIGNAL_STEPS), "--eval-every", "0", "--batch-size", "4")
    straight = tmp_path / "straight"
    torchrun(cache_dir, *distill_args(teacher, data, straight, *steps))

    out, log = tmp_path / "run", tmp_path / "log.txt"
    with log.open("w") as f:
        proc = subprocess.Popen(torchrun_cmd(*distill_args(teacher, data, out, *steps)), stdout=f,
                                stderr=subprocess.STDOUT, env=env(cache_dir))
    metrics = out / "metrics.jsonl"
    try:
        while not (metrics.is_file() and '"train"' in metrics.read_text()):
            assert proc.poll() is None, log.read_text()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to both processes
        proc.wait(timeout=120)
    finally:
        proc.kill()
    text = log.read_text()
    assert "interrupted at step" in text, text
    stopped = int(text.split("interrupted at step ")[1].split(":")[0])
    assert 1 <= stopped < SIGNAL_STEPS
    assert [p.name for p in ckpt.checkpoint_dirs(out)] == [f"step-{stopped:08d}"]

    torchrun(cache_dir, "distill", "--out", out, "--resume")
    assert logged(out) == logged(straight)
    a, b = last_trainables(out), last_trainables(straight)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
