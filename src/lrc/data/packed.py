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

On disk the tokens are stored once, in the narrowest dtype the vocabulary allows (uint16 up to 65,536 ids,
else uint32), with a byte per token for masked data, and memory-mapped, so a machine's processes share the
pages. Files are written under temporary names and renamed; a JSON manifest written last records what the
store was made with and each file's size and SHA-256, and alone marks the store complete. `open_store` checks
every file against it, so a truncated or overwritten file is never read as data.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from lrc.data.batch import IGNORE_INDEX, Batch, next_token_labels
from lrc.errors import UserError


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

    def get(self, index: int) -> Batch:
        """Sequence `index` as (seq_len,) int64 tensors input_ids, position_ids, labels (and bool loss_mask)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sequence index {index} out of range for {len(self)} sequences")
        start, stop = index * self.seq_len, (index + 1) * self.seq_len
        ids = torch.from_numpy(np.asarray(self.tokens[start:stop], dtype=np.int64))
        offsets = np.arange(start, stop, dtype=np.int64)
        pos = torch.from_numpy(offsets - self.doc_starts[np.searchsorted(self.doc_starts, offsets, side="right") - 1])
        item: Batch = {"input_ids": ids, "position_ids": pos, "labels": next_token_labels(ids, pos)}
        if self.loss_mask is not None:
            # which positions' next token the losses count (KL and CE); the last one's lies outside the sequence
            target = torch.as_tensor(np.asarray(self.loss_mask[start + 1:stop], dtype=np.bool_))
            item["loss_mask"] = torch.cat([target, torch.zeros(1, dtype=torch.bool)])
            item["labels"][~item["loss_mask"]] = IGNORE_INDEX
        return item

    __getitem__ = get  # a map-style dataset for torch's DataLoader too


def collate(items: list[Batch]) -> Batch:
    """(T,) tensors -> (B, T); in a mixture of masked and unmasked sources the unmasked count every position."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    if any("loss_mask" in item for item in items):
        items = [item if "loss_mask" in item else
                 {**item, "loss_mask": torch.ones_like(item["labels"], dtype=torch.bool)} for item in items]
    if any(item.keys() != items[0].keys() for item in items):
        raise ValueError("all items of a batch must have the same keys")
    return cast(Batch, {key: torch.stack([item[key] for item in items]) for key in items[0]})  # type: ignore[literal-required]


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


TOKEN_LIMITS = ((np.uint16, 2**16), (np.uint32, 2**32))  # (dtype, ids it holds), narrowest first


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id below `vocab_size` (uint16 up to 65,536 ids)."""
    return np.dtype(next(dtype for dtype, limit in TOKEN_LIMITS if vocab_size <= limit))


def store_paths(folder: Path, stem: str, dtype: np.dtype) -> tuple[Path, Path, Path]:
    """(tokens, document starts, loss mask) files of a store."""
    return (folder / f"{stem}.{np.dtype(dtype).name}.bin", folder / f"{stem}.doc_starts.npy",
            folder / f"{stem}.mask.uint8.bin")


class DamagedStore(Exception):
    """A store whose manifest is missing, unreadable or of another format, or whose files disagree with it."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: Path, fmt: str) -> dict:
    """The manifest of a complete store (see `write_store`); DamagedStore when absent, torn or of another format."""
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DamagedStore(f"{path.name} is missing") from None
    except (OSError, ValueError) as e:
        raise DamagedStore(f"{path.name} is unreadable ({type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise DamagedStore(f"it was written in format {found or 'unknown'}, not {fmt}")
    return manifest


def open_store(folder: Path, manifest: dict, seq_len: int, verify: bool = True) -> PackedDataset:
    """The store `manifest` describes, memory-mapped, after checking every file's size (and, with `verify`, its
    SHA-256: about 1 s per GB, once per start-up); DamagedStore names the first file that disagrees."""
    files: dict = manifest["files"]
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            raise DamagedStore(f"{name} is missing")
        if path.stat().st_size != want["bytes"]:
            raise DamagedStore(f"{name} has {path.stat().st_size:,} bytes, not the {want['bytes']:,} it was written "
                               "with (cut short or overwritten)")
        if verify and _sha256(path) != want["sha256"]:
            raise DamagedStore(f"{name} does not match its checksum (its contents changed after it was written)")
    dtype = np.dtype(manifest["dtype"])
    tokens_path, docs_path, mask_path = store_paths(folder, manifest["stem"], dtype)
    starts = np.load(docs_path)
    mask = np.memmap(mask_path, dtype=np.uint8, mode="r") if mask_path.name in files else None
    return PackedDataset(np.memmap(tokens_path, dtype=dtype, mode="r"), starts.astype(np.int64), seq_len, mask)


class _HashingWriter:
    """A file written chunk by chunk while its size and SHA-256 are counted (no second read)."""

    def __init__(self, path: Path):
        self.path, self.file, self.digest, self.bytes = path, open(path, "wb"), hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.bytes += len(data)

    def close(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())  # on disk before the manifest says it is complete
        self.file.close()
        return {"bytes": self.bytes, "sha256": self.digest.hexdigest()}


def _narrow(chunk: np.ndarray, dtype: np.dtype) -> bytes:
    if chunk.size and (int(chunk.min()) < 0 or int(chunk.max()) > np.iinfo(dtype).max):
        raise ValueError(f"token ids {int(chunk.min())}..{int(chunk.max())} do not fit {dtype.name}: the vocabulary "
                         "size the dtype was chosen for is wrong")
    return chunk.astype(dtype, copy=False).tobytes()


def fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (a crash of the machine, not just of the process)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_store(folder: Path, stem: str, fill: Callable, check: Callable, manifest_path: Path, fmt: str,
                record: dict, dtype: np.dtype) -> None:
    """``fill(write_tokens, write_mask) -> doc_starts`` writes the chunks (as `dtype`); ``check(starts, total)`` may
    refuse them. The files get temporary names and are renamed into place; the manifest (`fmt`, `record`, each
    file's size and SHA-256) is written last and alone marks the store complete. On any failure nothing is
    committed and folders created here are removed again."""
    created, parent = [], folder
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    folder.mkdir(parents=True, exist_ok=True)
    finals = [*store_paths(folder, stem, dtype), manifest_path]
    suffix = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmps = [p.with_name(p.name + suffix) for p in finals]
    try:
        tokens, mask = _HashingWriter(tmps[0]), _HashingWriter(tmps[2])
        try:
            starts = fill(lambda chunk: tokens.write(_narrow(chunk, dtype)),
                          lambda chunk: mask.write(chunk.astype(np.uint8, copy=False).tobytes()))
            check(starts, tokens.bytes // dtype.itemsize)
        finally:
            token_entry, mask_entry = tokens.close(), mask.close()
        docs = _HashingWriter(tmps[1])
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(starts, dtype=np.int64))
        docs.write(buffer.getvalue())
        entries = {finals[0].name: token_entry, finals[1].name: docs.close(),
                   **({finals[2].name: mask_entry} if mask_entry["bytes"] else {})}
        manifest = {"format": fmt, **record, "stem": stem, "dtype": dtype.name, "tokens": token_entry["bytes"] //
                    dtype.itemsize, "documents": len(starts), "files": entries}
        with open(tmps[3], "w") as f:
            f.write(json.dumps(manifest, indent=1))
            f.flush()
            os.fsync(f.fileno())
        for tmp, final in zip(tmps[:3], finals[:3]):
            if final.name in entries:
                os.replace(tmp, final)
        os.replace(tmps[3], finals[3])  # last: marks the store complete
        fsync_dir(folder)
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
