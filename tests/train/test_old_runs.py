"""A run folder written by an earlier version (main at 7644d85, before the package was split into
subpackages) still resumes and exports with today's code, to the same numbers that version gave.

The fixture was made with that commit's code: `lrc distill --teacher teacher --data data --out run ...` (the
command is in run/commands.txt) for 4 steps, then, from a copy, `--resume --max-steps 6` (its records are
expected/resumed-metrics.jsonl) and `lrc export run` (expected/export-model.safetensors)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lrc.cli import main

FIXTURE = Path(__file__).parents[1] / "fixtures" / "run-7644d85"
COMPARED = ("step", "tokens", "loss", "ce", "kl", "clone", "lr", "grad_norm", "perplexity")
pytestmark = pytest.mark.usefixtures("one_thread", "lrc_cache")


@pytest.fixture
def old_run(tmp_path, monkeypatch) -> Path:
    for part in ("teacher", "data", "run"):  # relative paths in the saved config: run from the copy's folder
        shutil.copytree(FIXTURE / part, tmp_path / part)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_an_old_run_resumes_to_the_numbers_it_gave(old_run):
    assert main(["distill", "--out", "run", "--resume", "--max-steps", "6"]) in (0, None)
    got = _records(old_run / "run" / "metrics.jsonl")
    want = _records(FIXTURE / "expected" / "resumed-metrics.jsonl")
    assert [(r["split"], r["step"]) for r in got] == [(r["split"], r["step"]) for r in want]
    for g, w in zip(got, want):
        for key in COMPARED:
            if key in w:
                assert math.isclose(g[key], w[key], rel_tol=1e-5, abs_tol=1e-7), (g["split"], g["step"], key)


def test_an_old_run_exports_the_same_model(old_run):
    assert main(["export", "run", "--out", "model"]) in (0, None)
    got = load_file(str(old_run / "model" / "model.safetensors"))
    want = load_file(str(FIXTURE / "expected" / "export-model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
