"""`--streaming`: documents read and tokenised on the fly (corpora larger than the disk), resumable exactly.

Sources are `datasets` IterableDatasets (hub ids and local files alike), tokenised by the same map function
as a stored stream and packed into the same sequences, in file order: a shuffle buffer would not survive a
resume. The position is (source, the source's ``state_dict()`` taken just before the document the next
sequence starts in, the offset of that start in the document, epoch). `datasets` restores an
IterableDataset's state exactly, also inside a batched map, so a resumed run re-reads that document and
continues at the same token. Under torchrun every process reads the whole stream and keeps its slice of
each global batch (tokenising W times over, which is cheap next to training). After the last source the
stream starts again (a new epoch).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from lrc.data.packed import PackedDataset, collate
from lrc.data.sources import columns
from lrc.data.tokenise import IDS, MASK, RowError, Tokenise
from lrc.errors import UserError


class TokenStream:
    """Endless packed sequences from streamed sources; `state_dict` is the start of the next global batch."""

    def __init__(self, parts: list[Any], fn: Tokenise, seq_len: int, batch_size: int = 256, rank: int = 0,
                 world_size: int = 1, origins: list[Any] | None = None):
        self.parts = [p.map(fn, batched=True, batch_size=batch_size, remove_columns=columns(p), with_indices=True)
                      for p in parts]
        self.origins = origins  # sources.Origin of each part, to name a malformed row
        self.fresh = [p.state_dict() for p in self.parts]  # each source's state before its first document
        self.seq_len, self.rank, self.world_size = seq_len, rank, world_size
        self.masked = fn.masked
        self.position: dict[str, Any] = {"part": 0, "state": None, "offset": 0, "epoch": 0}
        self._iter: Any = None

    def _documents(self, position: dict[str, Any]):
        """(part, state before the document, document ids, mask), from `position` on, endlessly."""
        part, state, epoch = position["part"], position["state"], position["epoch"]
        while True:
            found, from_start = False, part == 0 and state is None
            for k in range(part, len(self.parts)):
                ds = self.parts[k]
                ds.load_state_dict(copy.deepcopy(state if state is not None else self.fresh[k]))
                it = iter(ds)
                while True:
                    before = ds.state_dict()
                    try:
                        row: dict | None = next(it, None)
                    except RowError as e:  # the row's index counts from where this read of the source began
                        where = self.origins[k].row(e.index) if self.origins and state is None else \
                            f"a row of {self.origins[k].where if self.origins else f'source {k}'}"
                        raise UserError(f"{where}: {e.problem}; fix or remove that row") from None
                    if row is None:
                        break
                    found = True
                    yield k, before, epoch, row[IDS], row.get(MASK)
                state = None
            if not found and from_start:
                raise UserError("the streamed data holds no text: every document is empty or blank; check --data "
                                "and --text-field")
            part, epoch = 0, epoch + 1

    def _sequences(self, position: dict[str, Any]):
        """(ids, positions, mask or None, position of the following sequence) for each packed sequence."""
        ids: list[int] = []
        pos: list[int] = []
        mask: list[int] = []
        skip = position["offset"]
        for k, before, epoch, doc, doc_mask in self._documents(position):
            i, skip = skip, 0
            while i < len(doc):
                take = min(self.seq_len - len(ids), len(doc) - i)
                ids += doc[i:i + take]
                pos += range(i, i + take)
                mask += doc_mask[i:i + take] if doc_mask is not None else [1] * take
                i += take
                if len(ids) == self.seq_len:
                    nxt = {"part": k, "state": before, "offset": i, "epoch": epoch} if i < len(doc) else \
                        {"part": k, "state": self.parts[k].state_dict(), "offset": 0, "epoch": epoch}
                    yield ids, pos, mask, nxt
                    ids, pos, mask = [], [], []

    def take(self, n: int) -> list[tuple]:
        """The next `n` raw sequences (ids, positions, mask) of the stream (every rank's), advancing."""
        it = self._iter = self._iter or self._sequences(self.position)
        out = []
        for _ in range(n):
            ids, pos, mask, self.position = next(it)
            out.append((ids, pos, mask))
        return out

    def _packed(self, raw: list[tuple]) -> PackedDataset:
        """Consecutive sequences of the stream as a packed dataset, which labels and masks them."""
        ids, pos, mask = (np.concatenate([np.asarray(r[i]) for r in raw]) for i in range(3))
        starts = np.unique(np.arange(len(ids)) - pos)  # a token at offset o and position p: its document starts at o-p
        return PackedDataset(ids.astype(np.int32), starts, self.seq_len, mask.astype(np.uint8) if self.masked else None)

    def next(self, batch_size: int) -> dict:
        first = self.rank * batch_size
        batch = self._packed(self.take(batch_size * self.world_size)[first:first + batch_size])
        return collate([batch.get(i) for i in range(len(batch))])

    def head(self, n: int, advance: bool) -> PackedDataset:
        """The next `n` sequences as a packed dataset (held-out data, calibration); `advance`: skip them."""
        position = copy.deepcopy(self.position)
        raw = self.take(n)
        if not advance:
            self.position, self._iter = position, None
        return self._packed(raw)

    def state_dict(self) -> dict[str, Any]:
        return {"stream": copy.deepcopy(self.position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "stream" not in state:
            raise UserError("the saved run did not stream its data; resume it without --streaming")
        self.position, self._iter = copy.deepcopy(state["stream"]), None
