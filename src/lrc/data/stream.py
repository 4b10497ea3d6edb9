"""`--streaming`: documents read and tokenised on the fly (corpora larger than the disk), resumable exactly.

Sources are `datasets` IterableDatasets (hub ids and local files alike), read row by row and tokenised in
batches by the same function as a stored stream, and packed into the same sequences, in file order: a shuffle
buffer would not survive a resume. The position is (source, the source's ``state_dict()`` taken just before
the document the next sequence starts in, that document's index in the source, the offset of that start in
the document, epoch). `datasets` restores an IterableDataset's state exactly, so a resumed run re-reads that
document and continues at the same token. After the last source the stream starts again (a new epoch).

Under torchrun each process reads only its share (`split`): from the point the held-out sequences and the
calibration were taken (identically, by every process, from the whole stream), process r of W reads
documents r, r + W, ... of each source (`datasets.distributed.split_dataset_by_node` by examples; when the
split starts at the very beginning, e.g. with --val-data, a source of W x k files is split by files, so each
process also reads only its own files). The split applies to the rows as they are read, so a process
tokenises only its own; the tokeniser keeps one row per document (an empty one for a blank document), so the
index of a document is its row's. A checkpoint keeps every process's position (gathered to rank 0); the run
resumes on the same number of processes.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch.distributed as dist

from lrc.data.batch import Batch
from lrc.data.packed import PackedDataset, collate
from lrc.data.tokenise import IDS, MASK, RowError, Tokenise
from lrc.errors import UserError


class TokenStream:
    """Endless packed sequences from streamed sources; `state_dict` is the start of the next global batch."""

    def __init__(self, parts: list[Any], fn: Tokenise, seq_len: int, batch_size: int = 256, rank: int = 0,
                 world_size: int = 1, origins: list[Any] | None = None):
        self.raw, self.fn, self.map_batch = parts, fn, batch_size
        self.parts = list(parts)
        self.origins = origins  # sources.Origin of each part, to name a malformed row
        self.fresh = [p.state_dict() for p in self.parts]  # each source's state before its first document
        self.seq_len, self.rank, self.world_size = seq_len, rank, world_size
        self.masked = fn.masked
        # doc: the index of the document `state` is before, in its source (counts every row, blank ones too)
        self.position: dict[str, Any] = {"part": 0, "state": None, "offset": 0, "epoch": 0, "doc": 0}
        self._iter: Any = None
        self.split_at: dict[str, Any] | None = None  # {"part", "skip", "epoch", "world_size", "strategy"}
        self.first: Any = None  # the split source the split starts in, past its first `skip` documents

    def split(self, rank: int, world_size: int, at: dict[str, Any] | None = None) -> None:
        """From here on (or from the split point `at` of a checkpoint), this process reads only documents
        rank, rank + W, ... of each source: the rest of the current source past the documents already read,
        then the sources after it; later epochs read each source's share from its start."""
        from datasets.distributed import split_dataset_by_node  # datasets: heavy, imported by sources lazily too

        self.rank, self.world_size = rank, world_size
        if world_size == 1:
            return
        if at is None:
            p = self.position  # a document partly read (by the held-out sequences) is left out whole
            skip = p.get("doc", 0) + (1 if p["offset"] > 0 else 0)
            # From the very start (held-out data from --val-data), a source of W x k files gives each process
            # its own files ("auto": by shards where they divide evenly); after a skip, split by examples
            # (a skip split by shards would be divided among the processes, not applied to the source)
            at = {"part": p["part"], "skip": skip, "epoch": p["epoch"], "world_size": world_size,
                  "strategy": "auto" if (skip, p["part"], p["epoch"]) == (0, 0, 0) else "examples"}
        strategy = at.get("strategy", "examples")

        def share(ds: Any) -> Any:
            return split_dataset_by_node(ds, rank, world_size, strategy=strategy)

        self.split_at = at
        self.parts = [share(p) for p in self.raw]
        self.fresh = [p.state_dict() for p in self.parts]
        self.first = share(self.raw[at["part"]].skip(at["skip"]))
        self.position = {"part": at["part"], "state": self.first.state_dict(), "offset": 0, "epoch": at["epoch"],
                         "doc": 0}
        self._iter = None

    def _tokenise(self, k: int, rows: list[dict], first: int) -> dict[str, list]:
        """A batch of rows of source k (its documents first, first + 1, ...) through the tokeniser: one row
        out per row in."""
        try:
            return self.fn({c: [r[c] for r in rows] for c in rows[0]}, list(range(first, first + len(rows))))
        except RowError as e:
            where = self.origins[k].row(e.index) if self.origins and self.split_at is None else \
                f"a row of {self.origins[k].where if self.origins else f'source {k}'}"
            raise UserError(f"{where}: {e.problem}; fix or remove that row") from None

    def _source(self, k: int, epoch: int) -> Any:
        at = self.split_at
        return self.first if at is not None and (k, epoch) == (at["part"], at["epoch"]) else self.parts[k]

    def _documents(self, position: dict[str, Any]):
        """(part, state before the document, state after it, its index, epoch, document ids, mask), from
        `position` on, endlessly."""
        part, state, epoch, doc = position["part"], position["state"], position["epoch"], position.get("doc", 0)
        while True:
            found, from_start = False, part == 0 and state is None
            for k in range(part, len(self.parts)):
                ds = self._source(k, epoch)
                ds.load_state_dict(copy.deepcopy(state if state is not None else self.fresh[k]))
                it = iter(ds)
                while True:
                    states: list[dict] = [ds.state_dict()]  # states[j]: before row j (and after row j - 1)
                    rows: list[dict] = []
                    while len(rows) < self.map_batch and (row := next(it, None)) is not None:
                        rows.append(row)
                        states.append(ds.state_dict())
                    if not rows:
                        break
                    out = self._tokenise(k, rows, doc)
                    for j, ids in enumerate(out[IDS]):
                        found = found or len(ids) > 0
                        yield k, states[j], states[j + 1], doc + j, epoch, ids, out[MASK][j] if MASK in out else None
                    doc += len(rows)
                state, doc = None, 0
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
        for k, before, after, index, epoch, doc, doc_mask in self._documents(position):
            i, skip = skip, 0
            while i < len(doc):
                take = min(self.seq_len - len(ids), len(doc) - i)
                ids += doc[i:i + take]
                pos += range(i, i + take)
                mask += doc_mask[i:i + take] if doc_mask is not None else [1] * take
                i += take
                if len(ids) == self.seq_len:
                    nxt = {"part": k, "state": before, "offset": i, "epoch": epoch, "doc": index} \
                        if i < len(doc) else {"part": k, "state": after, "offset": 0, "epoch": epoch,
                                              "doc": index + 1}
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

    def next(self, batch_size: int) -> Batch:
        if self.split_at is not None:  # this process's own sequences
            batch = self._packed(self.take(batch_size))
        else:  # one process: the whole batch
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
        """The position (one process), or every process's and the split point (collective under torchrun)."""
        if self.split_at is None:
            return {"stream": copy.deepcopy(self.position)}
        ranks: list[Any] = [None] * self.world_size
        dist.all_gather_object(ranks, copy.deepcopy(self.position))
        return {"split": dict(self.split_at), "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ranks" in state:
            saved = len(state["ranks"])
            if saved != self.world_size:
                raise UserError(f"this run streams its data split over {saved} processes; resume it on {saved} "
                                f"(torchrun --nproc-per-node {saved}), not {self.world_size}")
            self.split(self.rank, self.world_size, at=state["split"])
            self.position, self._iter = copy.deepcopy(state["ranks"][self.rank]), None
            return
        if "stream" not in state:
            raise UserError("the saved run did not stream its data; resume it without --streaming")
        if state["stream"].get("state") is not None and "doc" not in state["stream"]:
            raise UserError("this streamed run was saved by an lrc before 0.3, whose stream positions this one cannot "
                            "read; finish it with that version, or start it again")
        self.position, self._iter = copy.deepcopy(state["stream"]), None
        self.split_at = None
        if self.world_size > 1:  # saved by one process (or an older lrc): split from its position
            self.parts = list(self.raw)
            self.fresh = [p.state_dict() for p in self.parts]
            self.split(self.rank, self.world_size)
