"""`--free-after`: LRC for a share of the run, then the student multiplied out and trained freely (kd) on the
same schedule, in one run that resumes exactly on either side of the switch and exports the free student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import records, save_teacher, write_data
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lrc.train.trainer
from lrc.cli import main
from lrc.methods.direct import ALIGNMENT
from lrc.optim import lr_rule

RUN = ["--method", "lrc",
       "--hidden-size", "32", "--seq-len", "32", "--batch-size", "4", "--precision", "fp32", "--calib-batches", "2",
       "--eval-batches", "1", "--log-every", "1", "--eval-every", "0", "--max-steps", "8", "--save-every", "2",
       "--free-after", "0.5", "--lr", "3e-3"]
LOGGED = ("step", "tokens", "loss", "ce", "kl", "clone", "lr", "grad_norm")
pytestmark = pytest.mark.usefixtures("one_thread", "lrc_cache")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("inputs")
    return save_teacher(root / "teacher"), write_data(root / "data")


def _distill(inputs, out: Path, *extra) -> int:
    teacher, data = inputs
    return main(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *RUN, *extra])


def _train(run: Path) -> list[dict]:
    return [{k: r.get(k) for k in LOGGED} for r in records(run)]


def _last(run: Path) -> dict:
    return load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"))


@pytest.fixture(scope="module")
def straight(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    assert _distill(inputs, out) == 0
    return out


def test_the_run_switches_once_at_its_share_of_the_steps(straight):
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "switch"] == [4]
    train = [r for r in rows if r["split"] == "train"]
    # kd's objective after the switch (clone terms only with --keep-clone-terms)
    assert all(r["clone"] > 0 for r in train[:4]) and all(r.get("clone", 0) == 0 for r in train[4:])
    # one cosine, not restarted, whose peak becomes the free weights' own at the switch (--free-lr auto: the
    # free-weight rule from the start's measured KL to the teacher, stored in config.yaml)
    saved = yaml.safe_load((straight / "config.yaml").read_text())
    init = next(r for r in rows if r["split"] == "init")
    start_kl = init["heldout_kl_refit"] if init["refit_kept"] else init["heldout_kl_pca"]
    free_lr = lr_rule.free_lr_from_start(32, start_kl, 4 * 32)
    assert saved["lr"] == 3e-3 and saved["free_lr"] == free_lr != saved["lr"]
    factors = [r["lr"] / (saved["lr"] if r["step"] <= 4 else saved["free_lr"]) for r in train]
    assert factors == sorted(factors, reverse=True) and factors[3] > factors[4]
    state = json.loads((sorted((straight / "checkpoints").glob("step-*"))[-1] / "state.json").read_text())
    assert state["free_weights"] is True
    last = _last(straight)
    assert any(k.endswith("q_proj.weight") for k in last)  # a free student's weights, not projections
    assert not any(k.startswith(ALIGNMENT) for k in last)  # no clone terms: no maps


@pytest.mark.parametrize("stop_at", [3, 6])  # before and after the switch at step 4
def test_resume_on_either_side_of_the_switch_matches_the_straight_run(inputs, straight, tmp_path, monkeypatch,
                                                                      stop_at):
    out = tmp_path / "run"
    with monkeypatch.context() as m:  # a signal at step stop_at: the checkpoint is written and the run stops
        m.setattr(lrc.train.trainer, "_stop_requested", lambda s, stop: s.step == stop_at)
        assert _distill(inputs, out) > 128
    assert [r["step"] for r in records(out)] == list(range(1, stop_at + 1))
    assert main(["distill", "--out", str(out), "--resume"]) == 0
    assert _train(out) == _train(straight)
    got, want = _last(out), _last(straight)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_export_after_the_switch_is_the_free_student(straight, tmp_path):
    assert main(["export", str(straight), "--out", str(tmp_path / "model")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    exported = model.state_dict()
    student = {k: v for k, v in _last(straight).items() if not k.startswith(ALIGNMENT)}  # the maps stay behind
    assert student and not any(k.startswith(ALIGNMENT) for k in exported)
    for k, v in student.items():
        assert torch.equal(exported[k], v), k


def test_free_after_is_for_lrc_runs(inputs, tmp_path, capsys):
    assert _distill(inputs, tmp_path / "run", "--method", "kd") == 2
    assert "--free-after" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _refused(inputs, out: Path, *extra) -> None:
    """The one-line error of a run without the switch but with `extra`; nothing written."""
    teacher, data = inputs
    no_switch = RUN[:RUN.index("--free-after")] + RUN[RUN.index("--free-after") + 2:]
    assert main(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *no_switch,
                 *extra]) == 2
    assert not out.exists()


@pytest.mark.parametrize("extra", [[], ["--method", "kd", "--grad-checkpointing"]])
def test_recompute_targets_is_for_checkpointed_lrc_runs(inputs, tmp_path, capsys, extra):
    _refused(inputs, tmp_path / "run", *extra, "--recompute-targets")
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--recompute-targets" in err and "--grad-checkpointing" in err, err


@pytest.mark.parametrize("extra", [["--method", "lrc"], ["--method", "kd", "--init", "random"],
                                   ["--method", "prune-kd"]])
def test_keep_clone_terms_is_for_students_from_lrcs_start(inputs, tmp_path, capsys, extra):
    _refused(inputs, tmp_path / "run", *extra, "--keep-clone-terms")
    assert "--keep-clone-terms" in capsys.readouterr().err
