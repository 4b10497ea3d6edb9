"""`--parallel fsdp`: the frozen teacher and LRC's trainable layer projections sharded across processes (FSDP2).

Every decoder layer and the base model are `fully_shard`-ed, so the teacher's forward all-gathers one layer
at a time through FSDP2's own hooks and frees it again. LRC also reads teacher matrices outside any forward
to generate the student's weights; `gathered` does that with an explicit all-gather (and `lrc.model.weights`'
projections gather a second time in backward rather than keep a whole matrix alive from forward to
backward, so at most one teacher matrix is whole at a time).

The trainable layer projections (and the layers' norm gains, all but the embedding and head projections and
the final norm gain: well over 99% of the trainables of a real model) are sharded too, by `shard_projections`:
one FSDP2 unit whose parameters, gradients and therefore AdamW moments each rank holds 1/world of. The unit
is gathered where the student's weights are generated (`Projections.forward` runs the generation) and stays
gathered for the rest of that optimizer step, because the clone also reads P_o and P_down in its clone-loss
hooks and the generation's backward needs every P; FSDP2's own backward hooks then reduce-scatter the
gradients (averaging them over ranks) and reshard once per step. The remaining small trainables stay whole
on every rank and are averaged by `distributed.average_gradients`, which skips the sharded ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

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


def world_mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh  # only under torchrun (fsdp, checkpoints)

    return init_device_mesh(device.type, (dist.get_world_size(),))


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of these tensors held by this rank: a sharded tensor counts its own shard only."""
    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


class Projections(nn.Module):
    """The FSDP2 root over the trainable layer projections (`shard_projections`; one group per layer).

    Its `forward(generate)` gathers every layer (one all-gather each) and returns `generate()`; FSDP2's
    forward post-hook puts a pre-backward hook on every tensor `generate` returns that needs a gradient. So
    `generate` returns (anything, [generated weights]): the backward through those weights is the one after
    which FSDP2's root callback reduce-scatters each layer's gradients (accumulated over the whole step, also
    from the clone-loss hooks) and reshards it. Leaf tensors (the gathered parameters themselves) must not be
    among the returned tensors: they would collect a hook per call.
    """

    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layers = layers  # the clone's own modules: FSDP2 swaps their parameters in place

    def forward(self, generate: Callable[[], tuple[Any, list[torch.Tensor]]]) -> tuple[Any, list[torch.Tensor]]:
        gather(self, True)
        return generate()


def held_bytes(params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, tuple[int, int]]:
    """Of the sharded `params` and of everything else trained: (bytes this rank holds, bytes whole) of the
    parameters and of their optimizer state (AdamW's moments), as allocated now."""
    out: dict[str, tuple[int, int]] = {}
    for kind, chosen in (("sharded", [p for p in params if is_sharded(p)]),
                         ("whole", [p for p in params if not is_sharded(p)])):
        state = [t for p in chosen for t in optimizer.state.get(p, {}).values()
                 if isinstance(t, torch.Tensor) and t.dim() > 0]  # not AdamW's step counters
        out[f"{kind} params"] = (local_bytes(chosen), sum(t.numel() * t.element_size() for t in chosen))
        out[f"{kind} optimizer"] = (local_bytes(state), sum(t.numel() * t.element_size() for t in state))
    return out


def gather(unit: nn.Module, whole: bool) -> None:
    """Gather (whole=True) or reshard the layers of a `shard_projections` unit outside FSDP2's own hooks, one
    layer's collective at a time."""
    from torch.distributed.fsdp import FSDPModule  # only under torchrun (fsdp, checkpoints)

    for module in unit.modules():
        if isinstance(module, FSDPModule) and module is not unit:
            if whole:
                module.unshard()
            else:
                module.reshard()


def shard_projections(layers: nn.ModuleList, device: torch.device) -> tuple[Projections, int, int]:
    """Shard `layers` (the clone's `LayerProjections`, identical on every rank) over all ranks of the default
    process group as one FSDP2 unit that stays gathered after its forward (see `Projections`).

    Returns (the unit, bytes of its parameters this rank holds, bytes of them whole)."""
    from torch.distributed.fsdp import fully_shard  # only under torchrun (fsdp, checkpoints)

    whole = sum(p.numel() * p.element_size() for p in layers.parameters())
    mesh = world_mesh(device)
    # A parameter group per layer: all-gathers and reduce-scatters go one layer at a time, so their flat
    # buffers are one layer's; the root holds no parameter and only lends its forward and backward hooks.
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=False)
    unit = Projections(layers)
    fully_shard(unit, mesh=mesh, reshard_after_forward=False)
    return unit, local_bytes(layers.parameters()), whole


