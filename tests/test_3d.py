"""Data parallelism with sharded state composed with tensor and pipeline parallelism, on 4 and 8 gloo ranks: ZeRO-1
(parallel.shard_optimizer) x TP, x PP and x TP x PP, and FSDP2 x TP. Each follows one process on the same global
batch: the first step's whole gradients before the optimizer (a constant scale error shows there, Adam hides it in
the weights) and 5 AdamW steps of losses, for the text EBT (second-order gradients) and the AR model."""

import pytest
import torch
import torch.distributed as dist

from ebwm_scale.parallel.dist import DistInfo, with_parallel_groups
from tests.conftest import CPU
from tests.distributed import TRAINER_LOSS_RTOL, assert_gradients_close, run_distributed_test
from tests.helpers import GRADIENT_RTOL, PARITY_RECIPES, check_resume_and_export, train_recording

GLOBAL_BATCH = 8


def _one_process(out, *overrides) -> dict:
    batch = f"data.micro_batch_size={GLOBAL_BATCH}"
    runs = {r: train_recording(r, CPU, out / r, batch, "optim.grad_clip=0", *overrides) for r in PARITY_RECIPES}
    return {recipe: (losses, gradients) for recipe, (_, losses, gradients) in runs.items()}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _one_process(tmp_path_factory.mktemp("one"))


def _layout(rank, size, tp, pp) -> DistInfo:
    return with_parallel_groups(
        DistInfo(rank=rank, local_rank=rank, world_size=size, device=torch.device("cpu")), tp, pp
    )


def _check(rank, size, output_dir, expected, tp, pp, data_parallel, *extra):
    dist_info = _layout(rank, size, tp, pp)
    parallel = [
        f"data.micro_batch_size={GLOBAL_BATCH // dist_info.dp_size}",
        f"parallel.tensor_parallel={tp}",
        f"parallel.pipeline_parallel={pp}",
        "parallel.pipeline_microbatches=2",
        "optim.grad_clip=0",
        *(["parallel.shard_optimizer=true"] if data_parallel == "zero1" else ["parallel.data_parallel=fsdp"]),
        *extra,
    ]
    for recipe in PARITY_RECIPES:
        trainer, losses, gradients = train_recording(recipe, dist_info, f"{output_dir}/{recipe}", *parallel)
        ref_losses, ref_gradients = expected[recipe]
        assert losses == pytest.approx(ref_losses, rel=TRAINER_LOSS_RTOL), recipe
        assert_gradients_close(gradients[0], ref_gradients[0], GRADIENT_RTOL, stage=pp > 1)
        if data_parallel == "zero1":
            _check_optimizer_state_is_split(trainer.engine, dist_info)


def _check_optimizer_state_is_split(engine, dist_info) -> None:
    """Every parameter has AdamW state on exactly one rank of its data-parallel group."""
    stateful = {id(q) for q in engine.optimizer.local.state}
    held = [id(p) in stateful for p in engine.params]
    counts = torch.tensor(held, dtype=torch.int64)
    dist.all_reduce(counts, group=dist_info.dp_group)
    assert counts.eq(1).all() and 0 < sum(held) < len(held)


CHECKPOINTING = "parallel.activation_checkpointing=full"


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, tp, pp, data_parallel, extra",
    [
        (2, 1, 1, "zero1", ["parallel.compile=true"]),
        (4, 2, 1, "zero1", []),
        (4, 1, 2, "zero1", []),
        (4, 2, 1, "fsdp", [CHECKPOINTING]),
    ],
    ids=["zero1-dp2-compiled", "zero1-tp2-dp2", "zero1-pp2-dp2", "fsdp-tp2-dp2-checkpointed"],
)
def test_sharded_data_parallel_composes(world, tp, pp, data_parallel, extra, one_process, tmp_path):
    run_distributed_test(_check, world_size=world, args=(str(tmp_path), one_process, tp, pp, data_parallel, *extra))


@pytest.mark.slow
def test_zero1_with_tensor_and_pipeline_parallel_on_eight_ranks(one_process, tmp_path):
    """ZeRO-1 x TP=2 x PP=2 x DP=2 with activation checkpointing: the whole 3-D layout."""
    run_distributed_test(_check, world_size=8, args=(str(tmp_path), one_process, 2, 2, "zero1", CHECKPOINTING))


@pytest.mark.slow
def test_zero1_with_sequence_parallel_on_four_ranks(tmp_path):
    """ZeRO-1 x TP=2 with sequence parallelism (the time token's 1 + S positions cannot split: additive)."""
    additive = "model.step_conditioning=additive"
    expected = _one_process(tmp_path / "one", additive)
    extra = (additive, "parallel.sequence_parallel=true")
    run_distributed_test(_check, world_size=4, args=(str(tmp_path / "four"), expected, 2, 1, "zero1", *extra))


def _check_resume(rank, size, output_dir, data_parallel):
    mode = "parallel.shard_optimizer=true" if data_parallel == "zero1" else "parallel.data_parallel=fsdp"
    check_resume_and_export(_layout(rank, size, 2, 1), output_dir, "parallel.tensor_parallel=2", mode)


@pytest.mark.slow
@pytest.mark.parametrize("data_parallel", ["zero1", "fsdp"])
def test_sharded_data_parallel_with_tensor_parallel_resumes_bit_for_bit(data_parallel, tmp_path):
    run_distributed_test(_check_resume, world_size=4, args=(str(tmp_path), data_parallel))
