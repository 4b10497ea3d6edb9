"""`--parallel fsdp`: the frozen teacher and LRC's trainable layer projections sharded across processes (FSDP2).

Every decoder layer and the base model are `fully_shard`-ed, so the teacher's forward all-gathers one layer
at a time through FSDP2's own hooks and frees it again. LRC also reads teacher matrices outside any forward
to generate the student's weights; `gathered` does that with an explicit all-gather (and `lrc.model.weights`'
projections gather a second time in backward rather than keep a whole matrix alive from forward to
backward, so at most one teacher matrix is whole at a time).

The trainable layer projections (and the layers' norm gains, all but the embedding and head projections and
the final norm gain: well over 99% of the trainables of a real model) are sharded too, by `shard_projections`:
one FSDP2 unit per layer, whose parameters, gradients and therefore AdamW moments each rank holds 1/world of.
A layer's unit is gathered only while that layer runs: the student layer calls its unit
(`LayerProjections.forward`), which generates the layer's weights and maps the teacher's clone targets
through P_o / P_down inside FSDP2's forward hooks and reshards after it. In backward FSDP2 gathers the layer
again when the gradient of anything the unit returned arrives, and reduce-scatters its gradients (averaging
them over ranks) and reshards once the gradient of the layer's input has been computed: the unit also passes
the layer's input hidden state through, so FSDP2's post-backward hook sits on it (`lrc.model.clone`). So at
most about one layer's projections and their gradients are whole at a time; under gradient checkpointing the
layer's weights are generated again in its recomputation. The remaining small trainables stay whole on every
rank and are averaged by `distributed.average_gradients`, which skips the sharded ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

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


def gather(layers: nn.Module, whole: bool) -> None:
    """Gather (whole=True) or reshard every FSDP2 unit in `layers` outside a forward (export, a whole
    student), one layer's collective at a time. Nothing to do outside torchrun (nothing is sharded there)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    from torch.distributed.fsdp import FSDPModule  # only under torchrun (fsdp, checkpoints)

    for module in layers.modules():
        if isinstance(module, FSDPModule):
            if whole:
                module.unshard()
            else:
                module.reshard()


def shard_projections(layers: nn.ModuleList, device: torch.device) -> tuple[int, int]:
    """Shard each of `layers` (the clone's `LayerProjections`, identical on every rank) over all ranks of the
    default process group as its own FSDP2 unit, gathered per layer where that layer runs (see module doc).

    Returns (bytes of their parameters this rank holds, bytes of them whole)."""
    from torch.distributed.fsdp import fully_shard  # only under torchrun (fsdp, checkpoints)

    whole = sum(p.numel() * p.element_size() for p in layers.parameters())
    mesh = world_mesh(device)
    # The units return the layer's input as FSDP2's autograd function passed it on (a view of it); nothing
    # writes to it in place, which is what FSDP2's warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPLayerProjections\) returned a view")
    for layer in layers:
        # each its own root: nothing above it runs a forward
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    return local_bytes(layers.parameters()), whole
