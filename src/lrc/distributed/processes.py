"""Process-group set-up for torchrun, kept apart from the model and the loop.

One process without torchrun is rank 0 of 1. Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) we join the
group (NCCL on CUDA, gloo on CPU). Every method's trainables are kept in step by hand
(`broadcast_from_rank0` once, `average_gradients` once per optimizer step): LRC's gradients arrive only at the
end of a step (the student is generated once per step), so DDP's per-backward hooks cannot serve it, and one
way serves all methods. Parameters sharded by FSDP2 (LRC's projections under `--parallel fsdp`, see
`lrc.distributed.fsdp`) are FSDP2's own: it averages their gradients when it reduce-scatters them, so the functions
here leave them alone, and the gradient norm sums their shards over ranks. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist

from lrc.distributed.fsdp import is_sharded
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


def device_kind(spec: str) -> str:
    """"cpu" or "cuda" for `--device spec` (auto: cuda where CUDA is available), without initialising CUDA;
    a UserError for anything that is not a device."""
    s = str(spec).strip().lower()
    if s == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if s in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", s, flags=re.ASCII):
        return "cpu" if s == "cpu" else "cuda"
    raise UserError(f"--device {spec!r} is not a device; use {DEVICE_FORMS} (auto: cuda:LOCAL_RANK where "
                    f"CUDA is available, else cpu)")


def pick_device(spec: str, local_rank: int = 0, local_processes: int = 1) -> torch.device:
    """This process's device for `--device spec`; `local_rank` and `local_processes` (torchrun's LOCAL_RANK
    and LOCAL_WORLD_SIZE: the processes sharing this machine's GPUs) are 0 and 1 without torchrun.

    auto: cuda:LOCAL_RANK where CUDA is available, else cpu. cuda: cuda:LOCAL_RANK (cuda:0 in one process).
    cuda:N: that GPU in one process; with several processes on the machine only N == LOCAL_RANK, since two
    processes must not share a GPU. cpu: cpu. Anything else, cuda without CUDA, or a GPU the machine does
    not have: a one-line UserError.
    """
    if device_kind(spec) == "cpu":
        return torch.device("cpu")
    s = str(spec).strip().lower()
    named = re.fullmatch(r"cuda:(\d+)", s, flags=re.ASCII)
    if not named:  # cuda, or auto where CUDA is available
        index = local_rank
    else:
        index = int(named.group(1))
        if local_processes > 1 and index != local_rank:
            raise UserError(
                f"--device {spec}: {local_processes} processes share this machine and each needs a GPU of its own, "
                f"but this one (LOCAL_RANK {local_rank}) would use cuda:{index}; pass --device cuda (process i "
                f"takes cuda:i) and choose the GPUs with CUDA_VISIBLE_DEVICES")
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
                if not is_sharded(p):  # a shard is its own rank's: FSDP2 sharded a tensor already broadcast
                    dist.broadcast(p, src=0)


def average_gradients(params: list[torch.Tensor], info: DistInfo) -> None:
    """Average the gradients of replicated parameters over all ranks, in place (no flat copy: for a large
    teacher the projections' gradients run to gigabytes)."""
    if not info.enabled:
        return
    # a sharded gradient was reduce-scattered (and averaged) by FSDP2 already
    grads = [p.grad for p in params if p.grad is not None and not is_sharded(p.grad)]
    for work in [dist.all_reduce(g, async_op=True) for g in grads]:
        work.wait()
    torch._foreach_div_(grads, float(info.world_size))


def clip_gradients(params: list[torch.Tensor], max_norm: float, info: DistInfo) -> float:
    """The global L2 norm of the gradients of `params` (after averaging), scaling them down to `max_norm` first
    when max_norm > 0 (the rule of `torch.nn.utils.clip_grad_norm_`, which serves where nothing is sharded).

    Sharded gradients count the squares of every rank's shard (one all-reduce); whole ones count once."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if is_sharded(g)]
    if not sharded:
        if max_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return float(torch.sqrt(cast(torch.Tensor, sum((g.float() ** 2).sum() for g in grads)))) if grads else 0.0
    locals_ = [g.to_local() for g in sharded]  # type: ignore[attr-defined]
    dev = locals_[0].device
    square = sum((t.double() ** 2).sum() for t in locals_)
    square = all_reduce_sum(torch.as_tensor(square, dtype=torch.float64, device=dev), info)
    whole = [g for g in grads if not is_sharded(g)]
    square = square + sum((g.double() ** 2).sum().to(dev) for g in whole)
    norm = float(torch.sqrt(square))
    if max_norm > 0:
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            torch._foreach_mul_(locals_ + whole, coef)
    return norm


def cleanup(info: DistInfo, finished: bool = True) -> None:
    """Tear the process group down. After a run that finished, every process first waits for the others at a
    barrier: a process that destroys its gloo group while a peer is still sending to it can abort that peer
    at exit ("terminate called without an active exception"), failing a run that had completed. After an
    error there is no barrier (the others may never reach it)."""
    if info.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
