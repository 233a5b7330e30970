"""DeepSpeed ZeRO 0/1/2/3, FSDP2 sharded parameters and our data parallel on 2 gloo ranks: the same losses and
parameters as one process on the same global batch (EBT-text with its second-order gradients, and AR-text),
exact resume, and the deepspeed launcher."""

import pytest
import torch

from ebwm_scale.config import load_config
from ebwm_scale.parallel.dist import DistInfo
from ebwm_scale.pretrain import build_trainer
from tests.conftest import CPU, REPO
from tests.distributed import TRAINER_LOSS_RTOL, assert_gradients_close, launch_entry_point, run_distributed_test
from tests.helpers import (
    GRADIENT_RTOL,
    NOISY_RESUME,
    PARITY,
    PARITY_RECIPES,
    PARITY_STEPS,
    Recorder,
    run_recipe,
    run_recipe_with_gradients,
)

# DeepSpeed keeps parameters under 1e5 elements whole ("persistent") under ZeRO-3: all of a tiny model's. This makes
# it partition every one, so that the tests exercise what a large model does.
ZERO3_PARTITION_ALL = REPO / "tests" / "assets" / "zero3_partition_all.json"


def _mode(mode: str) -> list[str]:
    """'ddp' | 'fsdp' | 'zeroN' -> the parallel.* overrides."""
    if not mode.startswith("zero"):
        return [f"parallel.data_parallel={mode}"]
    stage = mode.removeprefix("zero")
    extra = [f"parallel.deepspeed_config={ZERO3_PARTITION_ALL}"] if stage == "3" else []
    return ["parallel.data_parallel=zero", f"parallel.zero_stage={stage}", *extra]


def _check_parity(rank, world_size, mode, output_dir, expected):
    """The first step's gradients before the optimizer, per tensor, and the losses, vs one process on the whole
    batch. Only the first step's gradients: later ones follow weights that Adam has moved by reordered roundings."""
    dist = DistInfo(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))
    for recipe in PARITY_RECIPES:
        losses, _, gradients = run_recipe_with_gradients(
            recipe,
            dist,
            f"{output_dir}/{recipe}",
            "data.micro_batch_size=4",
            *_mode(mode),
            "optim.grad_clip=0",  # clipping to a norm would hide a scale error too
        )
        ref_losses, ref_gradients = expected[recipe]
        assert losses == pytest.approx(ref_losses, rel=TRAINER_LOSS_RTOL), (mode, recipe)
        assert len(gradients) == PARITY_STEPS
        assert_gradients_close(gradients[0], ref_gradients[0], GRADIENT_RTOL)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    runs = {
        recipe: run_recipe_with_gradients(recipe, CPU, out / recipe, "data.micro_batch_size=8", "optim.grad_clip=0")
        for recipe in PARITY_RECIPES
    }
    return {recipe: (losses, gradients) for recipe, (losses, _, gradients) in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero0", "zero1", "zero2", "zero3", "fsdp"])
def test_two_ranks_match_one_process(mode, single_process, tmp_path):
    run_distributed_test(_check_parity, world_size=2, args=(mode, str(tmp_path), single_process))


def _check_resume(rank, world_size, mode, output_dir):
    dist = DistInfo(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))
    noisy = ["mcmc.init_scale=1", *NOISY_RESUME, *_mode(mode)]
    straight, straight_params = run_recipe("ci_tiny.yaml", dist, f"{output_dir}/a", *noisy)
    checkpoint = f"{output_dir}/a/ci_tiny/checkpoints/step_00000004"
    resumed, resumed_params = run_recipe("ci_tiny.yaml", dist, f"{output_dir}/b", *noisy, f"train.resume={checkpoint}")
    assert resumed == straight[4:], (resumed, straight)  # bit for bit
    assert all(torch.equal(resumed_params[k], straight_params[k]) for k in straight_params)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero1", "zero2", "zero3", "fsdp"])
def test_resume_is_exact_on_two_ranks(mode, tmp_path):
    run_distributed_test(_check_resume, world_size=2, args=(mode, str(tmp_path)))


@pytest.mark.slow
def test_deepspeed_launcher_runs_the_entry_point(tmp_path):
    args = [
        str(REPO / "recipes" / "ci_tiny.yaml"),
        *PARITY,
        "parallel.data_parallel=zero",
        "parallel.zero_stage=2",
        f"train.output_dir={tmp_path}",
    ]
    proc = launch_entry_point("deepspeed", args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s) (DeepSpeed ZeRO-2)" in proc.stdout and f"step {PARITY_STEPS}/{PARITY_STEPS}" in proc.stdout
    assert (tmp_path / "ci_tiny" / "checkpoints" / f"step_{PARITY_STEPS:08d}" / "rank_00001.pt").exists()


FLAGSHIP = [  # recipes/nlp_1b.yaml's combination at toy size
    "train.precision=bf16",
    "parallel.activation_checkpointing=full",
    "train.grad_accum_steps=2",
    "data.micro_batch_size=2",
    "mcmc.alpha_lr_multiplier=50",  # alpha moves by more than bf16 could hold
]
BF16_LOSS_RTOL = 2e-2  # bf16 matmuls summed in a different order: ~3 significant digits agree


def _check_flagship(rank, world_size, output_dir):
    dist = DistInfo(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))
    runs = {}
    for mode in ("ddp", "zero2", "zero3"):
        cfg = load_config(
            REPO / "recipes" / "ci_tiny.yaml",
            [
                *PARITY,
                *FLAGSHIP,
                *_mode(mode),
                f"train.output_dir={output_dir}/{mode}",
            ],
        )
        recorder = Recorder()
        trainer = build_trainer(cfg, dist, [recorder])
        trainer.fit()
        alpha = trainer.engine.model_state_dict()["mcmc.alpha"]  # whole, also where ZeRO-3 partitions it
        assert alpha.dtype == torch.float32, (mode, alpha.dtype)
        runs[mode] = ([m["loss"] for m in recorder.train], [m["alpha"] for m in recorder.train], float(alpha))
    ddp_losses, ddp_alpha, _ = runs["ddp"]
    for mode in ("zero2", "zero3"):
        zero_losses, zero_alpha, final = runs[mode]
        assert zero_losses == pytest.approx(ddp_losses, rel=BF16_LOSS_RTOL), mode
        # ZeRO-3 computes linears with its own autograd Function, whose bf16 backward rounds differently
        assert zero_alpha == pytest.approx(ddp_alpha, rel=1e-5 if mode == "zero3" else 1e-6), mode
        assert final != float(torch.tensor(final).bfloat16()), f"{mode}: alpha lost its fp32 resolution"


@pytest.mark.slow
def test_zero_bf16_checkpointing_and_accumulation_match_ddp(tmp_path):
    run_distributed_test(_check_flagship, world_size=2, args=(str(tmp_path),))


def _check_start_from_export(rank, world_size, export, output_dir, expected):
    dist = DistInfo(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))
    for mode in ("zero1", "zero2", "zero3"):
        losses, _ = run_recipe(
            "ci_tiny.yaml",
            dist,
            f"{output_dir}/{mode}",
            "data.micro_batch_size=4",
            *_mode(mode),
            f"train.init_from={export}",
        )
        assert losses == pytest.approx(expected, rel=TRAINER_LOSS_RTOL), mode


@pytest.mark.slow
def test_zero_runs_keep_the_exported_weights_they_start_from(tmp_path):
    """DeepSpeed's optimizer keeps fp32 copies of its partitions: weights loaded into the module after
    deepspeed.initialize must reach them, or the first step reverts to the initial weights (plus one update)."""
    from ebwm_scale.inference.export import export_checkpoint

    run_recipe("ci_tiny.yaml", CPU, tmp_path / "a", "data.micro_batch_size=8", "train.checkpoint_interval_steps=5")
    export_checkpoint(f"{tmp_path}/a/ci_tiny/checkpoints/step_{PARITY_STEPS:08d}", f"{tmp_path}/export")
    start = [f"train.init_from={tmp_path}/export"]
    expected, _ = run_recipe("ci_tiny.yaml", CPU, tmp_path / "one", "data.micro_batch_size=8", *start)
    run_distributed_test(_check_start_from_export, args=(f"{tmp_path}/export", str(tmp_path / "two"), expected))


def _check_zero3_memory(rank, world_size, output_dir):
    dist = DistInfo(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))
    cfg = load_config(REPO / "recipes" / "ci_tiny.yaml", [*PARITY, *_mode("zero3"), f"train.output_dir={output_dir}"])
    trainer = build_trainer(cfg, dist, [])
    engine, held_in_step = trainer.engine, []
    release = engine._release

    def record_then_release(partition: bool = True) -> None:
        held_in_step.append(sum(p.numel() for p in engine.params))
        release(partition)

    engine._release = record_then_release
    trainer.fit()
    whole = sum(p.ds_numel for p in engine.params)
    partition = sum(p.ds_tensor.numel() for p in engine.params)
    assert sum(p.numel() for p in engine.params) == 0  # at rest every parameter is partitioned
    assert partition <= whole / world_size + len(engine.params) * world_size  # its share, plus padding
    assert (
        held_in_step[:PARITY_STEPS] == [whole] * PARITY_STEPS
    )  # the step holds every weight until the outer backward is done


@pytest.mark.slow
def test_zero3_partitions_parameters_at_rest_and_holds_them_for_the_step(tmp_path):
    run_distributed_test(_check_zero3_memory, args=(str(tmp_path),))
