"""The order in which training sequences are drawn: exact, deterministic, resumable, sharded over ranks.

`SequenceSampler` walks one packed dataset in seeded per-epoch permutations; `MixtureSampler` interleaves
several datasets in proportion to their weights; `Batches` turns either into collated micro-batches with a
`state_dict` that checkpoints store, so `--resume` continues with exactly the batches that would have followed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lrc.data.packed import PackedDataset, collate
from lrc.errors import UserError


class SequenceSampler:
    """Deterministic, resumable order over sequence indices, sharded across data-parallel ranks.

    The global order is an endless stream: the permutation of epoch 0, then of epoch 1, and so on, where
    epoch e's permutation comes from ``numpy.random.default_rng((seed, e))`` (or is 0..n-1 when
    `shuffle` is False). It does not depend on the world size or the batch size.

    Sharding is by global batch, contiguously: each call ``next_indices(b)`` consumes the next
    ``b * world_size`` indices of the stream, and rank r gets the slice ``[r*b, (r+1)*b)`` of them. So
    rank r's k-th batch of size b is exactly elements ``[k*b*W + r*b, k*b*W + (r+1)*b)`` of the order a
    single process (world_size=1) gets when it takes batches of ``b*W``: a multi-GPU run sees the same
    global batches as a single-GPU run with the same global batch size. (Striding by rank would not
    have this property.) All ranks must therefore call `next_indices` with the same n, as they do when
    they step together.

    A global batch may cross an epoch boundary; it then continues into the next epoch's permutation,
    so no indices are dropped and ranks always get equal counts.

    The state (`state_dict`) is the global stream position, identical on every rank; restoring it
    gives exactly the indices that would have followed without the interruption, also with another
    world size as long as the global batch size is unchanged.
    """

    def __init__(self, num_sequences: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 stream: int | None = None) -> None:
        if num_sequences < 1:
            raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"seed must be a non-negative integer, got {seed!r}; pass --seed N with N >= 0")
        self.num_sequences = int(num_sequences)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.stream = stream  # a mixture's source number: each source gets its own permutations
        self.epoch = 0
        self.position = 0  # offset within the current epoch's order of the next global batch
        # The current epoch's permutation (and the next one's, near a boundary) are reused across calls.
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            if self.shuffle:
                key = (self.seed, epoch) if self.stream is None else (self.seed, self.stream, epoch)
                order = np.random.default_rng(key).permutation(self.num_sequences)
            else:
                order = np.arange(self.num_sequences)
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            self._orders[epoch] = order
        return order

    def _take(self, start: int, count: int) -> list[int]:
        """Elements [start, start + count) of the endless global stream."""
        out: list[int] = []
        epoch, offset = divmod(start, self.num_sequences)
        while count > 0:
            step = min(count, self.num_sequences - offset)
            out.extend(self._order(epoch)[offset : offset + step].tolist())
            count -= step
            epoch, offset = epoch + 1, 0
        return out

    def next_indices(self, n: int) -> list[int]:
        """This rank's next `n` sequence indices (its slice of the next global batch of n * world_size)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        here = self.epoch * self.num_sequences + self.position
        indices = self._take(here + self.rank * n, n)
        self.epoch, self.position = divmod(here + n * self.world_size, self.num_sequences)
        return indices

    def state_dict(self) -> dict[str, Any]:
        """Plain-int (JSON-serialisable) state; the same on every rank."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_sequences": self.num_sequences,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from `state_dict`).

        Raises:
            UserError: the state was saved for a different number of sequences, seed or shuffle setting,
                i.e. the run being resumed used other data or settings.
        """
        expected = {"num_sequences": self.num_sequences, "seed": self.seed, "shuffle": self.shuffle}
        for key, mine in expected.items():
            if key in state and state[key] != mine:
                raise UserError(
                    f"the resumed sampler state has {key}={state[key]} but this run has {key}={mine}; "
                    "resume with the same data, --seq-len and seed as the saved run"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_sequences:
            raise ValueError(f"invalid sampler state: epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position




class Mixture:
    """Several packed datasets seen as one: index i of source k is ``offsets[k] + i``."""

    def __init__(self, parts: list[PackedDataset], weights: list[float], names: list[str]):
        self.parts, self.names = parts, names
        self.weights = [w / sum(weights) for w in weights]
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.seq_len = parts[0].seq_len

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, index: int) -> dict[str, torch.Tensor]:
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[k].get(index - int(self.offsets[k]))

    def describe(self) -> str:
        return "; ".join(f"{name}: {p.tokens_used():,} tokens, {w:.1%} of the sequences drawn"
                         for name, p, w in zip(self.names, self.parts, self.weights))


class MixtureSampler:
    """Global positions go to sources by largest deficit: position p goes to the source k with the largest
    ``weight_k * (p + 1) - drawn_k`` (ties: the first), so after any number of draws every source's share is
    within one sequence of its weight (all sequences have the same length, so this is the share of tokens).
    Each source is walked by its own `SequenceSampler` (own permutations per epoch). As with one dataset,
    rank r takes slice r of each global batch; the state is the number drawn from each source."""

    def __init__(self, mixture: Mixture, seed: int, rank: int = 0, world_size: int = 1):
        self.mixture, self.rank, self.world_size = mixture, rank, world_size
        self.sources = [SequenceSampler(len(p), seed, stream=k) for k, p in enumerate(mixture.parts)]
        self.drawn = [0] * len(self.sources)

    def next_indices(self, n: int) -> list[int]:
        weights = self.mixture.weights
        chosen = []
        for _ in range(n * self.world_size):
            p = sum(self.drawn)
            k = max(range(len(weights)), key=lambda j: (weights[j] * (p + 1) - self.drawn[j], -j))
            self.drawn[k] += 1
            chosen.append(k)
        local = {k: iter(self.sources[k].next_indices(chosen.count(k))) for k in set(chosen)}
        order = [int(self.mixture.offsets[k]) + next(local[k]) for k in chosen]
        return order[self.rank * n:(self.rank + 1) * n]

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": list(self.drawn), "sizes": [s.num_sequences for s in self.sources],
                "seed": self.sources[0].seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        if "drawn" not in state or state["sizes"] != mine["sizes"] or state["seed"] != mine["seed"]:
            raise UserError("the resumed run drew from other data (sources, sizes or seed differ); resume with the "
                            "same --data, weights, --seq-len and seed as the saved run")
        for sampler, count in zip(self.sources, state["drawn"]):
            sampler.epoch, sampler.position = divmod(int(count), sampler.num_sequences)
        self.drawn = [int(c) for c in state["drawn"]]


class Batches:
    """Collated micro-batches from a dataset (or mixture) and its sampler; checkpoints store `state_dict`."""

    def __init__(self, dataset: Any, sampler: Any):
        self.dataset, self.sampler = dataset, sampler

    def next(self, batch_size: int) -> dict[str, torch.Tensor]:
        return collate([self.dataset.get(i) for i in self.sampler.next_indices(batch_size)])

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
