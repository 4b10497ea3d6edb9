"""What a student narrower or shallower than its teacher keeps, measured on calibration data.

* FFN channels (`--ffn-size M`, `select_ffn_channels`): each student layer starts from the M intermediate
  channels of its teacher layer that carry the most output energy, E[h_j^2] * ||W_down[:, j]||^2 with
  h = act(gate) * up, by setting its projection Q to that column selection of the identity. A selection,
  unlike a rotation, commutes with the element-wise act(gate) * up, so the student's FFN at step 0 is the
  teacher's with the other channels removed (derivation: docs/student-shape.md).
* Layers (`--layers K`, `choose_layers`): keep the K teacher layers that change their input most,
  importance = mean over tokens of 1 - cos(layer input, layer output) (ShortGPT's "block influence"); a
  layer that leaves the residual stream nearly as it was is the cheapest to drop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from lrc.data.batch import Batch
from lrc.distributed.fsdp import gathered
from lrc.model.families import family_for

if TYPE_CHECKING:
    from lrc.model.clone import LayerProjections, LowRankClone


def _run(base: nn.Module, batch: Batch) -> None:
    base(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"),
         attention_mask=batch.get("attention_mask"), use_cache=False)


def _valid_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if mask is None else x[mask.reshape(-1).bool()]


@torch.no_grad()
def ffn_channel_energy(clone: LowRankClone, batches: Iterable[Batch]) -> list[torch.Tensor]:
    """Per student layer, the output energy of each of its teacher layer's intermediate channels (d_ff_T, fp64):
    sum over valid tokens of h_j^2, times ||W_down[:, j]||^2 (h: the input of down_proj, act(gate) * up)."""
    fam = clone.family
    acc = [torch.zeros(clone.d_ff_t, dtype=torch.float64) for _ in range(clone.num_layers)]
    state: dict = {"mask": None}

    def pre_hook(i):
        def hook(module, args):
            acc[i].add_(_valid_rows(args[0], state["mask"]).double().pow(2).sum(0).cpu())
        return hook

    downs = [clone.t_layer(i).get_submodule(fam.linear_path("down")) for i in range(clone.num_layers)]
    handles = [m.register_forward_pre_hook(pre_hook(i)) for i, m in enumerate(downs)]
    try:
        for batch in batches:
            state["mask"] = batch.get("attention_mask")
            _run(clone.t_base, batch)
    finally:
        for h in handles:
            h.remove()
    col_norms = [gathered(cast(nn.Linear, m).weight).detach().double().pow(2).sum(0).cpu() for m in downs]
    return [e * n for e, n in zip(acc, col_norms, strict=True)]


@torch.no_grad()
def select_ffn_channels(clone: LowRankClone, batches: Iterable[Batch]) -> dict[str, float]:
    """Set every layer's Q to the selection of its M most energetic channels (`ffn_channel_energy`).

    Returns {"ffn_energy_kept": the kept share of that energy, averaged over layers}."""
    if clone.ffn_size is None:
        return {}
    m = clone.ffn_size
    shares = []
    for energy, layer in zip(ffn_channel_energy(clone, batches),
                             cast("Iterable[LayerProjections]", clone.layers), strict=True):
        keep = torch.argsort(energy, descending=True)[:m].sort().values  # the teacher's channel order
        select = torch.zeros(clone.d_ff_t, m)
        select[keep, torch.arange(m)] = 1.0
        assert layer.ffn is not None  # ffn_size is set: every layer has its projection
        layer.ffn.copy_(select.to(layer.ffn.device))
        shares.append(float(energy[keep].sum() / energy.sum().clamp_min(1e-30)))
    return {"ffn_energy_kept": sum(shares) / len(shares)}


@torch.no_grad()
def layer_importance(teacher: nn.Module, batches: Iterable[Batch]) -> list[float]:
    """Per teacher layer, the mean over valid tokens of 1 - cos(input, output) of the residual stream."""
    fam = family_for(teacher.config)
    base = teacher.get_submodule(fam.base)
    layers = list(cast(nn.ModuleList, base.get_submodule(fam.layers)))
    total = [0.0] * len(layers)
    count = {"tokens": 0}
    state: dict = {"mask": None}

    def hook(i):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            x, y = _valid_rows(x, state["mask"]).double(), _valid_rows(y, state["mask"]).double()
            total[i] += float((1.0 - F.cosine_similarity(x, y, dim=-1)).sum())
            if i == 0:
                count["tokens"] += x.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(layers)]
    try:
        for batch in batches:
            state["mask"] = batch.get("attention_mask")
            _run(base, batch)
    finally:
        for h in handles:
            h.remove()
    return [t / max(count["tokens"], 1) for t in total]


def choose_layers(teacher: nn.Module, batches: Iterable[Batch], keep: int) -> tuple[int, ...]:
    """The `keep` most important teacher layers (`layer_importance`), in the teacher's order."""
    scores = layer_importance(teacher, batches)
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
    return tuple(sorted(ranked[:keep]))
