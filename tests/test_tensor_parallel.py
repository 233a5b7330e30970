"""Tensor parallelism on 2 gloo ranks vs one process: energies, the energy gradient w.r.t. the state, 3 training
steps, and every parameter gradient (each rank's shard against the same slice of the full gradient)."""

import copy

import pytest
import torch
import torch.distributed as dist

from ebwm_scale.core.mcmc import MCMCConfig
from ebwm_scale.core.objective import build_objective
from ebwm_scale.parallel.parallelize import apply_tensor_parallel
from ebwm_scale.parallel.tensor import VocabParallel, reduce_from_tp
from tests.conftest import tiny_model_config
from tests.distributed import TRAINER_LOSS_RTOL, assert_gradients_close, run_distributed_test
from tests.helpers import (
    GRADIENT_RTOL,
    PARITY,
    check_resume_and_export,
    expected_shard,
    parity_batch,
    run_recipe,
    run_recipe_with_gradients,
    tp_dist,
)

EXACT = 1e-9  # float64 parity


def _check(rank, size, kind, modality, mcmc_options, conditioning):
    """In float64, so that a wrong collective cannot hide under float32 summation-order differences."""
    torch.set_default_dtype(torch.float64)
    group = dist.group.WORLD
    torch.manual_seed(0)
    cfg = tiny_model_config(kind, modality, step_conditioning=conditioning, num_step_embeddings=2)
    reference = build_objective(cfg.build(), MCMCConfig(alpha_init=5.0, **mcmc_options).build())
    mcmc = copy.deepcopy(reference.mcmc) if kind == "ebt" else None
    parallel = build_objective(copy.deepcopy(reference.model), mcmc, VocabParallel(group))
    apply_tensor_parallel(parallel.model, group)
    batch = parity_batch(modality)

    if kind == "ebt":  # energies and the energy gradient w.r.t. the state (text: each rank holds a vocab slice)
        ctx = batch["tokens"][:, :-1] if modality == "text" else batch["frames"][:, :-1]
        pred = torch.randn(3, 8, 32 if modality == "text" else 8)
        local = pred.chunk(size, dim=-1)[rank] if modality == "text" else pred
        energies, state_grads = [], []
        for objective, state in ((reference, pred), (parallel, local)):
            state = state.clone().requires_grad_(True)
            energy = objective.model(ctx, state)
            energies.append(energy)
            state_grads.append(torch.autograd.grad(energy.sum(), state)[0])
        torch.testing.assert_close(energies[1], energies[0], rtol=EXACT, atol=EXACT)
        expected = state_grads[0].chunk(size, dim=-1)[rank] if modality == "text" else state_grads[0]
        torch.testing.assert_close(state_grads[1], expected, rtol=EXACT, atol=EXACT)

    optimizers = [torch.optim.SGD(o.parameters(), lr=0.05) for o in (reference, parallel)]
    modules = dict(parallel.named_modules())
    for step in range(3):
        losses = []
        for objective in (reference, parallel):
            torch.manual_seed(100 + step)  # the same MCMC start noise on every rank and for both models
            out = objective(batch)
            out.loss.backward()
            losses.append(out.loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=EXACT), (step, losses)
        full = dict(reference.named_parameters())
        for name, param in parallel.named_parameters():
            owner = modules[name.rsplit(".", 1)[0]]
            expected = expected_shard(owner, name, full[name].grad, rank, size)
            torch.testing.assert_close(param.grad, expected, rtol=EXACT, atol=EXACT, msg=lambda m, n=name: f"{n}: {m}")
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, modality, mcmc_options, conditioning",
    [
        ("ebt", "text", {"update_space": "probs", "vocab_state": "lean"}, "time_token"),
        ("ebt", "text", {"update_space": "probs", "vocab_state": "plain"}, "none"),
        ("ebt", "text", {"update_space": "logits", "vocab_state": "lean"}, "additive"),
        ("ebt", "text", {"update_space": "logits", "vocab_state": "plain"}, "none"),
        ("ebt", "frames", {}, "none"),
        ("ar", "text", {}, "none"),
    ],
)
def test_tensor_parallel_matches_one_process(kind, modality, mcmc_options, conditioning):
    """Text: the vocabulary-split state under both update rules, through the lean fused Functions (all-reduced row
    sums inside) and through plain autograd; each against the one-process model of the same kind."""
    run_distributed_test(_check, world_size=2, args=(kind, modality, mcmc_options, conditioning))


def _check_second_order_collective(rank, size):
    """d/dx of (d/dx sum(reduce(x * w)^2)): ours vs the analytic value; the naive differentiable all-reduce of
    torch.distributed.nn multiplies it by the number of ranks (an all-reduce in its backward too), silently."""
    from torch.distributed.nn.functional import all_reduce as naive_all_reduce

    w = torch.tensor([float(rank + 1)])  # rank-dependent weights: wrong reductions show up as wrong numbers
    total_w = sum(r + 1.0 for r in range(size))
    results = {}
    for name, reduce in (("ours", lambda t: reduce_from_tp(t, dist.group.WORLD)), ("naive", naive_all_reduce)):
        x = torch.tensor([1.5], requires_grad=True)
        y = reduce(x * w)  # y = x * sum(w) on every rank
        (g,) = torch.autograd.grad((y**2).sum(), x, create_graph=True)  # this rank's part: 2 y w
        (gg,) = torch.autograd.grad(g.sum(), x)
        results[name] = gg.item()
    assert results["ours"] == pytest.approx(2 * (rank + 1) * total_w)
    assert results["naive"] == pytest.approx(size * results["ours"])  # counted once per rank


def test_our_reduce_is_correct_under_double_backward_where_the_naive_one_is_not():
    run_distributed_test(_check_second_order_collective, world_size=2)


def _check_training(rank, size, output_dir, expected):
    losses, params, gradients = run_recipe_with_gradients(
        "ci_tiny.yaml",
        tp_dist(rank, size),
        output_dir,
        "data.micro_batch_size=4",
        "parallel.tensor_parallel=2",
        "mcmc.init_scale=1",
        "mcmc.langevin_noise_std=0.05",
        "optim.grad_clip=0",
    )
    ref_losses, ref_params, ref_gradients = expected
    assert losses == pytest.approx(ref_losses, rel=TRAINER_LOSS_RTOL)
    assert_gradients_close(gradients[0], ref_gradients[0], GRADIENT_RTOL)  # shards gathered
    assert {k: v.shape for k, v in params.items()} == {k: v.shape for k, v in ref_params.items()}  # whole weights


@pytest.mark.slow
def test_tensor_parallel_training_matches_one_process(tmp_path):
    """Both tensor-parallel ranks see the batch and the MCMC noise of one process (noise on), 5 steps of AdamW."""
    from tests.conftest import CPU

    expected = run_recipe_with_gradients(
        "ci_tiny.yaml",
        CPU,
        tmp_path / "one",
        "data.micro_batch_size=4",
        "mcmc.init_scale=1",
        "mcmc.langevin_noise_std=0.05",
        "optim.grad_clip=0",
    )
    run_distributed_test(_check_training, world_size=2, args=(str(tmp_path / "two"), expected))


START_FROM_EXPORT = ["data.micro_batch_size=4", "train.max_steps=3", "model.num_step_embeddings=3"]  # as exported


def _check_resume_and_export(rank, size, output_dir):
    check_resume_and_export(tp_dist(rank, size), output_dir, "parallel.tensor_parallel=2")


def _check_start_from_export(rank, size, output_dir, expected):
    fresh = [*START_FROM_EXPORT, f"train.init_from={output_dir}/export", "parallel.tensor_parallel=2"]
    losses, _ = run_recipe("ci_tiny.yaml", tp_dist(rank, size), f"{output_dir}/d", *fresh)
    assert losses == pytest.approx(expected, rel=TRAINER_LOSS_RTOL)


@pytest.mark.slow
def test_tensor_parallel_resume_is_exact_and_exports_start_runs_under_either_layout(tmp_path):
    from tests.conftest import CPU

    run_distributed_test(_check_resume_and_export, world_size=2, args=(str(tmp_path),))
    # The TP=2 export starts a one-process run, and a TP=2 run from it follows the same trajectory.
    one, _ = run_recipe("ci_tiny.yaml", CPU, tmp_path / "c", *START_FROM_EXPORT, f"train.init_from={tmp_path}/export")
    from_scratch, _ = run_recipe("ci_tiny.yaml", CPU, tmp_path / "e", *START_FROM_EXPORT)
    assert one[0] < from_scratch[0]  # it did start from the trained weights
    run_distributed_test(_check_start_from_export, world_size=2, args=(str(tmp_path), one))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_entry_point_trains_with_tensor_parallel(launcher, tmp_path):
    from tests.conftest import REPO
    from tests.distributed import launch_entry_point

    proc = launch_entry_point(
        launcher,
        [str(REPO / "recipes" / "ci_tiny.yaml"), *PARITY, "parallel.tensor_parallel=2", f"train.output_dir={tmp_path}"],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s) (data parallel, tensor parallel 2)" in proc.stdout and "step 5/5" in proc.stdout


def _check_tp_times_dp(rank, size, output_dir, expected):
    from ebwm_scale.parallel.dist import DistInfo, with_parallel_groups

    dist_info = with_parallel_groups(
        DistInfo(rank=rank, local_rank=rank, world_size=size, device=torch.device("cpu")), 2
    )
    assert (dist_info.dp_size, dist_info.dp_rank) == (2, rank // 2)
    losses, _, gradients = run_recipe_with_gradients(
        "ci_tiny.yaml",
        dist_info,
        output_dir,
        "data.micro_batch_size=4",
        "parallel.tensor_parallel=2",
        "optim.grad_clip=0",
    )
    assert losses == pytest.approx(expected[0], rel=TRAINER_LOSS_RTOL)
    assert_gradients_close(gradients[0], expected[2][0], GRADIENT_RTOL)


@pytest.mark.slow
def test_tensor_parallel_times_data_parallel_on_four_ranks(tmp_path):
    """TP=2 x DP=2 (4 gloo processes) vs one process on the same global batch of 8 (noise-free MCMC start)."""
    from tests.conftest import CPU

    expected = run_recipe_with_gradients(
        "ci_tiny.yaml", CPU, tmp_path / "one", "data.micro_batch_size=8", "optim.grad_clip=0"
    )
    run_distributed_test(_check_tp_times_dp, world_size=4, args=(str(tmp_path / "four"), expected))
