"""The streaming shard loader: exactly-once epochs across ranks and workers, exact resume, corrupt/missing shards."""

import shutil
from collections import Counter
from pathlib import Path

import pytest

from ebwm_scale.data.loader import ShardLoader, ShardSource, reader_pieces
from ebwm_scale.data.shards import ShardFormatError

BATCH = 4


def _rows(batch) -> list[tuple[int, ...]]:
    return [tuple(row) for row in batch["tokens"].tolist()]


def _all_samples(source: ShardSource) -> Counter:
    return Counter(tuple(t.tolist()) for i in range(len(source.shards)) for t in source.load(i))


def _per_epoch(source: ShardSource, readers: int) -> int:
    counts = [s["samples"] for s in source.shards]
    return readers * reader_pieces(counts, 0, 0, 0, readers, BATCH)[1]


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_one_epoch_over_two_ranks_sees_each_sample_once(text_shards, num_workers):
    source = ShardSource.open(text_shards.output, "train")
    readers = 2 * max(1, num_workers)
    per_epoch = _per_epoch(source, readers)
    seen = Counter()
    for rank in range(2):
        loader = ShardLoader(source, BATCH, seed=5, rank=rank, world_size=2, num_workers=num_workers)
        for _ in range(per_epoch // (2 * BATCH)):
            seen.update(_rows(next(loader)))
    assert sum(seen.values()) == per_epoch > 0.9 * len(source)
    assert not seen - _all_samples(source)  # nothing invented, nothing repeated beyond the data's own repeats


def test_same_settings_same_order_and_epochs_reshuffle(text_shards):
    source = ShardSource.open(text_shards.output, "train")
    batches_per_epoch = _per_epoch(source, 2) // BATCH
    first = [_rows(next(ShardLoader(source, BATCH, seed=1, num_workers=2))) for _ in range(1)]
    a, b = ShardLoader(source, BATCH, seed=1, num_workers=2), ShardLoader(source, BATCH, seed=1, num_workers=2)
    seq_a = [_rows(next(a)) for _ in range(batches_per_epoch + 3)]
    assert seq_a == [_rows(next(b)) for _ in range(batches_per_epoch + 3)] and seq_a[0] == first[0]
    other_seed = ShardLoader(source, BATCH, seed=2, num_workers=2)
    assert _rows(next(other_seed)) != seq_a[0]
    assert seq_a[batches_per_epoch : batches_per_epoch + 2] != seq_a[:2]  # epoch 1 has its own order


@pytest.mark.parametrize("num_workers, consumed", [(2, 7), (2, 8), (0, 5)])
def test_resume_yields_exactly_the_next_batches(text_shards, num_workers, consumed):
    source = ShardSource.open(text_shards.output, "train")
    straight = ShardLoader(source, BATCH, seed=3, num_workers=num_workers)
    expected = [_rows(next(straight)) for _ in range(consumed + 6)]
    first = ShardLoader(source, BATCH, seed=3, num_workers=num_workers)
    for _ in range(consumed):
        next(first)
    resumed = ShardLoader(source, BATCH, seed=3, num_workers=num_workers)
    resumed.load_state_dict(first.state_dict())
    assert [_rows(next(resumed)) for _ in range(6)] == expected[consumed:]
    with pytest.raises(ValueError, match="same number"):
        ShardLoader(source, BATCH, seed=3, num_workers=num_workers + 1).load_state_dict(first.state_dict())


def test_corrupt_shard_is_skipped_counted_and_logged(text_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(text_shards.output, copy)
    source = ShardSource.open(str(copy), "train")
    victim = copy / source.shards[0]["name"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    loader = ShardLoader(source, BATCH, seed=0, num_workers=0)
    seen = Counter()
    with pytest.warns(RuntimeWarning, match="skipping corrupt shard"):
        for _ in range(_per_epoch(source, 1) // BATCH):
            seen.update(_rows(next(loader)))
    assert loader.metrics()["corrupt_shards"] == 1
    # The reader moves on into its next epoch to fill its batches, so a few samples may repeat; none is invented.
    assert set(seen) <= set(_all_samples(ShardSource.open(text_shards.output, "train")))


def test_missing_shard_is_an_error_at_start(text_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(text_shards.output, copy)
    name = ShardSource.open(str(copy), "train").shards[3]["name"]
    (copy / name).unlink()
    with pytest.raises(ShardFormatError, match=f"missing, e.g. {name}"):
        ShardSource.open(str(copy), "train")
    with pytest.raises(ShardFormatError, match="no meta.json"):
        ShardSource.open(str(Path(tmp_path, "nowhere")), "train")
