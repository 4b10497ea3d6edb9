"""Next-token labels of a packed batch: what every method's LM loss and the held-out loss predict."""

from __future__ import annotations

import torch

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
