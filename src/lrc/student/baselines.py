"""Students of the baselines, built as ordinary Hugging Face models of the exported architecture.

`random_student` (for `kd` and `scratch`) starts from transformers' own initialisation; `pruned_student` (for
`prune-kd`, Minitron-style width pruning) keeps the teacher's d_S most energetic residual channels (and
FFN channels and layers, when the student is narrower or shallower there too).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from lrc.model.clone import LayerProjections, LowRankClone, student_config
from lrc.model.export import build_student_model
from lrc.student.init import residual_second_moment
from lrc.student.select import select_ffn_channels


def random_student(teacher, hidden_size: int, seed: int, ffn_size: int | None = None,
                   kept_layers: Sequence[int] | None = None):
    torch.manual_seed(seed)
    # From the config alone: building a LowRankClone here would allocate every projection for nothing.
    return AutoModelForCausalLM.from_config(student_config(teacher, hidden_size, None, ffn_size, kept_layers),
                                            dtype=torch.float32)


@torch.no_grad()
def pruned_student(teacher, hidden_size: int, calibration_batches, ffn_size: int | None = None,
                   kept_layers: Sequence[int] | None = None) -> tuple[PreTrainedModel, list[int]]:
    """Width-prune the teacher: keep the d_S residual channels with the most activation energy (and, with
    `ffn_size`, each layer's most energetic FFN channels, `lrc.student.select.select_ffn_channels`; with
    `kept_layers`, only those layers).

    Implemented as an LRC clone whose projections are fixed column selections of the identity, so the
    pruned model comes out of the same weight generation and export as LRC itself."""
    batches = list(calibration_batches)  # read twice: residual channels, then FFN channels
    clone = LowRankClone(teacher, hidden_size, ffn_size=ffn_size, kept_layers=kept_layers)
    energy = residual_second_moment(clone, batches).diagonal()
    keep = torch.argsort(energy, descending=True)[:hidden_size].sort().values
    select = torch.zeros(clone.d_t, hidden_size)
    select[keep, torch.arange(hidden_size)] = 1.0
    for name, p in clone.named_projections():
        if not name.endswith(".ffn"):
            p.copy_(select)
    select_ffn_channels(clone, batches)
    fam = clone.family
    # the norms are the family's own RMSNorm class: their gains are tensors
    for i, layer in enumerate(cast(Iterable[LayerProjections], clone.layers)):
        t_layer = clone.t_layer(i)
        layer.input_norm.copy_(cast(torch.Tensor, t_layer.get_submodule(fam.input_norm).weight)[keep])
        layer.post_attention_norm.copy_(cast(torch.Tensor, t_layer.get_submodule(fam.post_attention_norm).weight)[keep])
    clone.final_norm.copy_(cast(torch.Tensor, clone.t_base.get_submodule(fam.final_norm).weight)[keep])
    return build_student_model(clone).train(), keep.tolist()
