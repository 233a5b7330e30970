"""Deterministic, exactly resumable streaming of WebDataset shards, text tokens or video latents (docs/design.md §6).

Every (data-parallel rank, DataLoader worker) pair is one *reader*; there are world_size x num_workers of them.
Epoch e's sample sequence is the previous epoch's remainder followed by epoch e's order: the shards in an order seeded
by (seed, e), each shard's samples in an order seeded by (seed, e, shard). Reader r takes the r-th equal, batch-aligned
slice of that sequence; what is left over (fewer than readers x batch samples) opens epoch e + 1. So no sample is
dropped: every sample is served exactly once per pass over the data, across all ranks and workers. Readers stream
forever, epoch after epoch.

Every batch carries its reader and that reader's (epoch, position) after it; the main process records them, so the
state is exact whatever the workers have prefetched. The DataLoader hands out batches round-robin over workers; a
resumed loader rotates the worker -> reader mapping so the round-robin continues where it stopped.

A shard whose bytes do not match meta.json (size, sha256) or that fails to parse is corrupt: skipped, counted and
logged once. A read that fails (a network error on an object store) is retried with exponential backoff; when every
attempt fails the run stops with the shard's URL, since skipping it would change the data order and break exact
resume. A shard listed in meta.json but absent is an error at start.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ebwm_scale.data.shards import (
    VIDEO_FORMAT,
    ShardFormatError,
    is_corrupt_error,
    read_bytes,
    read_meta,
    read_shard,
    sample_field,
    shard_samples,
)

LOADER_ORDER = "carry-remainder/1"  # in the loader state: positions mean nothing under another epoch layout


@dataclass(frozen=True)
class ShardSource:
    """One split of a prepared dataset: its URL, meta.json, and the shards of that split. A failed read is tried
    `read_attempts` times in all, waiting backoff_s, 2 x backoff_s, ... in between."""

    url: str
    split: str
    meta: dict[str, Any]
    read_attempts: int
    backoff_s: float

    @classmethod
    def open(cls, url: str, split: str, read_attempts: int = 5, backoff_s: float = 1.0) -> ShardSource:
        meta = read_meta(url)
        source = cls(url.rstrip("/"), split, meta, read_attempts, backoff_s)
        if not source.shards:
            raise ShardFormatError(f"{url} has no {split} shards (meta.json)")
        fs, root = fsspec.core.url_to_fs(source.url)
        present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{split}", detail=False)}
        missing = [s["name"] for s in source.shards if s["name"].rsplit("/", 1)[-1] not in present]
        if missing:
            raise ShardFormatError(
                f"{len(missing)} shard(s) listed in {url}/meta.json are missing, e.g. {missing[0]}; re-run the prep job"
            )
        return source

    @property
    def modality(self) -> str:
        return "frames" if self.meta["format"] == VIDEO_FORMAT else "text"

    def to_model(self, stored: np.ndarray) -> tuple[str, np.ndarray]:
        """(batch key, model input) of stacked stored samples: int64 tokens, or float32 frame latents standardized
        per dimension with the train split's statistics (meta.json)."""
        if self.modality == "text":
            return "tokens", stored.astype(np.int64)
        stats = self.meta["latents"]
        mean, std = np.asarray(stats["mean"], dtype=np.float32), np.asarray(stats["std"], dtype=np.float32)
        return "frames", (stored.astype(np.float32) - mean) / std

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.meta["splits"][self.split]["shards"]

    def __len__(self) -> int:
        return self.meta["splits"][self.split]["samples"]

    def load(self, index: int) -> list[np.ndarray] | None:
        """The samples of shard `index` in stored order, or None if the shard is corrupt (checksum or parse)."""
        info = self.shards[index]
        url = f"{self.url}/{info['name']}"
        data = read_bytes(url, self.read_attempts, self.backoff_s)
        try:
            if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
                raise ShardFormatError(f"{url} does not match meta.json (size or sha256)")
            members = [array for _, array in read_shard(data, url, sample_field(self.meta))]
            samples = shard_samples(self.meta, members)
            if len(samples) != info["samples"]:
                raise ShardFormatError(f"{url} holds {len(samples)} samples, meta.json says {info['samples']}")
        except Exception as error:
            if not is_corrupt_error(error):
                raise
            warnings.warn(f"skipping corrupt shard {url}: {error}", RuntimeWarning, stacklevel=2)
            return None
        return samples


Run = tuple[int, int, int, int]  # (order epoch, shard, first, last): positions first:last of a shard's sample order


def _epoch_runs(counts: list[int], seed: int, epoch: int) -> list[Run]:
    """Epoch `epoch`'s sequence of whole shards as runs."""
    order = np.random.default_rng([seed, epoch]).permutation(len(counts))
    return [(epoch, int(shard), 0, counts[shard]) for shard in order]


def _length(runs: list[Run]) -> int:
    return sum(last - first for _, _, first, last in runs)


def _cut(runs: list[Run], lo: int, hi: int) -> list[Run]:
    """The runs covering positions lo:hi of the sequence `runs` spells."""
    pieces, offset = [], 0
    for order_epoch, shard, first, last in runs:
        start, end = max(lo, offset), min(hi, offset + last - first)
        if start < end:
            pieces.append((order_epoch, shard, first + start - offset, first + end - offset))
        offset += last - first
    return pieces


def sequences(counts: list[int], seed: int, num_readers: int, batch_size: int, base: list[Run] | None, next_epoch: int):
    """Sequence k = 0, 1, ...: the runs the readers split, each taking an equal, batch-aligned slice. Sequence 0 is
    `base` (None: epoch 0's order); sequence k + 1 is what no reader took of sequence k (fewer than readers x batch
    samples) followed by the order of epoch `next_epoch` + k. Yields (runs, samples per reader) forever."""
    group = num_readers * batch_size
    runs = _epoch_runs(counts, seed, 0) if base is None else list(base)
    while True:
        length = _length(runs)
        yield runs, (length // group) * batch_size
        runs = _cut(runs, length - length % group, length) + _epoch_runs(counts, seed, next_epoch)
        next_epoch += 1


def remaining_runs(
    counts: list[int], seed: int, batch_size: int, layout: dict[str, Any], positions: dict[int, tuple[int, int]]
) -> tuple[list[Run], int]:
    """(runs, next epoch) of everything the readers of `layout` (num_readers, base, next_epoch) have not taken yet,
    given each reader's (sequence, position): the start of a loader with any other number of readers that neither
    repeats nor skips a sample. Readers stay within one batch of each other, so at most two sequences are open."""
    num_readers = layout["num_readers"]
    at = [positions.get(reader, (0, 0)) for reader in range(num_readers)]
    first = min(k for k, _ in at)
    if max(k for k, _ in at) > first + 1:
        raise ValueError(f"loader readers are more than one sequence apart: {at}")
    stream = sequences(counts, seed, num_readers, batch_size, layout["base"], layout["next_epoch"])
    for _ in range(first):
        next(stream)
    (older, older_share), (newer, newer_share) = next(stream), next(stream)
    left: list[Run] = []
    for reader, (k, position) in enumerate(at):
        if k == first:
            left += _cut(older, reader * older_share + position, (reader + 1) * older_share)
    taken = sorted((r * newer_share, r * newer_share + position) for r, (k, position) in enumerate(at) if k > first)
    offset = 0
    for lo, hi in taken:
        left += _cut(newer, offset, lo)
        offset = hi
    left += _cut(newer, offset, _length(newer))
    return left, layout["next_epoch"] + first + 1


class ReaderStream(IterableDataset):
    """The batches of one rank's readers; DataLoader worker i serves reader rank * W + (rotation + i) % W."""

    def __init__(
        self,
        source: ShardSource,
        batch_size: int,
        seed: int,
        rank: int,
        num_workers: int,
        world_size: int,
        layout: dict[str, Any],
        starts: dict[int, tuple[int, int]],
        rotation: int,
    ):
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.num_workers = num_workers
        self.num_readers = world_size * num_workers
        self.layout = layout
        self.starts = starts
        self.rotation = rotation

    def _samples(self, reader: int) -> Iterator[tuple[np.ndarray, int, int, int]]:
        """(stored sample, sequence, position after it, corrupt shards so far), forever."""
        counts = [s["samples"] for s in self.source.shards]
        if sum(counts) < self.num_readers * self.batch_size:
            raise ShardFormatError(
                f"{self.source.url} ({self.source.split}) has {sum(counts)} samples, fewer than one batch for "
                f"each of {self.num_readers} readers"
            )
        start, position = self.starts.get(reader, (0, 0))
        stream = sequences(
            counts, self.seed, self.num_readers, self.batch_size, self.layout["base"], self.layout["next_epoch"]
        )
        corrupt: set[tuple[int, int]] = set()
        for index, (runs, per_reader) in enumerate(stream):
            if index < start:
                continue
            offset = 0
            for order_epoch, shard, first, last in _cut(runs, reader * per_reader, (reader + 1) * per_reader):
                length = last - first
                if offset + length <= position:  # consumed before the resume point
                    offset += length
                    continue
                samples = self.source.load(shard)
                if samples is None:
                    corrupt.add((order_epoch, shard))
                    if len({s for _, s in corrupt}) == len(counts):  # nothing left to read: stop, do not spin
                        raise ShardFormatError(
                            f"every {self.source.split} shard of {self.source.url} is corrupt ({len(counts)} shards, "
                            "size or sha256 unlike meta.json, or unreadable): re-run the prep job"
                        )
                else:
                    order = np.random.default_rng([self.seed, order_epoch, shard]).permutation(len(samples))
                    for i in range(max(first, first + position - offset), last):
                        yield samples[order[i]], index, offset + (i - first) + 1, len(corrupt)
                offset += length
                position = max(position, offset)
            position = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        reader = self.rank * self.num_workers + (self.rotation + worker) % self.num_workers
        batch: list[np.ndarray] = []
        for sample, sequence, position, corrupt in self._samples(reader):
            batch.append(sample)
            if len(batch) == self.batch_size:
                key, values = self.source.to_model(np.stack(batch))
                yield {
                    key: torch.from_numpy(values),
                    "_reader": torch.tensor(reader),
                    "_sequence": torch.tensor(sequence),
                    "_position": torch.tensor(position),
                    "_corrupt": torch.tensor(corrupt),
                }
                batch = []


class ShardLoader:
    """Infinite iterator of {"tokens": (B, S+1) int64} or {"frames": (B, T, D) float32} batches for one rank, with
    exact state_dict/load_state_dict, and load_resized to continue the data of a run that had another number of
    ranks or workers."""

    def __init__(
        self, source: ShardSource, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 2
    ):
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.readers_per_rank = max(1, num_workers)
        self.layout: dict[str, Any] = {"num_readers": world_size * self.readers_per_rank, "base": None, "next_epoch": 1}
        self.consumed = 0
        self.positions: dict[int, tuple[int, int]] = {}
        self.corrupt: dict[int, int] = {}
        self.corrupt_before_resume = 0.0
        self._iterator: Iterator | None = None

    def _start(self) -> Iterator:
        stream = ReaderStream(
            self.source,
            self.batch_size,
            self.seed,
            self.rank,
            self.readers_per_rank,
            self.world_size,
            self.layout,
            dict(self.positions),
            self.consumed % self.readers_per_rank,
        )
        if self.num_workers == 0:
            return iter(stream)
        # An own generator: DataLoader would otherwise draw its worker seed from the global torch RNG, which the
        # MCMC noise uses, and a loader started at a resume would shift that stream.
        generator = torch.Generator().manual_seed(self.seed)
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=4,
            worker_init_fn=_single_thread_worker,
            generator=generator,
        )
        return iter(loader)

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = self._start()
        try:
            batch = next(self._iterator)
        except ShardFormatError as error:  # from a DataLoader worker the message holds the worker's traceback
            raise ShardFormatError(str(error).strip().splitlines()[-1].split("ShardFormatError: ")[-1]) from None
        reader = int(batch.pop("_reader"))
        self.positions[reader] = (int(batch.pop("_sequence")), int(batch.pop("_position")))
        self.corrupt[reader] = int(batch.pop("_corrupt"))
        self.consumed += 1
        return batch

    def metrics(self) -> dict[str, float]:
        return {"corrupt_shards": float(self.corrupt_before_resume + sum(self.corrupt.values()))}

    def state_dict(self) -> dict[str, Any]:
        return {
            "order": LOADER_ORDER,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "consumed": self.consumed,
            "num_workers": self.num_workers,
            "layout": {
                **self.layout,
                "base": None if self.layout["base"] is None else [list(r) for r in self.layout["base"]],
            },
            "positions": {str(r): list(p) for r, p in self.positions.items()},
            "corrupt_shards": self.metrics()["corrupt_shards"],
        }

    def _check_order(self, state: dict[str, Any]) -> None:
        if state.get("order") != LOADER_ORDER:
            raise ValueError(
                f"the checkpoint's loader state was written for epoch layout {state.get('order', 'drop-remainder/0')}, "
                f"this version reads {LOADER_ORDER}: its positions would select other samples, so exact resume is not "
                "possible; start a new run from its weights (train.init_from after tools/export.py)"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` (this rank's, from a run with the same ranks and workers) stopped."""
        self._check_order(state)
        if state["num_workers"] != self.num_workers:
            raise ValueError(
                f"the checkpoint's loader ran {state['num_workers']} workers, this run has data.shards.num_workers="
                f"{self.num_workers}; exact resume needs the same number (or resume through load_resized)"
            )
        self.consumed = state["consumed"]
        if "layout" in state:  # states written before resizing existed are in the fresh layout
            self.layout = _layout_from_state(state["layout"])
        self.positions = {int(r): (p[0], p[1]) for r, p in state["positions"].items()}
        self.corrupt_before_resume, self.corrupt = state["corrupt_shards"], {}
        self._iterator = None

    def load_resized(self, states: list[dict[str, Any]]) -> None:
        """Continue the data of a run with another number of ranks or workers: `states` holds every old rank's
        loader state (one per data-parallel rank; repeats are ignored). What its readers had not taken becomes the
        first sequence of this layout, so no sample is repeated or skipped; the epochs after it follow as usual."""
        by_rank = {state["rank"]: state for state in states}
        for state in by_rank.values():
            self._check_order(state)
        old = next(iter(by_rank.values()))
        if "layout" not in old:
            raise ValueError("the checkpoint's loader state predates resizable layouts: resume it on its own ranks")
        if sorted(by_rank) != list(range(old["world_size"])):
            raise ValueError(
                f"load_resized needs the loader state of all {old['world_size']} ranks, got {sorted(by_rank)}"
            )
        if old["batch_size"] != self.batch_size:
            raise ValueError(
                f"the checkpoint's loader served batches of {old['batch_size']}, this run has data.micro_batch_size="
                f"{self.batch_size}: change grad_accum_steps instead to keep the global batch"
            )
        positions = {int(r): (p[0], p[1]) for state in by_rank.values() for r, p in state["positions"].items()}
        counts = [s["samples"] for s in self.source.shards]
        base, next_epoch = remaining_runs(
            counts, self.seed, self.batch_size, _layout_from_state(old["layout"]), positions
        )
        self.layout = {"num_readers": self.world_size * self.readers_per_rank, "base": base, "next_epoch": next_epoch}
        self.consumed, self.positions = 0, {}
        self.corrupt_before_resume = sum(state["corrupt_shards"] for state in by_rank.values()) / len(by_rank)
        self.corrupt = {}
        self._iterator = None


def _layout_from_state(layout: dict[str, Any]) -> dict[str, Any]:
    base = None if layout["base"] is None else [tuple(run) for run in layout["base"]]
    return {"num_readers": layout["num_readers"], "base": base, "next_epoch": layout["next_epoch"]}


def _single_thread_worker(worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the training step for cores


class ShardSamples:
    """Map-style view of a split (for the fixed evaluation batches): sample i in stored order, shard by shard."""

    def __init__(self, source: ShardSource):
        self.source = source
        self.bounds = np.cumsum([0] + [s["samples"] for s in source.shards])
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        shard = int(np.searchsorted(self.bounds, index, side="right") - 1)
        if self._cached is None or self._cached[0] != shard:
            samples = self.source.load(shard)
            if samples is None:
                raise ShardFormatError(
                    f"evaluation shard {self.source.url}/{self.source.shards[shard]['name']} is corrupt (size or "
                    "sha256 unlike meta.json, or unreadable): re-run the prep job"
                )
            self._cached = (shard, samples)
        key, values = self.source.to_model(self._cached[1][index - self.bounds[shard]][None])
        return {key: values[0]}
