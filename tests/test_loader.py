"""The streaming shard loader: exactly-once epochs across ranks and workers, exact resume, corrupt/missing shards."""

import itertools
import math
import shutil
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from ebwm_scale.data.loader import ShardLoader, ShardSource, sequences
from ebwm_scale.data.shards import TEXT_FORMAT_PER_SAMPLE, ReadError, ShardFormatError
from tests.faults import flaky_store
from tests.helpers import NUMBERED_SHARDS, ON_TEXT_SHARDS, SMALL, numbered_dataset

BATCH = 4


def _rows(batch) -> list[tuple[int, ...]]:
    return [tuple(row) for row in batch["tokens"].tolist()]


def _all_samples(source: ShardSource) -> Counter:
    return Counter(tuple(t.tolist()) for i in range(len(source.shards)) for t in source.load(i))


def _per_epoch(source: ShardSource, readers: int) -> int:
    counts = [s["samples"] for s in source.shards]
    return readers * next(sequences(counts, 0, readers, BATCH, None, 1))[1]


def test_shards_of_the_first_text_format_are_still_read(tmp_path):
    """Same samples, same batches, from one int32 member per sample (format 1) as from one uint16 array per shard."""
    old = ShardSource.open(numbered_dataset(tmp_path / "v1", NUMBERED_SHARDS, TEXT_FORMAT_PER_SAMPLE), "train")
    new = ShardSource.open(numbered_dataset(tmp_path / "v2", NUMBERED_SHARDS), "train")
    batches = [list(itertools.islice(ShardLoader(s, BATCH, seed=3, num_workers=0), 15)) for s in (old, new)]
    assert [_rows(b) for b in batches[0]] == [_rows(b) for b in batches[1]]
    assert batches[1][0]["tokens"].dtype == torch.int64


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_sample_once_per_pass_over_two_ranks_with_nothing_dropped(tmp_path, num_workers):
    source = ShardSource.open(numbered_dataset(tmp_path, NUMBERED_SHARDS), "train")
    total, ranks, readers = sum(NUMBERED_SHARDS), 2, 2 * max(1, num_workers)
    loaders = [ShardLoader(source, BATCH, seed=5, rank=r, world_size=ranks, num_workers=num_workers) for r in (0, 1)]
    group = readers * BATCH
    passes = math.lcm(total, group) // total  # whole rounds: each epoch after the first opens with the remainder
    rounds = passes * total // group
    seen: Counter = Counter()
    for round_index in range(rounds):
        for loader in loaders:
            for _ in range(readers // ranks):
                seen.update(row[0] for row in _rows(next(loader)))
        if round_index == total // group - 1:  # the first epoch: no sample twice yet
            assert max(seen.values()) == 1
    assert seen == Counter({i: passes for i in range(total)})


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


@pytest.mark.parametrize("old_workers, new_ranks, new_workers", [(2, 1, 0), (2, 4, 1), (0, 3, 2)])
@pytest.mark.parametrize("batches_before", [3, 9])
def test_a_resized_run_neither_repeats_nor_skips_a_sample(
    tmp_path, old_workers, new_ranks, new_workers, batches_before
):
    """Two ranks stop mid-epoch (9 batches: in the second sequence, their workers one batch apart); the run resumes
    on other ranks and workers. After the new readers have served what was left and then one more epoch, every
    sample has been served once per epoch except the new layout's own carried remainder, which comes next."""
    source = ShardSource.open(numbered_dataset(tmp_path, NUMBERED_SHARDS), "train")
    total = sum(NUMBERED_SHARDS)
    old = [ShardLoader(source, BATCH, seed=5, rank=r, world_size=2, num_workers=old_workers) for r in (0, 1)]
    seen: Counter = Counter()
    for loader in old:
        for _ in range(batches_before):
            seen.update(row[0] for row in _rows(next(loader)))
    states = [loader.state_dict() for loader in old]
    new = [
        ShardLoader(source, BATCH, seed=5, rank=r, world_size=new_ranks, num_workers=new_workers)
        for r in range(new_ranks)
    ]
    for loader in new:
        loader.load_resized(states + states[:1])  # repeats (tensor-parallel ranks of one replica) are ignored
    epochs = new[0].layout["next_epoch"]  # the epochs the old readers had opened
    group = new_ranks * max(1, new_workers) * BATCH
    left = epochs * total - sum(seen.values())
    rounds = left // group + (left % group + total) // group  # what was left, then the next epoch
    for _ in range(rounds * max(1, new_workers)):
        for loader in new:
            seen.update(row[0] for row in _rows(next(loader)))
    still_carried = (left % group + total) % group
    assert set(seen.values()) <= {epochs, epochs + 1}
    assert sum(count == epochs for count in seen.values()) == still_carried
    assert len(seen) == total


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


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_split_whose_every_shard_is_corrupt_stops_with_one_line(text_shards, tmp_path, num_workers):
    """Before: the loader skipped shard after shard forever (warning each time), deaf to SIGTERM."""
    copy = tmp_path / "copy"
    shutil.copytree(text_shards.output, copy)
    source = ShardSource.open(str(copy), "train")
    for shard in source.shards:
        (copy / shard["name"]).write_bytes(b"not a tar")
    loader = ShardLoader(source, BATCH, seed=0, num_workers=num_workers)
    with pytest.warns(RuntimeWarning, match="skipping corrupt shard") if num_workers == 0 else nullcontext():
        with pytest.raises(ShardFormatError) as stopped:
            next(loader)
    message = str(stopped.value)
    assert "\n" not in message and f"every train shard of {copy} is corrupt ({len(source.shards)} shards" in message


@pytest.mark.slow
def test_a_corrupt_validation_shard_stops_the_run_before_it_trains(text_shards, tmp_path):
    """The fixed evaluation batches are read before the first step (before: the run trained, died at its first
    evaluation and, with no periodic checkpoints, kept nothing)."""
    from ebwm_scale.config import load_config
    from ebwm_scale.pretrain import build_trainer
    from tests.conftest import CPU, REPO

    copy = tmp_path / "copy"
    shutil.copytree(text_shards.output, copy)
    victim = copy / ShardSource.open(str(copy), "val").shards[0]["name"]
    victim.write_bytes(victim.read_bytes()[:-100])
    overrides = [*SMALL, *ON_TEXT_SHARDS, "train.max_steps=50"]
    overrides += [f"data.shards.url={copy}", f"train.output_dir={tmp_path}", "data.shards.num_workers=0"]
    trainer = build_trainer(load_config(REPO / "recipes" / "ci_tiny_shards.yaml", overrides), CPU)
    with (
        pytest.warns(RuntimeWarning, match="skipping corrupt shard"),
        pytest.raises(ShardFormatError, match="evaluation"),
    ):
        trainer.fit()
    assert trainer.step == 0


def test_transient_read_errors_are_retried_and_change_nothing(tmp_path):
    url = numbered_dataset(tmp_path, NUMBERED_SHARDS)
    clean = ShardLoader(ShardSource.open(url, "train"), BATCH, seed=2, num_workers=0)
    expected = [_rows(next(clean)) for _ in range(15)]
    store = flaky_store(2, ".tar")
    flaky = ShardLoader(ShardSource.open(f"flaky://{url}", "train", backoff_s=0.01), BATCH, seed=2, num_workers=0)
    with pytest.warns(RuntimeWarning) as caught:
        assert [_rows(next(flaky)) for _ in range(15)] == expected
    assert any("Connection reset by peer" in str(w.message) and "retry 2 in 0.02 s" in str(w.message) for w in caught)
    assert flaky.metrics()["corrupt_shards"] == 0 and set(store.failed.values()) == {2}


def test_a_shard_that_stays_unreadable_stops_the_run_with_its_url(tmp_path):
    url = numbered_dataset(tmp_path, NUMBERED_SHARDS)
    flaky_store(3, ".tar")
    source = ShardSource.open(f"flaky://{url}", "train", read_attempts=3, backoff_s=0.01)
    with (
        pytest.warns(RuntimeWarning, match="retry"),
        pytest.raises(ReadError, match=r"train/0000\d.tar \(3 attempts\)"),
    ):
        next(ShardLoader(source, BATCH, seed=2, num_workers=0))


def test_a_resume_across_the_epoch_layout_change_is_refused(text_shards):
    source = ShardSource.open(text_shards.output, "train")
    state = ShardLoader(source, BATCH, seed=3, num_workers=0).state_dict()
    del state["order"]  # as written before the remainder was carried over
    with pytest.raises(ValueError, match="drop-remainder/0, this version reads carry-remainder/1"):
        ShardLoader(source, BATCH, seed=3, num_workers=0).load_state_dict(state)


def test_missing_shard_is_an_error_at_start(text_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(text_shards.output, copy)
    name = ShardSource.open(str(copy), "train").shards[3]["name"]
    (copy / name).unlink()
    with pytest.raises(ShardFormatError, match=f"missing, e.g. {name}"):
        ShardSource.open(str(copy), "train")
    with pytest.raises(ShardFormatError, match="no meta.json"):
        ShardSource.open(str(Path(tmp_path, "nowhere")), "train")
