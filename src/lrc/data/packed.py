"""The packed token stream: documents concatenated into one flat int32 array, cut into back-to-back sequences
of `seq_len` tokens. Nothing is padded, so every token is real training signal.

A sequence may start mid-document or hold the end of one and the start of the next. ``position_ids`` count from
the real start of the token's document (a cut continues 37, 38, ..., so 0 is the one mark of a document start)
and ``labels`` are -100 wherever the next token opens another document or, with a loss mask, is not a target.
With RoPE, attention depends only on position offsets, so a continuation is attended as its tokens alone would
be. Given these position ids and no attention mask, transformers' masking (``find_packed_sequence_indices``,
eager/sdpa/flex) builds a block-diagonal causal mask; its flash-attention paths do not (transformers 5.x). A
document longer than the teacher's context gets positions past ``max_position_embeddings``: harmless for
default and llama3 RoPE, not for "dynamic"/"longrope".

On disk the tokens (and, for masked data, a byte per token) are memory-mapped, so a machine's processes share
the pages. Files are written under temporary names and renamed, the token file last (it marks a complete store).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lrc.errors import UserError
from lrc.losses import IGNORE_INDEX, next_token_labels


@dataclass
class PackedDataset:
    """`doc_starts`: sorted offsets of each document's first token (the first may be negative in a part cut from
    a larger stream); `loss_mask`: optional, uint8 per token, 0 = not a target."""

    tokens: np.ndarray
    doc_starts: np.ndarray
    seq_len: int
    loss_mask: np.ndarray | None = None

    def __post_init__(self) -> None:  # structural checks: programming mistakes, not user data
        self.doc_starts = np.asarray(self.doc_starts, dtype=np.int64)
        if self.tokens.ndim != 1 or self.doc_starts.ndim != 1 or self.seq_len < 1:
            raise ValueError(f"need 1-D tokens and doc_starts and seq_len >= 1, got {self.tokens.shape}, "
                             f"{self.doc_starts.shape}, {self.seq_len}")
        if len(self.tokens) and (len(self.doc_starts) == 0 or self.doc_starts[0] > 0):
            raise ValueError("doc_starts must have an entry at or before offset 0 of tokens")

    def __len__(self) -> int:  # full sequences; a shorter tail is dropped
        return len(self.tokens) // self.seq_len

    def get(self, index: int) -> dict[str, torch.Tensor]:
        """Sequence `index` as (seq_len,) int64 tensors input_ids, position_ids, labels (and bool loss_mask)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sequence index {index} out of range for {len(self)} sequences")
        start, stop = index * self.seq_len, (index + 1) * self.seq_len
        ids = torch.from_numpy(np.asarray(self.tokens[start:stop], dtype=np.int64))
        offsets = np.arange(start, stop, dtype=np.int64)
        pos = torch.from_numpy(offsets - self.doc_starts[np.searchsorted(self.doc_starts, offsets, side="right") - 1])
        item = {"input_ids": ids, "position_ids": pos, "labels": next_token_labels(ids, pos)}
        if self.loss_mask is not None:
            # which positions' next token the losses count (KL and CE); the last one's lies outside the sequence
            target = torch.as_tensor(np.asarray(self.loss_mask[start + 1:stop], dtype=np.bool_))
            item["loss_mask"] = torch.cat([target, torch.zeros(1, dtype=torch.bool)])
            item["labels"][~item["loss_mask"]] = IGNORE_INDEX
        return item

    __getitem__ = get  # a map-style dataset for torch's DataLoader too


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """(T,) tensors -> (B, T); in a mixture of masked and unmasked sources the unmasked count every position."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    if any("loss_mask" in item for item in items):
        items = [item if "loss_mask" in item else
                 {**item, "loss_mask": torch.ones_like(item["labels"], dtype=torch.bool)} for item in items]
    if any(item.keys() != items[0].keys() for item in items):
        raise ValueError("all items of a batch must have the same keys")
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def split_holdout(ds: PackedDataset, fraction: float) -> tuple[PackedDataset, PackedDataset]:
    """(train, holdout): views cut before the last ceil(fraction * n) sequences (at least one of each when
    fraction > 0); the holdout's first document start is its real (maybe negative) one, so positions match."""
    if not (0.0 <= fraction < 1.0):  # also rejects NaN
        raise UserError(f"holdout fraction must be in [0, 1), got {fraction}; pass a fraction such as 0.01")
    n = len(ds)
    if fraction > 0 and n < 2:
        raise UserError(f"the data has {n} sequence(s) of {ds.seq_len} tokens, too few to hold out a validation "
                        "split; add data, lower --seq-len, or set the holdout fraction to 0")
    # The epsilon keeps float noise (0.7 * 10 == 7.000000000000001) from adding a sequence.
    n_hold = 0 if fraction == 0 else min(max(1, math.ceil(fraction * n - 1e-9)), n - 1)
    cut = (n - n_hold) * ds.seq_len
    first = int(np.searchsorted(ds.doc_starts, cut, side="right")) - 1  # the document holding offset `cut`
    mask = ds.loss_mask
    train = PackedDataset(ds.tokens[:cut], ds.doc_starts[ds.doc_starts < cut], ds.seq_len,
                          None if mask is None else mask[:cut])
    hold = PackedDataset(ds.tokens[cut:], ds.doc_starts[max(first, 0):] - cut, ds.seq_len,
                         None if mask is None else mask[cut:])
    return train, hold


def store_paths(folder: Path, stem: str) -> tuple[Path, Path, Path]:  # tokens, document starts, loss mask
    return folder / f"{stem}.int32.bin", folder / f"{stem}.doc_starts.npy", folder / f"{stem}.mask.uint8.bin"


def open_store(folder: Path, stem: str, seq_len: int) -> PackedDataset | None:
    """The stored stream memory-mapped, or None when missing or damaged (then it is rebuilt)."""
    tokens_path, docs_path, mask_path = store_paths(folder, stem)
    if not tokens_path.is_file() or not docs_path.is_file():
        return None
    size = tokens_path.stat().st_size
    try:
        starts = np.load(docs_path)
    except (OSError, ValueError):
        return None
    if not (size > 0 and size % 4 == 0 and starts.ndim == 1 and len(starts) and starts[0] == 0
            and starts[-1] < size // 4) or (mask_path.is_file() and mask_path.stat().st_size != size // 4):
        return None
    mask = np.memmap(mask_path, dtype=np.uint8, mode="r") if mask_path.is_file() else None
    return PackedDataset(np.memmap(tokens_path, dtype=np.int32, mode="r"), starts.astype(np.int64), seq_len, mask)


def write_store(folder: Path, stem: str, fill: Callable, check: Callable) -> None:
    """``fill(write_tokens, write_mask) -> doc_starts`` writes the chunks; ``check(starts, total)`` may refuse
    them. On any failure nothing is committed and folders created here are removed again."""
    created, parent = [], folder
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    folder.mkdir(parents=True, exist_ok=True)
    finals = store_paths(folder, stem)
    suffix = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmps = [p.with_name(p.name + suffix) for p in finals]
    try:
        with open(tmps[0], "wb") as tokens, open(tmps[2], "wb") as mask:
            starts = fill(lambda chunk: tokens.write(chunk.tobytes()), lambda chunk: mask.write(chunk.tobytes()))
            check(starts, tokens.tell() // 4)
            has_mask = mask.tell() > 0
            for f in (tokens, mask):
                f.flush()
                os.fsync(f.fileno())
        with open(tmps[1], "wb") as f:  # a file object: np.save would add .npy to the temporary name
            np.save(f, starts)
        os.replace(tmps[1], finals[1])
        if has_mask:
            os.replace(tmps[2], finals[2])
        os.replace(tmps[0], finals[0])  # last: marks the store complete
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        for made in created:  # innermost first; rmdir refuses folders something else wrote into
            try:
                made.rmdir()
            except OSError:
                break
        raise
    finally:
        tmps[2].unlink(missing_ok=True)
