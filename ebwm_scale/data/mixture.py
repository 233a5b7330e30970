"""A weighted mixture of prepared datasets (`data.shards.sources`), sample by sample, deterministic and exactly
resumable.

Slot t of the sample stream (t = 0, 1, ...: every rank's batches, B slots each, in order) takes its sample from the
source whose share so far lags its weight most: the source s maximising w_s (t + 1) - n_s(t), n_s(t) being how
many of the first t slots s took (ties: the first such source). That is Megatron's blending rule; the realised
share of each source stays within 1 / t of its weight. Every rank follows the same slot schedule, so each source's
readers on all ranks advance together, as its own ShardLoader expects.

Each source is a ShardLoader of its own (its shards, epochs and corrupt-shard accounting unchanged). A source's
batch is drawn into a buffer and used sample by sample; the checkpoint state is every source's loader state, the
samples left in its buffer, and the schedule's counts, so a resume serves exactly what comes next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ebwm_scale.data.loader import ShardLoader, ShardSamples, ShardSource


def next_source(weights: np.ndarray, taken: np.ndarray) -> int:
    """The source the next slot goes to: the largest lag w_s (t + 1) - n_s, t = taken.sum()."""
    lag = weights * (taken.sum() + 1) - taken
    return int(np.argmax(lag))


@dataclass(frozen=True)
class Mixture:
    """The train splits of several datasets and their weights."""

    sources: list[ShardSource]
    weights: list[float]

    def __len__(self) -> int:
        return sum(len(source) for source in self.sources)


class MixtureSamples:
    """Map-style view of the sources' validation splits in the slot schedule of their weights (for the fixed
    evaluation batches, which take the first samples): each source's samples in stored order, ending where the first
    source runs out."""

    def __init__(self, sources: list[ShardSamples], weights: list[float]):
        self.sources = sources
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.taken = np.zeros(len(sources), np.int64)
        self.slots: list[tuple[int, int]] = []  # (source, its sample index), extended as far as asked

    def __len__(self) -> int:
        """Slots that no source runs out before: the schedule keeps n_s within 1 of w_s t."""
        return max(0, min(int(len(source) / weight) for source, weight in zip(self.sources, self.weights)) - 1)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        while len(self.slots) <= index:
            source = next_source(self.weights, self.taken)
            self.slots.append((source, int(self.taken[source])))
            self.taken[source] += 1
        source, sample = self.slots[index]
        return self.sources[source][sample]


class MixtureLoader:
    """Infinite iterator of one rank's batches drawn from several ShardSources by weight (see the module docstring)."""

    def __init__(
        self,
        sources: list[ShardSource],
        weights: list[float],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
    ):
        self.sources = sources
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.batch_size = batch_size
        self.loaders = [
            ShardLoader(source, batch_size, seed + index, rank, world_size, num_workers)
            for index, source in enumerate(sources)
        ]
        self.taken = np.zeros(len(sources), dtype=np.int64)
        self.buffers: list[list[np.ndarray]] = [[] for _ in sources]
        self.key = ""

    def __iter__(self) -> MixtureLoader:
        return self

    def _take(self, index: int) -> np.ndarray:
        if not self.buffers[index]:
            batch = next(self.loaders[index])
            (self.key,) = batch  # "tokens" or "frames": every source is of one modality
            self.buffers[index] = list(batch[self.key].numpy())
        return self.buffers[index].pop(0)

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            index = next_source(self.weights, self.taken)
            rows.append(self._take(index))
            self.taken[index] += 1
        return {self.key: torch.from_numpy(np.stack(rows))}

    def metrics(self) -> dict[str, float]:
        """Corrupt shards over all sources, and each source's realised share of the samples so far."""
        shares = self.taken / max(1, self.taken.sum())
        return {
            "corrupt_shards": sum(loader.metrics()["corrupt_shards"] for loader in self.loaders),
            **{f"mixture/{index}": float(share) for index, share in enumerate(shares)},
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "mixture": [source.url for source in self.sources],
            "weights": self.weights.tolist(),
            "taken": self.taken.tolist(),
            "key": self.key,
            "loaders": [loader.state_dict() for loader in self.loaders],
            "buffers": [[row.tolist() for row in buffer] for buffer in self.buffers],
        }

    def _check(self, state: dict[str, Any]) -> None:
        urls = [source.url for source in self.sources]
        if state.get("mixture") != urls or not np.allclose(state["weights"], self.weights):
            raise ValueError(
                f"the checkpoint's data mixture was {state.get('mixture')} with weights {state.get('weights')}, this "
                f"run's is {urls} with {self.weights.tolist()}: exact resume needs the same sources and weights"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check(state)
        self.taken = np.asarray(state["taken"], dtype=np.int64)
        self.key = state["key"]
        for loader, loader_state in zip(self.loaders, state["loaders"], strict=True):
            loader.load_state_dict(loader_state)
        self.buffers = [[np.asarray(row) for row in buffer] for buffer in state["buffers"]]

    def load_resized(self, states: list[dict[str, Any]]) -> None:
        """Continue a run with another number of ranks: each source's loader from all old ranks' states; the samples
        the old ranks had buffered are dealt to the new ranks in turn, so none is lost or repeated."""
        by_rank = {state["loaders"][0]["rank"]: state for state in states}
        first = by_rank[min(by_rank)]
        self._check(first)
        self.taken = np.asarray(first["taken"], dtype=np.int64)
        self.key = first["key"]
        for index, loader in enumerate(self.loaders):
            loader.load_resized([state["loaders"][index] for state in by_rank.values()])
            left = [row for rank in sorted(by_rank) for row in by_rank[rank]["buffers"][index]]
            self.buffers[index] = [np.asarray(row) for row in left[loader.rank :: loader.world_size]]
