"""Process-group set-up for torchrun, kept apart from the model and the loop.

One process without torchrun is rank 0 of 1. Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) we join the
group (NCCL on CUDA, gloo on CPU). Every method's trainables are kept in step by hand
(`broadcast_from_rank0` once, `average_gradients` once per optimizer step): LRC's gradients arrive only at the
end of a step (the student is generated once per step), so DDP's per-backward hooks cannot serve it, and one
way serves all methods. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lrc.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


DEVICE_FORMS = "auto, cpu, cuda or cuda:N"


def pick_device(spec: str, local_rank: int = 0, local_processes: int = 1) -> torch.device:
    """This process's device for `--device spec`; `local_rank` and `local_processes` (torchrun's LOCAL_RANK
    and LOCAL_WORLD_SIZE: the processes sharing this machine's GPUs) are 0 and 1 without torchrun.

    auto: cuda:LOCAL_RANK where CUDA is available, else cpu. cuda: cuda:LOCAL_RANK (cuda:0 in one process).
    cuda:N: that GPU in one process; with several processes on the machine only N == LOCAL_RANK, since two
    processes must not share a GPU. cpu: cpu. Anything else, cuda without CUDA, or a GPU the machine does
    not have: a one-line UserError.
    """
    s = str(spec).strip().lower()
    if s == "cpu":
        return torch.device("cpu")
    if s == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        s = "cuda"
    named = re.fullmatch(r"cuda:(\d+)", s, flags=re.ASCII)
    if s == "cuda":
        index = local_rank
    elif named:
        index = int(named.group(1))
        if local_processes > 1 and index != local_rank:
            raise UserError(
                f"--device {spec}: {local_processes} processes share this machine and each needs a GPU of its own, "
                f"but this one (LOCAL_RANK {local_rank}) would use cuda:{index}; pass --device cuda (process i "
                f"takes cuda:i) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    else:
        raise UserError(f"--device {spec!r} is not a device; use {DEVICE_FORMS} (auto: cuda:LOCAL_RANK where "
                        f"CUDA is available, else cpu)")
    if not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise UserError(f"--device {spec}: CUDA is not available ({why}); use --device cpu or auto")
    count = torch.cuda.device_count()
    if index >= count:
        if named and local_processes <= 1:
            raise UserError(f"--device {spec}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        raise UserError(f"--device {spec}: this process has LOCAL_RANK {local_rank} but the machine has only "
                        f"{count} CUDA device(s); start at most {count} processes per machine "
                        f"(torchrun --nproc-per-node {count})")
    return torch.device("cuda", index)


def init_distributed(device_spec: str = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=pick_device(device_spec))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_spec, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_from_rank0(params: Sequence[torch.Tensor], info: DistInfo) -> None:
    """Make replicated parameters identical on every rank (rank 0's values), as DDP does when it wraps."""
    if info.enabled:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p, src=0)


def average_gradients(params: list[torch.Tensor], info: DistInfo) -> None:
    """Average the gradients of replicated parameters over all ranks, in place (no flat copy: for a large
    teacher the projections' gradients run to gigabytes)."""
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    for work in [dist.all_reduce(g, async_op=True) for g in grads]:
        work.wait()
    torch._foreach_div_(grads, float(info.world_size))


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
