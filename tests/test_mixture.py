"""Weighted mixtures of prepared datasets: the slot schedule, every sample of every source once per pass, exact
resume from the loader state (buffers included) and on another number of ranks."""

import itertools
from collections import Counter

import numpy as np
import pytest

from ebwm_scale.data.loader import ShardSamples, ShardSource
from ebwm_scale.data.mixture import MixtureLoader, MixtureSamples, next_source
from tests.helpers import NUMBERED_SHARDS, numbered_dataset

BATCH = 4


def test_the_schedule_keeps_every_share_within_one_sample_of_its_weight():
    weights = np.array([0.5, 0.3, 0.2])
    taken = np.zeros(3, dtype=np.int64)
    for t in range(1, 1001):
        taken[next_source(weights, taken)] += 1
        assert np.all(np.abs(taken - weights * t) <= 1), (t, taken)
    assert taken.tolist() == [500, 300, 200]


def _sources(tmp_path, count: int = 2) -> list[ShardSource]:
    """Datasets whose samples are [n, n, n]; source k's numbers start at 1000 k, so each sample names its source."""
    return [
        ShardSource.open(numbered_dataset(tmp_path / f"s{k}", NUMBERED_SHARDS, numbers_from=1000 * k), "train")
        for k in range(count)
    ]


def _rows(batch) -> list[int]:
    return [row[0] for row in batch["tokens"].tolist()]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_mixture_follows_its_weights_and_serves_each_sample_once_per_pass(tmp_path, num_workers):
    sources = _sources(tmp_path)
    loader = MixtureLoader(sources, [3, 1], BATCH, seed=1, num_workers=num_workers)
    served = [n for batch in itertools.islice(loader, 22) for n in _rows(batch)]  # 88 samples: 66 of s0, 22 of s1
    by_source = Counter(n // 1000 for n in served)
    assert by_source == {0: 66, 1: 22}
    first_pass = [n for n in served if n < 1000][: sum(NUMBERED_SHARDS)]
    assert sorted(first_pass) == list(range(sum(NUMBERED_SHARDS)))  # source 0's first 44: each sample once
    assert loader.metrics()["mixture/0"] == pytest.approx(0.75)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_mixture_resumes_exactly_from_its_state(tmp_path, num_workers):
    sources = _sources(tmp_path)
    straight = [
        _rows(b) for b in itertools.islice(MixtureLoader(sources, [2, 1], BATCH, 7, num_workers=num_workers), 20)
    ]
    first = MixtureLoader(sources, [2, 1], BATCH, 7, num_workers=num_workers)
    head = [_rows(b) for b in itertools.islice(first, 7)]
    state = first.state_dict()
    assert any(state["buffers"])  # stopped with samples drawn but not yet served
    resumed = MixtureLoader(sources, [2, 1], BATCH, 7, num_workers=num_workers)
    resumed.load_state_dict(state)
    assert head + [_rows(b) for b in itertools.islice(resumed, 13)] == straight
    other = MixtureLoader(sources, [1, 1], BATCH, 7)
    with pytest.raises(ValueError, match="exact resume needs the same sources and weights"):
        other.load_state_dict(state)


def test_a_mixture_resumed_on_fewer_ranks_neither_repeats_nor_skips(tmp_path):
    """Each source's loader resizes exactly (tests/test_loader.py); what the mixture adds are the samples its old
    ranks had drawn but not served: they come first on the new rank, in old-rank order."""
    sources = _sources(tmp_path)
    two = [MixtureLoader(sources, [2, 1], BATCH, 3, rank=r, world_size=2, num_workers=0) for r in (0, 1)]
    before = [n for _ in range(5) for loader in two for n in _rows(next(loader))]
    states = [loader.state_dict() for loader in two]
    pending = [[row[0] for state in states for row in state["buffers"][k]] for k in (0, 1)]
    assert any(pending)
    one = MixtureLoader(sources, [2, 1], BATCH, 3, rank=0, world_size=1, num_workers=0)
    one.load_resized(states)
    after = [n for batch in itertools.islice(one, 10) for n in _rows(batch)]
    for k in (0, 1):
        served = [n for n in after if n // 1000 == k]
        assert served[: len(pending[k])] == pending[k]
        first_pass = [n for n in before + after if n // 1000 == k][: sum(NUMBERED_SHARDS) - BATCH * 2]
        assert len(set(first_pass)) == len(first_pass), f"source {k} repeated a sample"


def test_mixture_evaluation_samples_follow_the_weights(tmp_path):
    vals = [ShardSamples(source) for source in _sources(tmp_path)]
    mixed = MixtureSamples(vals, [1, 3])
    firsts = [int(mixed[i]["tokens"][0]) for i in range(8)]
    assert Counter(n // 1000 for n in firsts) == {0: 2, 1: 6}
    everything = [int(mixed[i]["tokens"][0]) for i in range(len(mixed))]  # none beyond a source's end
    assert len(everything) == 57 and len(set(everything)) == 57  # source 1 (3/4) holds 44: 44 / 0.75 slots, less 1
    with pytest.raises(IndexError):
        mixed[len(mixed)]
