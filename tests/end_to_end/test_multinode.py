"""Several nodes as far as one machine allows: two torchrun "nodes" of 2 processes each, meeting at a c10d
rendezvous endpoint (as on a cluster: `torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT`), over
gloo, with a token cache of their own each (as separate machines would have), give the same run as 4
processes on one node: losses, held-out losses and trained weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import env, records, save_teacher, write_data

from lrc.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")
# scripts/gpu_check.sh runs this on CUDA (NCCL, one GPU per process) where several GPUs are lent
DEVICE = os.environ.get("LRC_TEST_DEVICE", "cpu")
PER_NODE = int(os.environ.get("LRC_TEST_PER_NODE", "2"))  # processes per "node"
RTOL = 1e-6 if DEVICE == "cpu" else 1e-4  # NCCL's reductions need not run in the same order on every layout
ARGS = ["--method", "lrc",
        "--device", DEVICE, "--hidden-size", "32", "--seq-len", "32", "--batch-size", "2", "--precision", "fp32",
        "--lr", "3e-3",
        "--init", "pca", "--calib-batches", "2", "--eval-batches", "2", "--log-every", "1", "--parallel", "fsdp",
        "--max-steps", "3", "--save-every", "3", "--eval-every", "3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distill(teacher: Path, data: Path, out: Path) -> list[str]:
    return ["-m", "lrc", "distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *ARGS]


def _last_trainables(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(ckpt.checkpoint_dirs(run_dir)[-1], torch.device("cpu"))[0]


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.device_count() < 2 * PER_NODE,
                    reason=f"needs {2 * PER_NODE} CUDA devices")
def test_two_nodes_of_two_match_one_node_of_four(tmp_path):
    teacher = save_teacher(tmp_path / "teacher", "llama", tied=False)
    data = write_data(tmp_path / "data")
    run = [sys.executable, "-m", "torch.distributed.run"]

    one = tmp_path / "one-node"
    proc = subprocess.run([*run, "--standalone", "--nproc-per-node", str(2 * PER_NODE),
                           *_distill(teacher, data, one)],
                          capture_output=True, text=True, env=env(tmp_path / "cache-one"), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    two = tmp_path / "two-nodes"
    endpoint = f"127.0.0.1:{_free_port()}"

    def node_env(r: int) -> dict[str, str]:
        e = env(tmp_path / f"cache-node{r}")
        if DEVICE == "cuda":  # each "node" its own GPUs, as on two machines
            e["CUDA_VISIBLE_DEVICES"] = ",".join(str(r * PER_NODE + i) for i in range(PER_NODE))
        return e

    nodes = [subprocess.Popen(
        [*run, "--nnodes", "2", "--nproc-per-node", str(PER_NODE), "--node-rank", str(r), "--rdzv-backend", "c10d",
         "--rdzv-endpoint", endpoint, "--rdzv-id", "lrc-test", "--rdzv-conf", f"is_host={int(r == 0)}",
         *_distill(teacher, data, two)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=node_env(r))
        for r in (0, 1)]
    outputs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(outputs)
    assert outputs[0].count("done: 3 steps") == 1 and "done:" not in outputs[1]  # global rank 0 prints

    for split in ("train", "val"):
        a, b = records(one, split), records(two, split)
        assert [r["step"] for r in a] == [r["step"] for r in b] and a
        for ra, rb in zip(a, b, strict=True):
            assert rb["loss"] == pytest.approx(ra["loss"], rel=RTOL), (split, ra["step"])
    want, got = _last_trainables(one), _last_trainables(two)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=RTOL * 10, atol=1e-7), k
