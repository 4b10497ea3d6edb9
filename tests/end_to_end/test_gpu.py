"""On CUDA, through the CLI (`python -m pytest -m gpu`; scripts/gpu_check.sh runs these): bf16 training of a
bf16 teacher, resume, export, and torchrun over NCCL. Skipped, with the reason, where there is no GPU.

1. `lrc distill --device cuda --precision bf16 --teacher-dtype bfloat16`: a run stopped at step 4 and resumed
   to step 8 matches a straight 8-step run (metrics.jsonl and the last checkpoint), and `lrc export`'s model
   gives the in-training student's logits (bf16 export: within bf16 rounding; fp32 export: tightly).
2. torchrun with 2 processes on 2 GPUs (NCCL), `--parallel ddp` and `--parallel fsdp`, matches one process
   with twice the batch, as tests/end_to_end/test_distill.py checks with gloo on CPU.

Resume compares within a tolerance rather than bit for bit (tests/end_to_end/test_distill.py's CPU test is exact): CUDA
kernels may reduce in a different order from call to call. Deterministic algorithms are requested (the
differences are then expected to be zero), but an op without a deterministic kernel only warns.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import packed_batch
from helpers import env, records, run, save_teacher, write_data
from safetensors.torch import load_file

DEVICE = "cuda"
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("lrc_cache")]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")

COMMON = ["--method", "lrc",
          "--hidden-size", "32", "--seq-len", "32", "--batch-size", "4", "--lr", "3e-3", "--calib-batches", "2",
          "--eval-batches", "2", "--log-every", "1", "--device", DEVICE]
BF16 = ["--precision", "bf16", "--teacher-dtype", "bfloat16"]
LOSSES = ("loss", "ce", "kl", "clone", "grad_norm")
RESUME_REL = 2e-3       # per logged loss; 0 when every kernel is deterministic
RESUME_WEIGHTS = 2e-3   # relative Frobenius distance per trained tensor
# Export vs the in-training student, as max |diff| / max |logit|. In bf16 (the export in bf16, the student under
# bf16 autocast) rounding alone gives ~0.01 on this near-random tiny model (measured on CPU), as much as one
# more training step changes: this catches gross errors only (wrong layout or dtype handling, overflow; a 5%
# error in one norm gain gives 0.055). The fp32 export, exact on CPU, is the fine check.
BF16_LOGITS = 0.04
FP32_LOGITS = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _deterministic(one_thread):
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any matmul
    old = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(old[0], warn_only=old[1])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "llama", "llama", tied=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"), "txt")


def distill(teacher, data, out, *extra) -> Path:
    run("distill", "--teacher", teacher, "--data", data, "--out", out, *COMMON, *extra)
    return Path(out)


def distill_cmd(teacher, data, out, *extra) -> list[str]:
    return [str(a) for a in ("distill", "--teacher", teacher, "--data", data, "--out", out, *COMMON, *extra)]


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return load_file(str(last / "trainable.safetensors"))


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# ------------------------------------------------------------------------------------------- one GPU, bf16


@needs_cuda
def test_bf16_resume_matches_a_straight_run_and_export_matches_the_student(tmp_path, teacher, data, capsys):
    from transformers import AutoModelForCausalLM

    from lrc.train.run import load_run

    # A constant schedule, as in tests/end_to_end/test_distill.py: a run planned for 4 steps and extended to 8
    # follows the schedule of an 8-step run only when the schedule does not depend on --max-steps.
    args = ("--schedule", "constant", "--save-every", "2", *BF16)
    straight = distill(teacher, data, tmp_path / "straight", "--max-steps", "8", *args)
    assert f"8 steps on 1 x {DEVICE}:0" in capsys.readouterr().out  # it ran on the GPU, not quietly on the CPU
    split = distill(teacher, data, tmp_path / "split", "--max-steps", "4", *args)
    assert [r["step"] for r in records(split)] == [1, 2, 3, 4]
    run("distill", "--out", split, "--resume", "--max-steps", "8")

    a, b = records(straight), records(split)
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [(r["tokens"], r["lr"]) for r in b] == [(r["tokens"], r["lr"]) for r in a]
    for ra, rb in zip(a, b, strict=True):
        for k in LOSSES:
            assert rb[k] == pytest.approx(ra[k], rel=RESUME_REL), (rb["step"], k, ra[k], rb[k])
    wa, wb = last_weights(straight), last_weights(split)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == torch.float32, k  # fp32 master weights under bf16 autocast
        assert relative_distance(wb[k], wa[k]) <= RESUME_WEIGHTS, k

    # Export, then compare with the run's student as training computes it (bf16 autocast on the GPU).
    cfg, method, _, t = load_run(split, DEVICE)
    assert next(t.parameters()).dtype == torch.bfloat16 and cfg.compute.precision == "bf16"
    method.eval()
    ids, pos = packed_batch(batch=2, seq=32)
    ids, pos = ids.to(DEVICE), pos.to(DEVICE)
    for dtype, tol in (("bfloat16", BF16_LOGITS), ("float32", FP32_LOGITS)):
        model_dir = tmp_path / f"model-{dtype}"
        run("export", split, "--out", model_dir, "--dtype", dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(DEVICE).eval()
        assert next(model.parameters()).dtype == getattr(torch, dtype)
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            ref = method.clone.student_logits(ids, pos).float()
        with torch.no_grad():
            got = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
        assert got.shape == ref.shape and torch.isfinite(got).all()
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err <= tol, (dtype, err)


# ------------------------------------------------------------------------------------------- two GPUs, NCCL


@needs_two
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_nccl_two_processes_match_one(parallel, tmp_path, teacher, data, cache_dir):
    # fp32, so that one process and two agree as closely as they do with gloo on CPU (tests/end_to_end/test_distill.py)
    steps = ("--max-steps", "4", "--save-every", "2", "--eval-every", "2", "--grad-accum", "2",
             "--precision", "fp32", "--parallel", parallel)
    single = distill(teacher, data, tmp_path / "single", "--batch-size", "8", *steps)

    out = tmp_path / parallel
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lrc", *distill_cmd(teacher, data, out, *steps), "--batch-size", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(cache_dir), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # two ranks on one GPU: NCCL refuses
    assert proc.stdout.count("done: 4 steps") == 1, proc.stdout
    assert f"4 steps on 2 x {DEVICE}:0" in proc.stdout, proc.stdout  # rank 0 prints its own device

    a, b = records(single), records(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a]
    for ra, rb in zip(a, b, strict=True):
        for k in LOSSES:
            assert rb[k] == pytest.approx(ra[k], rel=1e-4), (rb["step"], k)
    for ra, rb in zip(records(single, "val"), records(out, "val"), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    for k, v in last_weights(single).items():
        assert torch.allclose(last_weights(out)[k], v, rtol=1e-3, atol=1e-5), k
