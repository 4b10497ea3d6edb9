"""A batch: what every method's forward takes (`Batch`: the packed sequences and what the losses count), and
its next-token labels (what every method's LM loss and the held-out loss predict)."""

from __future__ import annotations

from typing import TypedDict, cast

import torch


class _Sequences(TypedDict):
    input_ids: torch.Tensor
    """(B, T) int64 token ids (or (T,) for one sequence)."""


class Batch(_Sequences, total=False):
    """One micro-batch as `collate` makes it, (B, T) tensors: the forward of every `Method` takes it as
    keyword arguments."""

    position_ids: torch.Tensor
    """Each token's position in its document: packed documents restart at 0 (no attention across them)."""
    labels: torch.Tensor
    """The next token, or IGNORE_INDEX where nothing is predicted (`next_token_labels`)."""
    attention_mask: torch.Tensor
    """1 for real tokens, 0 for padding (padded batches only: packed sequences have none)."""
    loss_mask: torch.Tensor
    """bool: the positions whose next token the losses count (chat data with --train-on assistant)."""


def to_device(batch: Batch, device, non_blocking: bool = False) -> Batch:
    """The batch's tensors on `device`."""
    return cast(Batch, {k: cast(torch.Tensor, v).to(device, non_blocking=non_blocking) for k, v in batch.items()})


IGNORE_INDEX = -100  # label with no target (cross_entropy's default ignore_index)


def next_token_labels(input_ids, position_ids=None, attention_mask=None) -> torch.Tensor:
    """Labels for next-token prediction: the next id, or -100 across documents, into padding and at the end.

    A position's target belongs to the same document when the next position id is not 0 (packed sequences
    restart their position ids at each document)."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[..., :-1] = input_ids[..., 1:]
    if position_ids is not None:
        labels[..., :-1][position_ids[..., 1:] == 0] = IGNORE_INDEX
    if attention_mask is not None:
        labels[..., :-1][attention_mask[..., 1:] == 0] = IGNORE_INDEX
        labels[attention_mask == 0] = IGNORE_INDEX
    return labels
