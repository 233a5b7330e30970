"""Deterministic, resumable batching over a map-style dataset of fixed-length samples.

Epoch e visits a permutation seeded by (seed, e); data-parallel rank r takes every world_size-th sample of it.
The whole position is (epoch, samples taken), so a resumed run yields exactly the batches it would have.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class SampleDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


class BatchLoader:
    """Epoch e visits a permutation seeded by (seed, e) in global batches of batch_size x world_size consecutive
    samples, rank r taking every world_size-th sample of each; the few samples after the last whole global batch are
    left out of that epoch. The position is (epoch, samples of the epoch taken by all ranks together), the same on
    every rank, so a run may resume on another number of ranks without repeating or skipping a sample."""

    def __init__(self, dataset: SampleDataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.global_batch = batch_size * world_size
        if len(dataset) < self.global_batch:
            raise ValueError(
                f"dataset of {len(dataset)} samples is smaller than one global batch "
                f"({batch_size} x {world_size} ranks)"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.sample = 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset))

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.sample + self.global_batch > len(self.dataset):
            self.epoch, self.sample = self.epoch + 1, 0
            self._order = self._epoch_order()
        indices = self._order[self.sample + self.rank : self.sample + self.global_batch : self.world_size]
        self.sample += self.global_batch
        return collate([self.dataset[int(i)] for i in indices])

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "sample": self.sample}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.sample = state["epoch"], state["sample"]
        self._order = self._epoch_order()

    def load_resized(self, states: list[dict[str, int]]) -> None:
        """Every rank's position is the same global one: continue from it with this run's ranks."""
        self.load_state_dict(states[0])


def fixed_batches(dataset: SampleDataset, batch_size: int, num_batches: int, rank: int = 0, world_size: int = 1):
    """The first num_batches batches of the dataset in order, split across ranks: the same eval set every time."""
    available = len(dataset) // (batch_size * world_size)
    for b in range(min(num_batches, available)):
        start = (b * world_size + rank) * batch_size
        yield collate([dataset[i] for i in range(start, start + batch_size)])
