"""The order in which sequences are drawn: deterministic, sharded over ranks, resumable exactly.

The global order is an endless stream of seeded per-epoch permutations, independent of world and batch size.
Each ``next_indices(b)`` consumes the next ``b * world_size`` elements and rank r takes slice ``[r*b, (r+1)*b)``,
so W ranks with batch b see exactly the global batches of one process with batch W*b (striding by rank would
not), across epoch boundaries too. The state is the global position, the same on every rank.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lrc.data.batch import Batch
from lrc.data.packed import PackedDataset, collate
from lrc.errors import UserError


class SequenceSampler:
    """Epoch e's order is ``numpy.random.default_rng((seed, e)).permutation(n)`` (0..n-1 without `shuffle`);
    a mixture's source k uses ``(seed, k, e)`` (`stream`)."""

    def __init__(self, num_sequences: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 stream: int | None = None) -> None:
        if num_sequences < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need num_sequences >= 1 and 0 <= rank < world_size, got {num_sequences}, {rank}, "
                             f"{world_size}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"seed must be a non-negative integer, got {seed!r}; pass --seed N with N >= 0")
        self.num_sequences, self.seed, self.rank, self.world_size = int(num_sequences), int(seed), rank, world_size
        self.shuffle, self.stream = bool(shuffle), stream
        self.epoch = self.position = 0  # position: offset in the epoch's order of the next global batch
        self._orders: dict[int, np.ndarray] = {}  # this epoch's order and, near a boundary, the next one's

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            key = (self.seed, epoch) if self.stream is None else (self.seed, self.stream, epoch)
            n = self.num_sequences
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = np.random.default_rng(key).permutation(n) if self.shuffle else np.arange(n)
        return self._orders[epoch]

    def next_indices(self, n: int) -> list[int]:
        """This rank's next `n` indices: its slice of the next global batch of ``n * world_size``."""
        here = self.epoch * self.num_sequences + self.position
        out: list[int] = []
        epoch, offset = divmod(here + self.rank * n, self.num_sequences)
        while len(out) < n:
            step = min(n - len(out), self.num_sequences - offset)
            out += self._order(epoch)[offset:offset + step].tolist()
            epoch, offset = epoch + 1, 0
        self.epoch, self.position = divmod(here + n * self.world_size, self.num_sequences)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "num_sequences": self.num_sequences,
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in {"num_sequences": self.num_sequences, "seed": self.seed, "shuffle": self.shuffle}.items():
            if key in state and state[key] != mine:
                raise UserError(f"the resumed sampler state has {key}={state[key]} but this run has {key}={mine}; "
                                "resume with the same data, --seq-len and seed as the saved run")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class Mixture:
    """Several packed datasets seen as one: index i of source k is ``offsets[k] + i``."""

    def __init__(self, parts: list[PackedDataset], weights: list[float], names: list[str]):
        self.parts, self.names, self.weights = parts, names, [w / sum(weights) for w in weights]
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, index: int) -> Batch:
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[k].get(index - int(self.offsets[k]))

    def describe(self) -> str:
        return "; ".join(f"{name}: {len(p) * p.seq_len:,} tokens, {w:.1%} of the sequences drawn"
                         for name, p, w in zip(self.names, self.parts, self.weights))


class MixtureSampler:
    """Global position p goes to the source with the largest deficit ``weight_k * (p + 1) - drawn_k`` (ties: the
    first), so every source's share stays within one sequence of its weight; sequences have one length, so
    that is the share of tokens. Each source is walked by its own `SequenceSampler`; the state is the number
    drawn from each source. Ranks take their slices of each global batch, as above."""

    def __init__(self, mixture: Mixture, seed: int, rank: int = 0, world_size: int = 1):
        self.mixture, self.rank, self.world_size = mixture, rank, world_size
        self.sources = [SequenceSampler(len(p), seed, stream=k) for k, p in enumerate(mixture.parts)]
        self.drawn = [0] * len(self.sources)

    def next_indices(self, n: int) -> list[int]:
        w, chosen = self.mixture.weights, []
        for _ in range(n * self.world_size):
            p = sum(self.drawn)
            k = max(range(len(w)), key=lambda j: (w[j] * (p + 1) - self.drawn[j], -j))
            self.drawn[k] += 1
            chosen.append(k)
        local = {k: iter(self.sources[k].next_indices(chosen.count(k))) for k in set(chosen)}
        return [int(self.mixture.offsets[k]) + next(local[k]) for k in chosen][self.rank * n:(self.rank + 1) * n]

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


def calibration_order(data: PackedDataset | Mixture, n: int, seed: int) -> list[int]:
    """`n` sequence indices for calibration, drawn with the run's seed from across `data` (a mixture's sources
    in proportion to their weights), without repeats where the data has `n` sequences; the data's first
    sequences (of a mixture, its first source's) would calibrate on whatever happens to come first."""
    if isinstance(data, Mixture):
        return MixtureSampler(data, seed).next_indices(n)
    return SequenceSampler(len(data), seed).next_indices(min(n, len(data)))


class Batches:
    """Collated micro-batches from a dataset (or mixture) and its sampler; checkpoints store `state_dict`."""

    def __init__(self, dataset: Any, sampler: Any):
        self.dataset, self.sampler = dataset, sampler

    def next(self, batch_size: int) -> Batch:
        return collate([self.dataset.get(i) for i in self.sampler.next_indices(batch_size)])

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
