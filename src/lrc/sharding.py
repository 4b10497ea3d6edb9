"""A frozen teacher sharded across processes with FSDP2 (`--parallel fsdp`), for teachers too big for one device.

Every decoder layer and the base model are `fully_shard`-ed, so the teacher's forward all-gathers one layer
at a time through FSDP2's own hooks and frees it again. LRC also reads teacher matrices outside any forward
to generate the student's weights; `gathered` does that with an explicit all-gather (and `lrc.weights`'
projections gather a second time in backward rather than keep a whole matrix alive from forward to
backward, so at most one teacher matrix is whole at a time).

The trainable projections stay whole on every rank (small next to the teacher); the trainer averages
their gradients once per optimizer step (`distributed.average_gradients`), as it does under ddp.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support: nothing is ever sharded

    class DTensor:  # type: ignore[no-redef]
        pass


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an all-gather for a sharded teacher tensor, `t` itself otherwise."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_teacher(teacher: nn.Module, device: torch.device,
                  compute_dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """Shard `teacher` (a supported *ForCausalLM, frozen) over all ranks of the default process group.

    The teacher may be loaded on the CPU: FSDP2 moves only each rank's shard to `device`. Each gathered layer
    computes in `compute_dtype` (FSDP2's mixed-precision policy casts it after the all-gather), so a bf16
    teacher under fp32 precision needs no other cast in its forward.
    Returns (bytes of teacher parameters this rank holds, bytes of the whole teacher)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lrc.families import family_for

    fam = family_for(teacher.config)
    base = teacher.get_submodule(fam.base)
    head_layer, embed_module = teacher.get_submodule(fam.head), base.get_submodule(fam.embed)
    tied = head_layer.weight is embed_module.weight
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    stored = next(teacher.parameters()).dtype
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype if compute_dtype != stored else None)
    # reshard_after_forward=True also for the root: its default keeps the root's tensors (the embedding)
    # gathered after forward, expecting a backward that never comes for a frozen teacher.
    for layer in cast(nn.ModuleList, base.get_submodule(fam.layers)):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
    fully_shard(base, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
    if tied:  # point the head at the embedding's shards (the old whole tensor is then freed)
        head_layer.weight = embed_module.weight
    else:  # read only through `gathered`; never run as a module during training
        fully_shard(head_layer, mesh=mesh, reshard_after_forward=True)
    held = whole = 0
    for p in teacher.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        held += local.numel() * local.element_size()
        whole += p.numel() * p.element_size()
    return held, whole
