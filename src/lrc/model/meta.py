"""Models on the meta device: built from a config alone with no memory, to count parameters and read shapes
(`lrc plan`, `--target-params`), and whether a model's head is its embedding."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lrc.distributed.fsdp import is_sharded
from lrc.model.families import family_for


def meta_model(config) -> nn.Module:
    """The causal LM of `config` on the meta device (shapes, no storage)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied head is counted once


def tied_head(model: nn.Module) -> bool:
    """Whether the LM head of `model` (whole, sharded or on the meta device) is its input embedding."""
    fam = family_for(model.config)
    head = cast(nn.Linear, model.get_submodule(fam.head)).weight
    embed = cast(nn.Embedding, model.get_submodule(f"{fam.base}.{fam.embed}")).weight
    if head is embed:
        return True
    # meta tensors all report data_ptr 0 and shards are DTensors: only `is` tells there
    return not is_sharded(head) and head.device.type != "meta" and head.data_ptr() == embed.data_ptr()


def config_is_tied(config) -> bool:
    """`tied_head` of the model a config builds (transformers' own reading of tie_word_embeddings)."""
    return tied_head(meta_model(config))
