"""Runs that survive being killed: one command (`lrc distill ... --resume`) starts a run and restarts it after
SIGKILL at any moment, and finishes with the weights of a run never killed; what a killed checkpoint save,
deletion or export leaves is never taken for complete; a save that fails (disk full) under torchrun stops every
process with one line and leaves the previous checkpoint intact."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import env, kill_tree, records, run, save_teacher, write_data
from safetensors.torch import load_file

from lrc.cli import main
from lrc.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread", "lrc_cache")

STEPS = 24
COMMON = ["--method", "lrc",
          "--hidden-size", "32", "--seq-len", "32", "--batch-size", "4", "--precision", "fp32", "--lr", "auto",
          "--init", "refit", "--calib-batches", "2", "--eval-batches", "2", "--log-every", "1", "--eval-every", "0",
          "--max-steps", str(STEPS)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "llama", "llama", tied=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "txt", "txt")


def command(teacher, data, out, *extra) -> list[str]:
    """The one command of a job script: it starts the run, and after a kill it continues it."""
    return [str(a) for a in ("distill", "--teacher", teacher, "--data", data, "--out", out, *COMMON, "--resume",
                             *extra)]


def weights(run_dir: Path) -> dict:
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return ckpt.load_checkpoint(last, torch.device("cpu"))[0]  # sharded (fsdp) or not


def logged(run_dir: Path) -> list[dict]:
    return [{k: r[k] for k in ("step", "tokens", "loss", "lr", "grad_norm")} for r in records(run_dir)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, teacher, data, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LRC_CACHE", str(cache_dir))
        run(*command(teacher, data, out, "--save-every", "4"))
    return out


def test_the_same_command_starts_a_run_and_restarts_one_killed_before_its_first_checkpoint(tmp_path, teacher, data,
                                                                                          straight, capsys):
    out = tmp_path / "run"
    cmd = command(teacher, data, out, "--save-every", "4")
    assert main(cmd) == 0  # --resume with no run in --out starts it (with --lr auto and --init refit)
    assert logged(out) == logged(straight)
    assert main(cmd) == 0  # a finished run: nothing to do, nothing changed
    assert logged(out) == logged(straight)

    # killed before its first checkpoint: config.yaml and some records, no checkpoint
    (out / "checkpoints").rename(tmp_path / "gone")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"split": "train", "step": 3, "lo')  # a line torn by the kill
    assert main(cmd) == 0
    assert logged(out) == logged(straight)
    assert records(out, "init") == records(straight, "init")  # the run started again: its records once
    assert all(w.equal(v) for w, v in zip(weights(out).values(), weights(straight).values(), strict=True))

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(command(teacher, data, odd)) == 2
    assert "holds no run to continue (no config.yaml) and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in odd.iterdir()) == ["notes.txt"]


def test_leftovers_of_killed_saves_and_deletions_are_never_taken_for_checkpoints(tmp_path, teacher, data,
                                                                                  straight):
    out = tmp_path / "run"
    cmd = command(teacher, data, out, "--save-every", "4", "--keep-checkpoints", "0")  # 0: keep all
    assert main(cmd) == 0
    root = out / "checkpoints"
    for later in sorted(root.glob("step-*"))[2:]:  # as if killed at step 9-11: steps 4 and 8 saved
        shutil.rmtree(later)
    # and what kills leave: a save cut short (a temporary folder of step 12), a deletion cut short (renamed)
    (root / ".tmp-step-00000012").mkdir()
    (root / ".tmp-step-00000012" / "trainable.safetensors").write_bytes(b"\0" * 7)
    (root / ".old-step-00000000").mkdir()
    assert main(cmd) == 0
    assert sorted(p.name for p in root.iterdir()) == [f"step-{s:08d}" for s in range(4, STEPS + 1, 4)]
    assert logged(out) == logged(straight)
    assert all(w.equal(v) for w, v in zip(weights(out).values(), weights(straight).values(), strict=True))


def test_a_run_folder_another_process_writes_in_is_refused(tmp_path, teacher, data, capsys):
    """E.g. the workers of a torchrun killed alone, which go on training: a restart must not write beside them."""
    import fcntl
    import os

    out = tmp_path / "run"
    cmd = command(teacher, data, out, "--save-every", "4")
    assert main([*cmd, "--max-steps", "4"]) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the other run's rank 0 holds it
        capsys.readouterr()
        assert main(cmd) == 2
        assert "is in use by another lrc process" in capsys.readouterr().err
    finally:
        os.close(fd)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert main([*cmd, "--max-steps", "4"]) == 0  # free again (and a finished run of 4 steps)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_repeated_sigkills_with_the_same_command_end_as_a_run_never_killed(nproc, tmp_path, teacher, data,
                                                                           straight, cache_dir):
    """Killed (SIGKILL, the process and all its descendants) at random moments, some of them while a checkpoint is being
    written, then started again with the same command until it finishes. --save-every 1 makes every step a
    save; the weights and every logged step equal the same command run once without a kill."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    cmd = [*command(teacher, data, out, "--save-every", "1"), "--max-steps", "150"]  # (the last --max-steps wins)
    launcher = [sys.executable, "-m", "lrc"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lrc"]
    rng = random.Random(nproc)
    kills = 0
    for _ in range(12):
        with log.open("a") as f:
            proc = subprocess.Popen([*launcher, *cmd], stdout=f, stderr=subprocess.STDOUT, env=env(cache_dir),
                                    )
        if kills < 4:
            done = len(records_safe(out)) if (out / "metrics.jsonl").is_file() else 0
            deadline = time.time() + 240
            while proc.poll() is None and time.time() < deadline:  # wait for a new training step
                if len(records_safe(out)) > done:
                    break
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.25))
            if proc.poll() is None:
                kill_tree(proc.pid)
                kills += 1
        rc = proc.wait(timeout=300)
        if rc == 0:
            break
        assert rc == -signal.SIGKILL or nproc == 2, log.read_text()[-3000:]
    assert rc == 0 and kills == 4, (kills, log.read_text()[-3000:])
    ref = tmp_path / "ref"
    subprocess.run([*launcher, *[str(ref) if a == str(out) else a for a in cmd]], check=True, capture_output=True,
                   env=env(cache_dir), timeout=300)
    assert logged(out) == logged(ref)
    got, want = weights(out), weights(ref)
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in got)
    assert not [p for p in (out / "checkpoints").iterdir() if not p.name.startswith("step-")]


def records_safe(run_dir: Path) -> list:
    """The training records written so far ([] while the file is absent or a line is being written)."""
    try:
        return records(run_dir)
    except (OSError, ValueError):
        return []


@pytest.mark.slow
def test_a_killed_export_leaves_nothing_at_out_and_the_same_command_finishes_it(tmp_path, teacher, data, straight,
                                                                                 cache_dir):
    clean = tmp_path / "clean"
    assert main(["export", str(straight), "--out", str(clean)]) == 0
    out = tmp_path / "model"
    partial = tmp_path / ".model.partial"
    cmd = [sys.executable, "-m", "lrc", "export", str(straight), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(cache_dir))
    deadline = time.time() + 120
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert not out.exists()  # only the hidden partial folder, never a model at --out
    subprocess.run(cmd, check=True, capture_output=True, env=env(cache_dir), timeout=300)
    assert not partial.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
    a, b = load_file(str(out / "model.safetensors")), load_file(str(clean / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


DISK_FULL = textwrap.dedent("""
    # `lrc` with the disk filling up at the second checkpoint save of rank 0 (safetensors, or under --parallel
    # fsdp the sharded writer of torch.distributed.checkpoint)
    import errno, os, sys
    import safetensors.torch
    from torch.distributed.checkpoint import filesystem
    import lrc.train.checkpoint
    calls = []
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    def save_file(*args, **kwargs):
        calls.append(1)
        return (full if len(calls) == 2 else safetensors.torch.save_file)(*args, **kwargs)
    lrc.train.checkpoint.save_file = save_file
    write_data = filesystem._FileSystemWriter.write_data
    def sharded_write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and os.environ["RANK"] == "0":
            full()
        return write_data(self, *args, **kwargs)
    filesystem._FileSystemWriter.write_data = sharded_write
    from lrc.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_full_disk_under_torchrun_stops_every_process_and_keeps_the_last_checkpoint(parallel, tmp_path, teacher,
                                                                                     data, cache_dir):
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL)
    out = tmp_path / "run"
    cmd = command(teacher, data, out, "--save-every", "4", "--parallel", parallel)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run([*launcher, str(script), *cmd], capture_output=True, text=True, env=env(cache_dir),
                          timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lrc: error:")]
    assert len(errors) == 2, proc.stderr[-3000:]  # each process stops with one line, none waits to be killed
    assert any("saving checkpoint step-00000008 failed (No space left on device); the previous checkpoint "
               in e and "step-00000004 is intact" in e for e in errors), errors
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004"]
    subprocess.run([*launcher, "-m", "lrc", *cmd], check=True, capture_output=True, env=env(cache_dir), timeout=300)
    ref = tmp_path / "ref"
    subprocess.run([*launcher, "-m", "lrc", *command(teacher, data, ref, "--save-every", "4", "--parallel", parallel)],
                   check=True, capture_output=True, env=env(cache_dir), timeout=300)
    assert logged(out) == logged(ref)
    got, want = weights(out), weights(ref)
    assert all(got[k].equal(want[k]) for k in want)
