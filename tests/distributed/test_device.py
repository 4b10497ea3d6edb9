"""`--device`: which device each process takes (`lrc.distributed.processes.pick_device`), alone and under torchrun.

CUDA is faked (`torch.cuda.is_available` / `device_count` monkeypatched), so this runs on CPU-only machines;
`torch.device("cuda:1")` is only a name and needs no GPU."""

from __future__ import annotations

import pytest
import torch

from lrc.distributed import processes as distributed
from lrc.distributed.processes import init_distributed, pick_device
from lrc.errors import UserError


@pytest.fixture
def gpus(monkeypatch):
    """gpus(n): pretend this machine has n CUDA devices (0: CUDA not available)."""
    def fake(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return fake


@pytest.mark.parametrize("spec,local_rank,processes,n_gpus,expected", [
    ("auto", 0, 1, 0, "cpu"),
    ("auto", 0, 1, 2, "cuda:0"),
    ("auto", 1, 2, 2, "cuda:1"),
    ("cuda", 0, 1, 1, "cuda:0"),      # one process: GPU 0
    ("cuda", 1, 2, 2, "cuda:1"),      # torchrun: each process its own GPU, by LOCAL_RANK
    ("cuda", 3, 4, 8, "cuda:3"),
    ("cuda:1", 0, 1, 2, "cuda:1"),    # one process may pick any GPU
    ("cuda:1", 1, 2, 2, "cuda:1"),    # under torchrun only its own
    ("cpu", 0, 1, 2, "cpu"),
    ("cpu", 1, 2, 2, "cpu"),
    (" CUDA ", 0, 1, 1, "cuda:0"),
])
def test_device_of_each_form(gpus, spec, local_rank, processes, n_gpus, expected):
    gpus(n_gpus)
    assert pick_device(spec, local_rank, processes) == torch.device(expected)


@pytest.mark.parametrize("spec,local_rank,processes,n_gpus,needles", [
    # two processes on one GPU
    ("cuda:0", 1, 2, 2, ("--device cuda:0", "LOCAL_RANK 1", "own", "--device cuda")),
    ("cuda:1", 0, 2, 2, ("--device cuda:1", "LOCAL_RANK 0", "own")),
    # no CUDA
    ("cuda", 0, 1, 0, ("--device cuda", "CUDA is not available", "--device cpu")),
    ("cuda:0", 0, 1, 0, ("CUDA is not available",)),
    ("cuda", 1, 2, 0, ("CUDA is not available",)),
    # more processes than GPUs, or a GPU that is not there
    ("cuda", 2, 4, 2, ("LOCAL_RANK 2", "only 2 CUDA device(s)", "--nproc-per-node 2")),
    ("auto", 2, 4, 2, ("LOCAL_RANK 2", "only 2 CUDA device(s)")),
    ("cuda:2", 0, 1, 2, ("--device cuda:2", "2 CUDA device(s)", "cuda:0 to cuda:1")),
    # not a device
    ("gpu", 0, 1, 1, ("'gpu'", "auto, cpu, cuda or cuda:N")),
    ("cuda:x", 0, 1, 1, ("'cuda:x'", "auto, cpu, cuda or cuda:N")),
    ("cuda:-1", 0, 1, 1, ("auto, cpu, cuda or cuda:N",)),
    ("cuda:0:1", 0, 1, 1, ("auto, cpu, cuda or cuda:N",)),
    ("mps", 0, 1, 0, ("'mps'", "auto, cpu, cuda or cuda:N")),
    ("", 0, 1, 0, ("auto, cpu, cuda or cuda:N",)),
])
def test_bad_device_is_a_one_line_user_error(gpus, spec, local_rank, processes, n_gpus, needles):
    gpus(n_gpus)
    with pytest.raises(UserError) as e:
        pick_device(spec, local_rank, processes)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.fixture
def fake_group(monkeypatch):
    """Record what init_distributed asks of torch.distributed and CUDA instead of doing it."""
    calls: dict = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.setdefault("backend", backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", torch.device(d)))
    return calls


def _torchrun_env(monkeypatch, rank: int, local_rank: int, world: int, local_world: int | None):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))


@pytest.mark.parametrize("local_world", [2, None])  # LOCAL_WORLD_SIZE missing: all WORLD_SIZE processes count
def test_torchrun_processes_take_their_own_gpu(monkeypatch, gpus, fake_group, local_world):
    gpus(2)
    _torchrun_env(monkeypatch, rank=1, local_rank=1, world=2, local_world=local_world)
    info = init_distributed("cuda")
    assert info.device == torch.device("cuda:1") and info.device.index == 1
    assert fake_group == {"set_device": torch.device("cuda:1"), "backend": "nccl"}
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 1)


def test_torchrun_with_one_named_gpu_for_every_process_is_refused(monkeypatch, gpus, fake_group):
    gpus(2)
    _torchrun_env(monkeypatch, rank=1, local_rank=1, world=2, local_world=2)
    with pytest.raises(UserError, match="LOCAL_RANK 1"):
        init_distributed("cuda:0")
    assert fake_group == {}  # refused before joining the group


def test_one_process_per_machine_may_name_its_gpu(monkeypatch, gpus, fake_group):
    # two machines with one process each: LOCAL_RANK 0 on both, no GPU is shared
    gpus(4)
    _torchrun_env(monkeypatch, rank=1, local_rank=0, world=2, local_world=1)
    assert init_distributed("cuda:3").device == torch.device("cuda:3")


def test_torchrun_on_cpu_uses_gloo(monkeypatch, gpus, fake_group):
    gpus(0)
    _torchrun_env(monkeypatch, rank=0, local_rank=0, world=2, local_world=2)
    assert init_distributed("auto").device == torch.device("cpu")
    assert fake_group == {"backend": "gloo"}


def test_one_process_without_torchrun(monkeypatch, gpus):
    gpus(2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cuda")
    assert info.device == torch.device("cuda:0") and not info.enabled
