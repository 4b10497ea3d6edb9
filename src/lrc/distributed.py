"""Process-group set-up for torchrun, kept apart from the model and the loop.

One process without torchrun is rank 0 of 1. Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) we join the
group (NCCL on CUDA, gloo on CPU); baselines are wrapped in DDP, while the LRC trainables are kept in step
by hand (`broadcast_from_rank0`, `average_gradients`) because their gradients arrive only at the end of an
optimizer step. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(spec)


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bf16 matrix instructions; elsewhere bf16 matmuls are emulated and ~100x slower."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def init_distributed(device_spec: str = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=pick_device(device_spec))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_spec, local_rank)
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


def broadcast_from_rank0(params: list[torch.Tensor], info: DistInfo) -> None:
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


def wrap_data_parallel(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    # Buffers (RoPE tables) are identical on every rank; no need to broadcast them each step.
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
