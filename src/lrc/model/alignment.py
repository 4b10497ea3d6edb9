"""The activation-clone terms outside the clone: which module's output each term names, the teacher's
activations for a batch, and the maps that carry them into a student's spaces.

An LRC clone compares its student's activations with the teacher's through its own projections: q, k, v, gate
and up are compared as they are (their width is the teacher's; with a narrower FFN, gate and up through the FFN
projection Q), attention and FFN outputs through P_o and P_down (spec section 3). `AlignmentMaps` keeps those
matrices frozen, as a clone had them when it was multiplied out, so that an ordinary student with free weights
(`kd` from LRC's start, or LRC after `--free-after`) trains against the same targets.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import cast

import torch
from torch import nn

from lrc.distributed.fsdp import gather, gathered
from lrc.model.families import Family
from lrc.model.precision import for_product


def term_modules(layer: nn.Module, family: Family, terms: Iterable[str]) -> Iterator[tuple[str, nn.Module]]:
    """(term, module) for each clone term of a decoder layer: the module whose output the term compares."""
    for term in terms:
        if term == "attn_out":
            yield term, layer.get_submodule(family.attn)
        elif term == "ffn_out":
            yield term, layer.get_submodule(family.mlp)
        else:
            yield term, layer.get_submodule(family.linear_path(term))


def module_output(output) -> torch.Tensor:
    """A module's main output (attention blocks return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def store_output(acts: dict, key):
    """A forward hook that records its module's output under `key`."""

    def hook(module, args, output):
        acts[key] = module_output(output)

    return hook


@torch.no_grad()
def teacher_activations(base: nn.Module, family: Family, kept_layers: Sequence[int], terms: Iterable[str],
                        inputs: dict[int, tuple] | None = None,
                        **forward_kwargs) -> tuple[torch.Tensor, dict[tuple[int, str], torch.Tensor]]:
    """Run the teacher's base model once: its final hidden states and {(student layer, term): output} for
    the teacher layers the student keeps (student layer i is teacher layer kept_layers[i]).

    With `inputs` (a dict to fill), the terms' outputs are not kept: instead inputs[i] = (args, kwargs) of
    the kept layer's call, from which `teacher_layer_activations` recomputes them one layer at a time."""
    terms = tuple(terms)
    acts: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, t in enumerate(kept_layers):
        layer = base.get_submodule(f"{family.layers}.{t}")
        if inputs is not None:
            handles.append(layer.register_forward_pre_hook(_store_inputs(inputs, i), with_kwargs=True))
            continue
        for term, module in term_modules(layer, family, terms):
            handles.append(module.register_forward_hook(store_output(acts, (i, term))))
    try:
        out = base(use_cache=False, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    return out.last_hidden_state, acts


def _store_inputs(inputs: dict, i: int):
    def hook(module, args, kwargs):
        inputs[i] = (args, kwargs)

    return hook


@torch.no_grad()
def teacher_layer_activations(layer: nn.Module, family: Family, i: int, terms: Iterable[str], call: tuple,
                              acts: dict[tuple[int, str], torch.Tensor]) -> None:
    """Run one teacher layer again on its recorded call (`teacher_activations`' inputs[i]) and put its terms'
    outputs in `acts` under (i, term), in place of whatever `acts` held (one layer's targets alive at a time).
    A sharded (FSDP2) layer is resharded after: in backward FSDP2 leaves that to a post-backward that a frozen
    layer never gets."""
    acts.clear()
    handles = [module.register_forward_hook(store_output(acts, (i, term)))
               for term, module in term_modules(layer, family, terms)]
    args, kwargs = call
    try:
        layer(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        gather(layer, False)


def to_student_space(term: str, teacher: torch.Tensor, o: torch.Tensor, down: torch.Tensor,
                     ffn: torch.Tensor | None) -> torch.Tensor:
    """The target of a student activation: the teacher's, through P_o (attention output), P_down (FFN
    output) or, with a narrower FFN, Q (gate, up); q, k, v (and gate, up without Q) as they are."""
    if term == "attn_out":
        return for_product(teacher, o) @ o
    if term == "ffn_out":
        return for_product(teacher, down) @ down
    if term in ("gate", "up") and ffn is not None:
        return for_product(teacher, ffn) @ ffn
    return teacher


class _LayerMaps(nn.Module):
    o: torch.Tensor
    down: torch.Tensor
    ffn: torch.Tensor | None

    def __init__(self, o: torch.Tensor, down: torch.Tensor, ffn: torch.Tensor | None):
        super().__init__()
        self.register_buffer("o", o)
        self.register_buffer("down", down)
        self.register_buffer("ffn", ffn)


class AlignmentMaps(nn.Module):
    """Frozen P_o, P_down (and Q) per student layer, with the teacher layer each student layer is compared
    with. Saved in a free student's checkpoints (they are not trained, but a resumed run needs the same
    targets); never exported."""

    kept_layers: torch.Tensor

    def __init__(self, kept_layers: Sequence[int], o: Sequence[torch.Tensor], down: Sequence[torch.Tensor],
                 ffn: Sequence[torch.Tensor | None]):
        super().__init__()
        self.register_buffer("kept_layers", torch.tensor(list(kept_layers), dtype=torch.long))
        self.layers = nn.ModuleList(_LayerMaps(*m) for m in zip(o, down, ffn, strict=True))

    @classmethod
    @torch.no_grad()
    def of_clone(cls, clone) -> AlignmentMaps:
        """The maps of a `LowRankClone` as it is now (copies: the clone may go on training or be freed)."""
        def copy(p):
            return None if p is None else gathered(p).detach().float().clone()

        return cls(clone.kept_layers, [copy(x.o) for x in clone.layers], [copy(x.down) for x in clone.layers],
                   [copy(x.ffn) for x in clone.layers])

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> AlignmentMaps:
        """The maps saved by `state_dict()` (a checkpoint's `alignment.` entries, prefix removed)."""
        kept = state["kept_layers"].tolist()
        n = len(kept)
        return cls(kept, [state[f"layers.{i}.o"] for i in range(n)], [state[f"layers.{i}.down"] for i in range(n)],
                   [state.get(f"layers.{i}.ffn") for i in range(n)])

    def target(self, i: int, term: str, teacher: torch.Tensor) -> torch.Tensor:
        maps = cast(_LayerMaps, self.layers[i])
        return to_student_space(term, teacher, maps.o, maps.down, maps.ffn)
