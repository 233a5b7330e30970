"""Pipeline parallelism on gloo ranks vs one process: the loss over 3 training steps and every parameter gradient,
for EBT-text (both update rules, lean and plain state, noise and jitter, fixed and randomized MCMC step counts) and
AR-text, with 1 and 4 micro-batches, 2 and 3 stages."""

import copy
from contextlib import nullcontext

import pytest
import torch

from ebwm_scale.core.mcmc import MCMCConfig, ReplayConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.parallel.dist import DistInfo, with_parallel_groups
from ebwm_scale.parallel.pipeline import apply_pipeline, pipeline_schedule, stage_layers
from tests.conftest import tiny_model_config
from tests.distributed import TRAINER_LOSS_RTOL, assert_gradients_close, run_distributed_test
from tests.helpers import GRADIENT_RTOL, PARITY, PARITY_RECIPES, check_resume_and_export, run_recipe_with_gradients

# float64, so that a wrong term shows far above the rounding of summing the same terms in another order
RTOL, ATOL = 1e-9, 1e-12


# the official System-2 options with a learnable alpha, so that stage 0 keeps the undetached chain
SYSTEM2 = {
    "num_steps": 1,
    "steps_per_landscape": 2,
    "max_steps_per_landscape": 3,
    "step_size_scale": 2.0,
    "langevin_noise_std": 0.1,
    "langevin_at_eval": True,
    "detach_chain": False,
    "loss_on": "last",
    "step_count_seed": 1,
}


def _pp_dist(rank, size, tp_size=1, pp_size=None):
    info = DistInfo(rank=rank, local_rank=rank, world_size=size, device=torch.device("cpu"))
    return with_parallel_groups(info, tp_size, pp_size or size)


def _check(rank, size, kind, microbatches, mcmc_overrides, modality="text", conditioning="none", rtol=RTOL, atol=ATOL):
    torch.set_default_dtype(torch.float64)
    mcmc = MCMCConfig(alpha_init=5.0, **mcmc_overrides)
    torch.manual_seed(0)
    cfg = tiny_model_config(kind, modality, num_layers=3, step_conditioning=conditioning, num_step_embeddings=2)
    reference = build_objective(cfg.build(), mcmc.build())
    stage = copy.deepcopy(reference)
    dist_info = _pp_dist(rank, size)
    apply_pipeline(stage, dist_info.pp_rank, size)
    schedule = pipeline_schedule(stage, dist_info, microbatches, mcmc)
    torch.manual_seed(7)
    batch = {"tokens": torch.randint(0, 32, (4, 9))} if modality == "text" else {"frames": torch.randn(4, 9, 8)}
    optimizers = [torch.optim.SGD(o.parameters(), lr=0.05) for o in (reference, stage)]
    for step in range(3):
        torch.manual_seed(100 + step)  # the same MCMC start noise for both (drawn per micro-batch on stage 0)
        expected = reference(batch)
        expected.loss.backward()
        torch.manual_seed(100 + step)
        got = schedule.forward_backward(batch, 1.0, nullcontext())
        for key, value in expected.metrics.items():
            assert float(got[key]) == pytest.approx(float(value), rel=RTOL, abs=ATOL), (step, key)
        full = dict(reference.named_parameters())
        assert dict(stage.named_parameters()), "every stage holds parameters"
        for name, param in stage.named_parameters():
            torch.testing.assert_close(param.grad, full[name].grad, rtol=rtol, atol=atol, msg=lambda m, n=name: n + m)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    torch.manual_seed(5)
    expected = reference.evaluate(batch)
    torch.manual_seed(5)
    got = schedule.evaluate(batch)
    for key, value in expected.items():
        assert float(got[key]) == pytest.approx(float(value), rel=RTOL, abs=ATOL), key


@pytest.mark.slow
@pytest.mark.parametrize("microbatches", [1, 4])
@pytest.mark.parametrize(
    "kind, mcmc_overrides",
    [
        ("ebt", {}),
        ("ebt", {"num_steps": 1, "max_num_steps": 3, "step_count_seed": 3}),
        ("ebt", {"loss_on": "last", "num_steps": 3}),
        ("ebt", {"update_space": "logits", "langevin_noise_std": 0.1}),
        ("ebt", {"vocab_state": "plain", "langevin_noise_std": 0.1}),
        ("ebt", SYSTEM2),
        ("ar", {}),
    ],
    ids=["ebt", "ebt-random-steps", "ebt-loss-on-last", "ebt-logits-noisy", "ebt-plain-noisy", "ebt-system2", "ar"],
)
def test_two_stages_match_one_process(kind, microbatches, mcmc_overrides):
    run_distributed_test(_check, world_size=2, args=(kind, microbatches, mcmc_overrides))


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["text", "frames"])
def test_system2_with_a_replay_buffer_matches_one_process(modality):
    """Steps 2 and 3 replay sequences stored by the steps before (2 per batch of 4, on stage 0), one time token. The
    micro-batches of 3 rows sum in another order than 6 rows at once, and the chain (alpha up to 10, three SGD steps)
    amplifies that: a few weight-gradient entries differ by up to 5e-9 relative, far below any wrong term."""
    mcmc = {**SYSTEM2, "replay": ReplayConfig(size=6, sample_fraction=0.5)}
    run_distributed_test(_check, world_size=2, args=("ebt", 2, mcmc, modality, "time_token", 1e-8, 1e-10))


@pytest.mark.slow
@pytest.mark.parametrize("conditioning", ["time_token", "additive"])
def test_step_conditioned_ebt_matches_one_process(conditioning):
    """time_token: a context stream per MCMC step (its own waves and its own backward); additive: on stage 0 only.
    Three steps with two step embeddings: the third reuses the second's stream."""
    mcmc = {"num_steps": 3, "langevin_noise_std": 0.1}
    run_distributed_test(_check, world_size=2, args=("ebt", 2, mcmc, "text", conditioning))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ebt", "ar"])
def test_frame_models_match_one_process_with_frame_metrics(kind):
    run_distributed_test(_check, world_size=2, args=(kind, 2, {}, "frames"))


@pytest.mark.slow
@pytest.mark.parametrize("microbatches", [1, 4])
@pytest.mark.parametrize("kind", ["ebt", "ar"])
def test_three_stages_match_one_process(kind, microbatches):
    run_distributed_test(_check, world_size=3, args=(kind, microbatches, {}))


def test_stages_are_balanced_and_cover_every_block():
    assert stage_layers(8, 2) == [range(0, 4), range(4, 8)]
    assert stage_layers(7, 3) == [range(0, 2), range(2, 4), range(4, 7)]
    assert stage_layers(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]


def test_a_stage_keeps_only_its_part_and_the_whole_models_names():
    objective = build_objective(tiny_model_config("ebt", "text", num_layers=3).build(), MCMCConfig().build())
    names = set(objective.state_dict())
    stages = []
    for stage in range(2):
        part = copy.deepcopy(objective)
        apply_pipeline(part, stage, 2)
        stages.append(set(part.state_dict()))
    assert stages[0] | stages[1] == names and not stages[0] & stages[1]
    assert "mcmc.alpha" in stages[0] and "model.tok_embeddings.weight" in stages[0]
    assert "model.energy_head.weight" in stages[1] and "model.transformer.layers.2.ffn_norm.weight" in stages[1]
    part = copy.deepcopy(objective)
    apply_pipeline(part, 0, 2)
    with pytest.raises(RuntimeError, match="block 2 lives on pipeline stage 1"):
        part.model.transformer.layers[2](torch.zeros(1))


def _check_training(rank, size, output_dir, expected, tp_size, pp_size):
    dist_info = _pp_dist(rank, size, tp_size, pp_size)
    batch = 8 // dist_info.dp_size
    for recipe in PARITY_RECIPES:
        losses, params, gradients = run_recipe_with_gradients(
            recipe,
            dist_info,
            f"{output_dir}/{recipe}",
            f"data.micro_batch_size={batch}",
            f"parallel.pipeline_parallel={pp_size}",
            f"parallel.tensor_parallel={tp_size}",
            "parallel.pipeline_microbatches=2",
            "optim.grad_clip=0",
        )
        ref_losses, ref_params, ref_gradients = expected[recipe]
        assert losses == pytest.approx(ref_losses, rel=TRAINER_LOSS_RTOL), recipe
        assert_gradients_close(gradients[0], ref_gradients[0], GRADIENT_RTOL, stage=True)  # this stage's part
        assert {k: v.shape for k, v in params.items()} == {k: v.shape for k, v in ref_params.items()}  # all stages


def _one_process(tmp_path):
    from tests.conftest import CPU

    return {
        r: run_recipe_with_gradients(r, CPU, tmp_path / "one" / r, "data.micro_batch_size=8", "optim.grad_clip=0")
        for r in PARITY_RECIPES
    }


@pytest.mark.slow
def test_pipeline_training_matches_one_process(tmp_path):
    """The trainer under PP=2 (2 micro-batches in flight) follows one process for 5 AdamW steps, EBT and AR, and its
    checkpointed weights are those of the whole model."""
    run_distributed_test(_check_training, world_size=2, args=(str(tmp_path / "pp"), _one_process(tmp_path), 1, 2))


@pytest.mark.slow
@pytest.mark.parametrize("tp_size", [1, 2], ids=["pp2-dp2", "pp2-tp2"])
def test_pipeline_composes_on_four_ranks(tmp_path, tp_size):
    """PP=2 x DP=2 and PP=2 x TP=2 on 4 gloo processes vs one process on the same global batch."""
    run_distributed_test(
        _check_training, world_size=4, args=(str(tmp_path / "four"), _one_process(tmp_path), tp_size, 2)
    )


def _check_resume_and_export(rank, size, output_dir):
    check_resume_and_export(
        _pp_dist(rank, size),
        output_dir,
        "parallel.pipeline_parallel=2",
        "parallel.pipeline_microbatches=2",
        "mcmc.init_scale=1",
    )


@pytest.mark.slow
def test_pipeline_resume_is_exact_and_checkpoints_hold_the_whole_model(tmp_path):
    run_distributed_test(_check_resume_and_export, world_size=2, args=(str(tmp_path),))


@pytest.mark.slow
def test_entry_point_trains_with_pipeline_parallel(tmp_path):
    from tests.conftest import REPO
    from tests.distributed import launch_entry_point

    args = [str(REPO / "recipes" / "ci_tiny.yaml"), *PARITY, "parallel.pipeline_parallel=2", "train.eval_batches=2"]
    proc = launch_entry_point("torchrun", [*args, f"train.output_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s) (data parallel, pipeline 2 stages x 4 micro-batches)" in proc.stdout
    assert "step 5/5" in proc.stdout and "eval" in proc.stdout
